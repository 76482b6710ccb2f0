"""``sam2unet-predict``: segment a file or a folder of cases with a SAM2-UNet checkpoint.

nnU-Net style: ``CASE_0000.nii.gz`` inputs give ``CASE.nii.gz`` outputs; ``--num-parts N
--part-id K`` splits a folder over N independent processes; finished cases are skipped on
a rerun; a case that fails is reported (file and cause) and the run goes on, then exits 1.
Ctrl-C (exit 130) and SIGTERM (exit 143) stop the run after writing the summary of what
finished.
Every output is written atomically. ``predict_summary.json`` (per part:
``predict_summary_partK_of_N.json``) lists each case with its status and timings.

Volumes are sliced along the model's plane, or along each of its planes with their
probabilities fused when it was trained on several (``--planes`` chooses planes to fuse,
``--axis`` one plane, with a warning when the model was not trained on it), and batched
slice-wise; PNG/JPG frames (polyp benchmarks) are batched across files. The work is done by the library call
:func:`sam2unet_core.inference.batch.predict_from_files`; this module parses, builds,
calls and prints.

``--progress jsonl`` prints one JSON event per line on stdout (start, case_start, slices,
case_done, case_skipped, case_error, done) for the 3D Slicer module; ``bar`` shows tqdm
bars on stderr.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import Any, Callable

from ..device import DEVICE_CHOICES, PRECISIONS
from ..errors import Sam2UNetError
from ..inference.backend import BACKENDS, load_predictor
from ..inference.batch import PROBABILITY_FOLDER, PredictOptions, predict_from_files, select_cases
from ..inference.engine import Predictor
from ..inference.postprocess import POSTPROCESS_STEPS
from ..io.dicom import list_dicom_series
from ..io.orientation import PLANES
from ..io.writers import LABEL_FORMATS
from ..metadata import UntrainedModelError
from .progress import Progress, flag_words

__all__ = ["main", "build_parser"]

logger = logging.getLogger(__name__)


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` unless X is None/False or the help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sam2unet-predict",
        description="Segment CT/MR volumes or 2D images with a SAM2-UNet checkpoint.",
        formatter_class=_DefaultsFormatter,
    )
    parser.add_argument("-i", "--input", required=True, type=Path,
                        help="image file, DICOM folder, or folder of cases")
    parser.add_argument("-o", "--output", type=Path, help="output folder; required unless --list-series")
    parser.add_argument("-m", "--model", type=Path,
                        help="checkpoint (.safetensors, official SAM2-UNet .pth) or an ONNX file from "
                             "sam2unet-export (run by ONNX Runtime, without torch); required unless "
                             "--list-series")
    parser.add_argument("--device", default="auto", help=f"one of {DEVICE_CHOICES} or cuda:N")
    parser.add_argument("--batch-size", type=int, default=8, help="slices (or PNG/JPG frames) per forward pass")
    parser.add_argument("--axis", default=None, choices=sorted(PLANES),
                        help="anatomical plane of the 2D slices (default: the plane the model "
                             "was trained on, axial for older models)")
    parser.add_argument("--planes", nargs="+", default=None, choices=sorted(PLANES),
                        help="segment along each of these planes and fuse them (mean of the "
                             "class probabilities); default: every plane the model was trained "
                             "on, fused when several (python -m sam2unet_core.cli.describe MODEL "
                             "lists them)")
    parser.add_argument("--format", choices=LABEL_FORMATS, default=None,
                        help="output format (default: nii.gz for volumes, png for PNG/JPG)")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo cases whose output exists (default: skip them)")
    parser.add_argument("--num-parts", type=int, default=1,
                        help="split the cases into this many parts (one per GPU/machine)")
    parser.add_argument("--part-id", type=int, default=0, help="which part this run does")
    parser.add_argument("--slice-range", default=None, metavar="START:STOP",
                        help="only these slices (half-open indices along the chosen axis)")
    parser.add_argument("--series-uid", default=None,
                        help="DICOM SeriesInstanceUID to read (default: the largest series)")
    parser.add_argument("--volume-index", type=int, default=None, metavar="N",
                        help="for 4D NIfTI inputs (time series, echoes): segment volume N "
                             "(0-based); 3D inputs are read as they are (default: 4D is refused)")
    parser.add_argument("--list-series", action="store_true",
                        help="list the DICOM series of the input and exit")
    parser.add_argument("--tta", action="store_true", help="average over flipped inputs")
    parser.add_argument("--postprocess", nargs="*", default=[], choices=POSTPROCESS_STEPS,
                        help="label clean-up steps, applied in order (default: none)")
    parser.add_argument("--save-probabilities", action="store_true",
                        help=f"also write float probability maps to {PROBABILITY_FOLDER}/")
    parser.add_argument("--statistics", action="store_true",
                        help="also write CASE.statistics.json/.csv: per label voxels, mL, mean/std "
                             "intensity, bounding box (voxels, mm)")
    parser.add_argument("--qc-png", action="store_true",
                        help="also write CASE.qc.png: axial, coronal, sagittal slices through the "
                             "labels' centre of mass with the labels overlaid")
    parser.add_argument("--allow-untrained", action="store_true",
                        help="run a SAM 2 checkpoint, whose decoder is untrained (smoke tests only; "
                             "default: refused, train or fine-tune a model on it first)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="torch models: auto = fp16 autocast on CUDA, bf16 Hiera stages 3-4 on "
                             "CPUs with native bf16 (AVX512_BF16/AMX), else fp32; fp32 = full "
                             "precision everywhere; bf16 = Hiera stages 3-4 in bf16 (emulated on "
                             "other CPUs); fp16 = fp16 autocast. The log and the summary say what ran. "
                             "An ONNX file runs at the precision it was written with")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="checkpoints: auto = ONNX Runtime fp32 on CPUs where torch would run "
                             "fp32 (faster, same labels; exported once and cached in "
                             "~/.cache/sam2unet/onnx or $SAM2UNET_CACHE_DIR/onnx), else torch; "
                             "torch; onnxruntime. The log and the summary say which ran")
    parser.add_argument("--progress", choices=("bar", "jsonl", "none"), default="bar",
                        help="progress display: tqdm bars on stderr, JSON lines on stdout, none")
    return parser


def _parse_slice_range(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        start, stop = (int(part) for part in text.split(":"))
    except ValueError as err:
        raise ValueError(f"--slice-range must look like START:STOP, got {text!r}") from err
    return start, stop


def _list_series(input_path: Path) -> int:
    found = list_dicom_series(input_path) if input_path.is_dir() else []
    if not found:
        print(f"error: no DICOM series found in {input_path} (expected a folder)",
              file=sys.stderr)
        return 1
    for series in found:
        print(series.summary())
    return 0


def _options(args: argparse.Namespace) -> PredictOptions:
    return PredictOptions(
        axis=args.axis, planes=None if args.planes is None else tuple(args.planes),
        output_format=args.format, overwrite=args.overwrite,
        num_parts=args.num_parts, part_id=args.part_id,
        slice_range=_parse_slice_range(args.slice_range), series_uid=args.series_uid,
        volume_index=args.volume_index, tta=args.tta, postprocess=tuple(args.postprocess),
        save_probabilities=args.save_probabilities, statistics=args.statistics, qc_png=args.qc_png,
    )


def _build_predictor(args: argparse.Namespace) -> Predictor:
    """The library's :func:`~sam2unet_core.inference.backend.load_predictor` for the parsed
    arguments (ONNX files without torch). ``ValueError``/``OSError`` for a bad model,
    device, precision or backend."""
    return load_predictor(args.model, device=args.device, precision=args.precision, backend=args.backend,
                          batch_size=args.batch_size, allow_untrained=args.allow_untrained)


def _below_error(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR


def _set_up_output() -> None:
    """Log lines on stderr. nibabel reports a bad NIfTI header on its own handler, at error
    level, and then raises it, which the batch reports as that case's error: the report is
    dropped so that the cause is said once, in the case's line. File names that are not
    UTF-8 (Linux names are bytes) are printed escaped on stdout, not refused."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    reports = logging.getLogger("nibabel.global")
    for handler in list(reports.handlers):
        reports.removeHandler(handler)
    reports.addFilter(_below_error)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, so that the run stops as on Ctrl-C: the
    summary of what finished is written, then the process exits with 143."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated()


def main(argv: list[str] | None = None,
         build_predictor: Callable[[argparse.Namespace], Predictor] = _build_predictor) -> int:
    """Run ``sam2unet-predict`` with ``argv``; returns the exit code. ``build_predictor``
    makes the Predictor from the parsed arguments (``sam2unet_core.cli.worker`` passes one
    that keeps the model loaded between runs)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _set_up_output()
    if args.list_series:
        return _list_series(args.input)
    if args.output is None:
        parser.error("-o/--output is required")
    if args.model is None:
        parser.error("-m/--model is required")
    try:
        options = _options(args)
        cases = select_cases(args.input, args.output, options)  # bad arguments fail before any work
    except Sam2UNetError as err:
        parser.error(flag_words(str(err), err.kind, err.field, err.value))
    except ValueError as err:
        parser.error(str(err))
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        predictor = build_predictor(args)
    except UntrainedModelError as err:
        print(f"error: {err}; or pass --allow-untrained to run it anyway (smoke tests only)", file=sys.stderr)
        return 2
    except Sam2UNetError as err:
        print(f"error: cannot load model {args.model}: {flag_words(str(err), err.kind, err.field, err.value)}",
              file=sys.stderr)
        return 2
    except (ValueError, OSError) as err:
        print(f"error: cannot load model {args.model}: {err}", file=sys.stderr)
        return 2
    record = {"model": str(args.model),
              "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        summary = predict_from_files(predictor, args.input, args.output, options,
                                     Progress(args.progress), record, cases)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    counts = summary.counts
    if args.progress != "jsonl":
        print(f"{counts['ok']} done, {counts['skipped']} skipped (already done), "
              f"{counts['failed']} failed; summary in {args.output}", file=sys.stderr)
    for case in summary.cases:
        if case.status == "failed":
            print(f"FAILED {case.case}: {flag_words(case.error, case.kind, case.field, case.value)}",
                  file=sys.stderr)
    if summary.interrupted:
        return 143 if isinstance(summary.interruption, _Terminated) else 130
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
