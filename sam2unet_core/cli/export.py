"""``sam2unet-export MODEL --format onnx -o model.onnx``: write a checkpoint as a
self-describing ONNX file (the per-slice model step and our metadata) for ONNX Runtime."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sam2unet-export", description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="checkpoint: .safetensors, .pt or .pth")
    parser.add_argument("--format", choices=["onnx"], default="onnx", help="export format (default onnx)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output file, e.g. model.onnx")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset, 17 or newer (default 17)")
    args = parser.parse_args(argv)
    if args.opset < 17:
        parser.error(f"--opset {args.opset} is too old; use 17 or newer")
    from sam2unet_core.checkpoint import CheckpointError, load_model
    from sam2unet_core.export.onnx import export_onnx

    try:
        model = load_model(args.model)
        path = export_onnx(model, args.output, opset=args.opset)
    except (OSError, ValueError, KeyError, CheckpointError) as err:
        print(f"error: {args.model}: {err}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
