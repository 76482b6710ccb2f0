"""``sam2unet-export MODEL --format onnx -o model.onnx``: write a checkpoint as a
self-describing ONNX file (the per-slice model step and our metadata) for ONNX Runtime;
``--format monai-bundle -o bundle_dir``: as a MONAI Bundle folder for ``monai.bundle run``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sam2unet-export", description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="checkpoint: .safetensors, .pt or .pth")
    parser.add_argument("--format", choices=["onnx", "monai-bundle"], default="onnx",
                        help="export format (default onnx)")
    parser.add_argument("-o", "--output", type=Path, required=True,
                        help="output file, e.g. model.onnx; for monai-bundle a new (or empty) folder")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset, 17 or newer (default 17)")
    parser.add_argument("--authors", default="not stated", help="monai-bundle: authors in metadata.json")
    parser.add_argument("--copyright", default="not stated", help="monai-bundle: copyright in metadata.json")
    args = parser.parse_args(argv)
    if args.opset < 17:
        parser.error(f"--opset {args.opset} is too old; use 17 or newer")
    from sam2unet_core.checkpoint import CheckpointError, load_model

    try:
        model = load_model(args.model)
        if args.format == "monai-bundle":
            from sam2unet_core.export.bundle import export_bundle

            path = export_bundle(model, args.output, source_name=args.model.name,
                                 authors=args.authors, copyright=args.copyright)
        else:
            from sam2unet_core.export.onnx import export_onnx

            path = export_onnx(model, args.output, opset=args.opset)
    except (OSError, ValueError, KeyError, CheckpointError) as err:
        print(f"error: {args.model}: {err}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
