"""``sam2unet-export MODEL --format onnx -o model.onnx``: write a checkpoint as a
self-describing ONNX file (the per-slice model step and our metadata) for ONNX Runtime;
``--int8 --check IMAGE ...``: its int8 version, only if it agrees with fp32 on those volumes;
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
    parser.add_argument("--int8", action="store_true",
                        help="onnx: write int8 weights (dynamic quantisation), only if the label maps of --check "
                             "volumes agree with the fp32 model's (Dice >= 0.999 per label)")
    parser.add_argument("--check", type=Path, nargs="+", default=[], metavar="IMAGE",
                        help="with --int8: real volumes to compare int8 and fp32 on (NIfTI, NRRD, DICOM folder)")
    args = parser.parse_args(argv)
    if args.opset < 17:
        parser.error(f"--opset {args.opset} is too old; use 17 or newer")
    if args.int8 != bool(args.check):
        parser.error("--int8 needs --check IMAGE [IMAGE ...], and --check needs --int8")
    if args.int8 and args.format != "onnx":
        parser.error("--int8 applies to --format onnx only")
    from sam2unet_core.checkpoint import CheckpointError, load_model

    try:
        model = load_model(args.model)
        if args.format == "monai-bundle":
            from sam2unet_core.export.bundle import export_bundle

            path = export_bundle(model, args.output, source_name=args.model.name,
                                 authors=args.authors, copyright=args.copyright)
        elif args.int8:
            return _export_int8(model, args)
        else:
            from sam2unet_core.export.onnx import export_onnx

            path = export_onnx(model, args.output, opset=args.opset)
    except (OSError, ValueError, KeyError, CheckpointError) as err:
        print(f"error: {args.model}: {err}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


def _export_int8(model, args: argparse.Namespace) -> int:
    """Export fp32 to a temporary file, then quantise it behind the agreement check."""
    import tempfile

    from sam2unet_core.export.onnx import export_onnx
    from sam2unet_core.export.quantize import quantize_int8
    from sam2unet_core.io import read_volume

    volumes = [read_volume(path) for path in args.check]
    with tempfile.TemporaryDirectory(prefix="sam2unet-export-") as folder:
        fp32 = export_onnx(model, Path(folder) / args.output.name, opset=args.opset)
        report = quantize_int8(fp32, args.output, volumes)
    print(f"wrote {args.output} (int8; label Dice against fp32 on {len(volumes)} volume(s): {report.describe()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
