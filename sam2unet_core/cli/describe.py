"""``python -m sam2unet_core.cli.describe CHECKPOINT``: print the checkpoint's model metadata
as one JSON line (any kind: ours, official SAM2-UNet ``.pt``/``.pth``, SAM 2, an ``.onnx``
from ``sam2unet-export``).

The 3D Slicer module runs this in a child process for ``.pt``/``.pth`` files, which only
``torch.load`` can read, so Slicer's own process never imports torch, and for ``.onnx`` files
(read by ONNX Runtime, never importing torch: the Slicer ONNX route has no torch).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sam2unet_core.cli.describe", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help=".safetensors, .pt, .pth or .onnx file")
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        print(f"error: {args.checkpoint} is not a file", file=sys.stderr)
        return 1
    from sam2unet_core.metadata import read_metadata  # torch only for torch files

    try:
        metadata = read_metadata(args.checkpoint)
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(metadata.to_json(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
