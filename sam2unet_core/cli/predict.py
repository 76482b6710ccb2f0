"""``sam2unet-predict``: segment a file or a folder of cases with a SAM2-UNet checkpoint.

nnU-Net style: ``CASE_0000.nii.gz`` inputs give ``CASE.nii.gz`` outputs; ``--num-parts N
--part-id K`` splits a folder over N independent processes; finished cases are skipped on
a rerun; a case that fails is reported (file and cause) and the run goes on, then exits 1.
Every output is written atomically. ``predict_summary.json`` (per part:
``predict_summary_partK_of_N.json``) lists each case with its status and timings.

Volumes are sliced along ``--axis`` and batched slice-wise; PNG/JPG frames (polyp
benchmarks) are batched across files. The next case is read in a background thread while
the current one runs.

``--progress jsonl`` prints one JSON event per line on stdout (start, case_start, slices,
case_done, case_error, done) for the 3D Slicer module; ``bar`` shows tqdm bars on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch

from ..device import DEVICE_CHOICES, describe_device, resolve_device
from ..inference.engine import Predictor
from ..inference.postprocess import POSTPROCESS_STEPS
from ..io.cases import Case, find_cases, select_part
from ..io.dicom import list_dicom_series
from ..io.orientation import PLANES
from ..io.readers import read_volume
from ..io.volume import Volume
from ..io.writers import (
    LABEL_FORMATS,
    atomic_write,
    dicom_seg_sources,
    output_suffix,
    remove_partials,
    write_labels,
    write_probabilities,
)

__all__ = ["main", "build_parser"]

logger = logging.getLogger(__name__)

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")
PROBABILITY_FOLDER = "probabilities"
WRITE_PROBE_PREFIX = ".write-test-"  # file written once to check the output folder


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
    parser.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    parser.add_argument("-m", "--model", type=Path,
                        help="checkpoint (.safetensors, official SAM2-UNet .pth); required unless "
                             "--list-series")
    parser.add_argument("--device", default="auto", help=f"one of {DEVICE_CHOICES} or cuda:N")
    parser.add_argument("--batch-size", type=int, default=8, help="slices (or PNG/JPG frames) per forward pass")
    parser.add_argument("--axis", default="axial", choices=sorted(PLANES),
                        help="anatomical plane of the 2D slices")
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
    parser.add_argument("--no-mixed-precision", action="store_true",
                        help="run fp32 on CUDA too (default: fp16 autocast on CUDA)")
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


class Reporter:
    """Progress output: JSON lines on stdout, or tqdm bars on stderr and a line per case."""

    def __init__(self, mode: str, num_cases: int) -> None:
        self.mode = mode
        self.case_bar = None
        self.slice_bar = None
        if mode == "bar":
            from tqdm import tqdm

            self._tqdm = tqdm
            self.case_bar = tqdm(total=num_cases, unit="case", file=sys.stderr, position=0)

    def event(self, **fields: Any) -> None:
        if self.mode == "jsonl":
            print(json.dumps(fields), flush=True)

    def say(self, line: str) -> None:
        if self.mode == "bar":
            self._tqdm.write(line)
        elif self.mode == "none":
            print(line, flush=True)

    def slices(self, case: str, total: int) -> Callable[[int, int], None]:
        if self.mode == "bar":
            self.slice_bar = self._tqdm(total=total, unit="slice", desc=case, leave=False,
                                        file=sys.stderr, position=1)

        def update(done: int, total_: int) -> None:
            self.event(event="slices", case=case, done=done, total=total_)
            if self.slice_bar is not None:
                self.slice_bar.update(done - self.slice_bar.n)

        return update

    def case_finished(self) -> None:
        if self.slice_bar is not None:
            self.slice_bar.close()
            self.slice_bar = None
        if self.case_bar is not None:
            self.case_bar.update(1)

    def close(self) -> None:
        if self.case_bar is not None:
            self.case_bar.close()


def _outputs(case: Case, output: Path, fmt: str | None, probabilities: bool) -> list[Path]:
    """Label path first, then the probability map path when asked for."""
    chosen = fmt or ("png" if case.path.suffix.lower() in PICTURE_SUFFIXES else "nii.gz")
    paths = [output / (case.name + output_suffix(chosen))]
    if probabilities:
        paths.append(output / PROBABILITY_FOLDER / f"{case.name}.nii.gz")
    return paths


def _summary_path(output: Path, num_parts: int, part_id: int) -> Path:
    if num_parts == 1:
        return output / "predict_summary.json"
    return output / f"predict_summary_part{part_id}_of_{num_parts}.json"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2)))


def _check_writable(folder: Path) -> None:
    """Create ``folder`` and write (then delete) a small file in it: an unwritable output
    folder stops the run before any work, not after the first case."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f"{WRITE_PROBE_PREFIX}{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise OSError(f"cannot write to the output folder {folder}: {err.strerror or err}") from err


def _list_series(input_path: Path) -> int:
    found = list_dicom_series(input_path) if input_path.is_dir() else []
    if not found:
        print(f"error: no DICOM series found in {input_path} (expected a folder)",
              file=sys.stderr)
        return 1
    for series in found:
        print(series.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.list_series:
        return _list_series(args.input)
    if args.model is None:
        parser.error("-m/--model is required")
    if args.input.is_dir() and args.output.resolve() == args.input.resolve():
        parser.error("the output folder must differ from the input folder (outputs would be "
                     "read as inputs on the next run)")
    try:
        slice_range = _parse_slice_range(args.slice_range)
        cases = select_part(find_cases(args.input), args.num_parts, args.part_id)
    except ValueError as err:
        parser.error(str(err))

    try:
        _check_writable(args.output)
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        predictor = Predictor(args.model, device=device, batch_size=args.batch_size,
                              mixed_precision=not args.no_mixed_precision)
    except (ValueError, OSError) as err:
        print(f"error: cannot load model {args.model}: {err}", file=sys.stderr)
        return 2
    reporter = Reporter(args.progress, len(cases))
    reporter.event(event="start", cases=len(cases))
    summary: dict[str, Any] = {
        "model": str(args.model),
        "device": describe_device(predictor.device),
        "labels": {label.value: label.name for label in predictor.metadata.labels},
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "cases": [],
    }
    run_started = time.perf_counter()
    interrupted = False
    runner = CaseRunner(args, predictor, reporter, slice_range)
    summary["cases"] = runner.records
    try:
        runner.run(cases)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        reporter.close()
    counts = {status: sum(c["status"] == status for c in summary["cases"])
              for status in ("ok", "failed", "skipped")}
    summary.update(counts, interrupted=interrupted,
                   seconds=round(time.perf_counter() - run_started, 3))
    try:
        _write_json(_summary_path(args.output, args.num_parts, args.part_id), summary)
    except OSError as err:
        print(f"error: cannot write the summary in {args.output}: {err}", file=sys.stderr)
        counts["failed"] += 1
    reporter.event(event="done", **counts)
    if args.progress != "jsonl":
        print(f"{counts['ok']} done, {counts['skipped']} skipped (already done), "
              f"{counts['failed']} failed; summary in {args.output}", file=sys.stderr)
    for case in summary["cases"]:
        if case["status"] == "failed":
            print(f"FAILED {case['case']}: {case['error']}", file=sys.stderr)
    if interrupted:
        return 130
    return 1 if counts["failed"] else 0


Job = tuple[Case, list[Path]]  # a case and its output paths (labels, then probabilities)
Loaded = tuple[Any, float]  # (Volume, or the exception reading raised; seconds spent)


def _is_frame(job: Job) -> bool:
    return job[0].path.suffix.lower() in PICTURE_SUFFIXES


def _work_units(jobs: list[Job], batch_size: int) -> list[list[Job]]:
    """Volumes one by one; runs of consecutive PNG/JPG frames in groups of ``batch_size``,
    which share forward passes."""
    units: list[list[Job]] = []
    for job in jobs:
        if _is_frame(job) and units and _is_frame(units[-1][0]) and len(units[-1]) < batch_size:
            units[-1].append(job)
        else:
            units.append([job])
    return units


class CaseRunner:
    """Runs the cases of one ``sam2unet-predict`` call and records how each one went."""

    def __init__(self, args: argparse.Namespace, predictor: Predictor, reporter: Reporter,
                 slice_range: tuple[int, int] | None) -> None:
        self.args = args
        self.predictor = predictor
        self.reporter = reporter
        self.slice_range = slice_range
        self.records: list[dict[str, Any]] = []

    def run(self, cases: list[Case]) -> None:
        """Remove what killed runs left half-written for these cases, skip finished cases,
        then predict the others, reading the next unit of work in a background thread
        while the current one runs."""
        outputs = [_outputs(case, self.args.output, self.args.format, self.args.save_probabilities)
                   for case in cases]
        summary = _summary_path(self.args.output, self.args.num_parts, self.args.part_id)
        remove_partials([summary, *(path for paths in outputs for path in paths)])
        jobs = []
        for case, paths in zip(cases, outputs):
            if not self.args.overwrite and all(p.exists() for p in paths):
                logger.info("%s: already done (%s), skipped", case.name, paths[0])
                self.records.append({"case": case.name, "input": str(case.path),
                                     "status": "skipped", "output": str(paths[0])})
                self.reporter.case_finished()
            else:
                jobs.append((case, paths))
        units = _work_units(jobs, self.args.batch_size)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="reader") as pool:
            pending: Future | None = pool.submit(self._read, units[0]) if units else None
            for index, unit in enumerate(units):
                loaded = pending.result()
                pending = pool.submit(self._read, units[index + 1]) if index + 1 < len(units) else None
                if _is_frame(unit[0]):
                    self._run_frames(unit, loaded)
                else:
                    self._run_volume(unit[0], loaded[0])

    def _read(self, unit: list[Job]) -> list[Loaded]:
        loaded = []
        for case, _ in unit:
            started = time.perf_counter()
            try:
                volume: Any = read_volume(case.path, series_uid=self.args.series_uid,
                                          volume_index=self.args.volume_index)
            except Exception as err:  # noqa: BLE001 - reported when the case's turn comes
                volume = err
            loaded.append((volume, time.perf_counter() - started))
        return loaded

    def _run_volume(self, job: Job, loaded: Loaded) -> None:
        case, paths = job
        volume, read_seconds = loaded
        try:
            if isinstance(volume, Exception):
                raise volume
            self._check_format(case, volume, paths)
            started = time.perf_counter()
            axis = self.args.axis  # the Predictor segments a single slice in its own plane
            if volume.shape_kji[0] == 1 and axis != "axial":
                logger.warning("%s: a single slice; --axis %s does not apply, its own plane "
                               "is segmented", case.path, axis)
            total = self.predictor.count_slices(volume, axis, self.slice_range)
            self.reporter.event(event="case_start", case=case.name, slices=total)
            result = self.predictor.predict(
                volume, axis=axis, slice_range=self.slice_range, tta=self.args.tta,
                postprocess=self.args.postprocess,
                return_probabilities=self.args.save_probabilities,
                progress=self.reporter.slices(case.name, total),
            )
            timings = dict(self.predictor.last_times.as_dict())
            timings["write"] = self._write(result, paths)
            self._succeeded(case, volume, paths, timings, read_seconds,
                            time.perf_counter() - started, total)
        except Exception as err:  # noqa: BLE001 - one bad case must not stop the batch
            self._failed(case, err)

    def _run_frames(self, jobs: list[Job], loaded: list[Loaded]) -> None:
        """PNG/JPG frames predicted together (``Predictor.predict_images``)."""
        ready = []
        for (case, paths), (volume, read_seconds) in zip(jobs, loaded):
            try:
                if isinstance(volume, Exception):
                    raise volume
                self._check_format(case, volume, paths)
                ready.append((case, paths, volume, read_seconds))
            except Exception as err:  # noqa: BLE001
                self._failed(case, err)
        if not ready:
            return
        started = time.perf_counter()
        try:
            for case, *_ in ready:
                self.reporter.event(event="case_start", case=case.name, slices=1)
            results = self.predictor.predict_images(
                [volume for *_, volume, _ in ready], tta=self.args.tta,
                postprocess=self.args.postprocess,
                return_probabilities=self.args.save_probabilities,
            )
        except Exception as err:  # noqa: BLE001
            if len(ready) == 1:
                self._failed(ready[0][0], err)
            else:  # find the bad frame(s): one at a time
                for case, paths, volume, read_seconds in ready:
                    self._run_frames([(case, paths)], [(volume, read_seconds)])
            return
        shared = {k: v / len(ready) for k, v in self.predictor.last_times.as_dict().items()}
        shared_seconds = (time.perf_counter() - started) / len(ready)
        for (case, paths, volume, read_seconds), result in zip(ready, results):
            try:
                self.reporter.event(event="slices", case=case.name, done=1, total=1)
                written = time.perf_counter()
                timings = {**shared, "write": self._write(result, paths)}
                self._succeeded(case, volume, paths, timings, read_seconds,
                                shared_seconds + time.perf_counter() - written, 1)
            except Exception as err:  # noqa: BLE001
                self._failed(case, err)

    @staticmethod
    def _check_format(case: Case, volume: Volume, paths: list[Path]) -> None:
        if paths[0].name.endswith(".dcm") and not volume.is_dicom:
            raise ValueError(f"{case.path}: --format dcm (DICOM SEG) needs DICOM input; "
                             "use --format nii.gz or seg.nrrd")
        if paths[0].name.endswith(".dcm"):
            dicom_seg_sources(volume)  # refuses unusable sources before the model runs

    def _write(self, result: Volume | tuple[Volume, Volume], paths: list[Path]) -> float:
        """Write labels (and probabilities); returns the seconds it took."""
        started = time.perf_counter()
        labels, probabilities = result if self.args.save_probabilities else (result, None)
        writes = [(paths[0], lambda: write_labels(labels, paths[0], self.predictor.metadata.labels))]
        if probabilities is not None:
            writes.append((paths[1], lambda: write_probabilities(probabilities, paths[1])))
        for path, write in writes:
            try:
                write()
            except OSError as err:  # disk full, folder removed, permissions
                raise OSError(f"cannot write {path}: {err.strerror or err}") from err
        return time.perf_counter() - started

    def _succeeded(self, case: Case, volume: Volume, paths: list[Path],
                   timings: dict[str, float], read_seconds: float, busy_seconds: float,
                   slices: int) -> None:
        timings = {k: round(v, 3) for k, v in {"read": read_seconds, **timings}.items()}
        seconds = round(read_seconds + busy_seconds, 3)
        record: dict[str, Any] = {
            "case": case.name, "input": str(case.path), "status": "ok",
            "output": str(paths[0]), "seconds": seconds, "timings": timings,
            "shape_kji": list(volume.shape_kji), "slices": slices,
        }
        if "series_uid" in volume.meta:
            record["series_uid"] = volume.meta["series_uid"]
            record["series_in_folder"] = volume.meta.get("series_in_folder")
        self.records.append(record)
        self.reporter.event(event="case_done", case=case.name, output=str(paths[0]),
                            seconds=seconds, timings=timings)
        stages = ", ".join(f"{k} {v:.2f}s" for k, v in timings.items())
        self.reporter.say(f"{case.name}: {seconds:.2f}s ({stages}) -> {paths[0]}")
        self.reporter.case_finished()

    def _failed(self, case: Case, err: Exception) -> None:
        message = str(err) if str(case.path) in str(err) else f"{case.path}: {err}"
        if isinstance(err, torch.cuda.OutOfMemoryError):
            message += f" (GPU out of memory: try --batch-size {max(1, self.args.batch_size // 2)})"
        logger.debug("case %s failed", case.name, exc_info=err)
        self.records.append({"case": case.name, "input": str(case.path), "status": "failed",
                             "error": message})
        self.reporter.event(event="case_error", case=case.name, error=message)
        self.reporter.say(f"{case.name}: FAILED: {message}")
        self.reporter.case_finished()


if __name__ == "__main__":
    raise SystemExit(main())
