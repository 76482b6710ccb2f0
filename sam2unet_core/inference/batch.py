"""Segment a file or a folder of cases: the library under ``sam2unet-predict``.

:func:`predict_from_files` finds the cases (nnU-Net style: ``CASE_0000.nii.gz`` gives
``CASE.nii.gz``), keeps this run's part of them (``num_parts``/``part_id``), removes the
half-written files killed runs left, skips finished cases (outputs that exist and read
back; unless ``overwrite``), reads the next case and writes the previous one in background
threads while the model runs on the current one, writes every output atomically and
``predict_summary.json`` (per part: ``predict_summary_partK_of_N.json``).
A case that fails is recorded (file and cause) and the run goes on.

Progress is reported through ``on_event(event: dict)``, one dict per event with its name
under ``"event"`` (see :data:`EVENTS`); the CLI turns them into tqdm bars or JSON lines.
A ``case_error`` (and its summary record) carries the ``kind``, ``field`` and ``value`` of a
typed error (:mod:`sam2unet_core.errors`), so callers decide without reading the message.
Volumes are sliced along the model's plane (or ``options.axis``); PNG/JPG frames are
predicted together (:meth:`Predictor.predict_images`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..errors import OptionError, OutOfMemoryError, error_fields
from ..io.atomic import atomic_write, remove_partials
from ..io.cases import Case, find_cases, select_part
from ..io.orientation import PLANES, check_planes
from ..io.readers import PICTURE_SUFFIXES, read_volume
from ..io.volume import Volume
from ..io.writers import (LABEL_FORMATS, dicom_seg_sources, output_suffix, unreadable_output, write_labels,
                          write_probabilities)
from .engine import Prediction, Predictor
from .postprocess import check_steps

__all__ = ["EVENTS", "CaseOutputs", "CaseRecord", "PredictOptions", "RunSummary", "predict_from_files",
           "select_cases", "summary_path"]

logger = logging.getLogger(__name__)

PROBABILITY_FOLDER = "probabilities"
STATISTICS_SUFFIX = ".statistics"  # CASE.statistics.json / CASE.statistics.csv
QC_SUFFIX = ".qc.png"
WRITE_PROBE_PREFIX = ".write-test-"  # file written once to check the output folder
EVENTS = ("start", "case_start", "slices", "case_done", "case_skipped", "case_error", "done")
EventFn = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class PredictOptions:
    """How :func:`predict_from_files` runs; every field has the CLI's default.

    ``axis``: the one plane of the 2D slices; ``planes``: several planes, fused; both None:
    the model's planes (fused when it was trained on several). ``output_format``: one
    of ``LABEL_FORMATS``, None for nii.gz (volumes) / png (PNG/JPG frames).
    ``slice_range``: half-open ``(start, stop)`` along the slicing axis.
    ``series_uid``/``volume_index``: which DICOM series / 4D volume to read.
    ``postprocess``: steps of ``POSTPROCESS_STEPS``. ``save_probabilities``: float maps
    in ``probabilities/``. ``statistics``: ``CASE.statistics.json``/``.csv`` per label
    (``sam2unet_core.statistics``); ``qc_png``: ``CASE.qc.png`` (``sam2unet_core.qc``);
    both for volumes only. ``batch_size`` of the Predictor groups PNG/JPG frames.
    """

    axis: str | None = None
    planes: tuple[str, ...] | None = None
    output_format: str | None = None
    overwrite: bool = False
    num_parts: int = 1
    part_id: int = 0
    slice_range: tuple[int, int] | None = None
    series_uid: str | None = None
    volume_index: int | None = None
    tta: bool = False
    postprocess: tuple[str, ...] = ()
    save_probabilities: bool = False
    statistics: bool = False
    qc_png: bool = False

    def validate(self) -> None:
        """Raise :class:`OptionError` (a ``ValueError``) naming the wrong field (``field``,
        ``value``) and saying what values work."""
        if self.axis is not None and self.axis not in PLANES:
            raise OptionError(f"axis {self.axis!r} is not one of {sorted(PLANES)} (or None for "
                              "the model's plane)", "axis", self.axis)
        if self.planes is not None:
            check_planes(self.planes)
            if self.axis is not None:
                raise OptionError(f"planes {list(self.planes)} and axis {self.axis!r} both given; "
                                  "give one", "planes", list(self.planes))
        if self.planes is not None and len(self.planes) > 1 and self.slice_range is not None:
            raise OptionError("slice range applies to one plane; it cannot be combined with "
                              "several fused planes",  # without planes: the model's main plane
                              "slice_range", list(self.slice_range))
        if self.output_format is not None and self.output_format not in LABEL_FORMATS:
            raise OptionError(f"output format {self.output_format!r} is not one of {LABEL_FORMATS}",
                              "output_format", self.output_format)
        if self.num_parts < 1 or not 0 <= self.part_id < self.num_parts:
            raise OptionError(f"part_id must be in [0, {self.num_parts}) and num_parts >= 1, "
                              f"got part {self.part_id} of {self.num_parts}", "part_id", self.part_id)
        if self.slice_range is not None and not 0 <= self.slice_range[0] < self.slice_range[1]:
            raise OptionError(f"slice range must be (start, stop) with 0 <= start < stop, got "
                              f"{self.slice_range}", "slice_range", list(self.slice_range))
        check_steps(self.postprocess)

    def label_format(self, case: Case) -> str:
        """The format of ``case``'s label file: ``output_format``, else png for PNG/JPG
        frames and nii.gz for volumes."""
        if self.output_format is not None:
            return self.output_format
        return "png" if case.path.suffix.lower() in PICTURE_SUFFIXES else "nii.gz"


@dataclass(frozen=True)
class CaseOutputs:
    """Where one case's outputs go: the label file (in ``label_format``, a ``LABEL_FORMATS``
    entry) and, each only when asked for, the float probability map, the statistics JSON and
    CSV and the QC picture (the last three for volumes only)."""

    labels: Path
    label_format: str
    probabilities: Path | None = None
    statistics_json: Path | None = None
    statistics_csv: Path | None = None
    qc_png: Path | None = None

    @classmethod
    def plan(cls, case: Case, output_dir: Path, options: PredictOptions) -> CaseOutputs:
        chosen = options.label_format(case)
        volume = chosen != "png"  # statistics and QC pictures are for volumes
        statistics = volume and options.statistics
        return cls(
            labels=output_dir / (case.name + output_suffix(chosen)),
            label_format=chosen,
            probabilities=(output_dir / PROBABILITY_FOLDER / f"{case.name}.nii.gz"
                           if options.save_probabilities else None),
            statistics_json=output_dir / f"{case.name}{STATISTICS_SUFFIX}.json" if statistics else None,
            statistics_csv=output_dir / f"{case.name}{STATISTICS_SUFFIX}.csv" if statistics else None,
            qc_png=output_dir / f"{case.name}{QC_SUFFIX}" if volume and options.qc_png else None,
        )

    @property
    def paths(self) -> list[Path]:
        """Every output file of the case, the label file first."""
        return [path for path in (self.labels, self.probabilities, self.statistics_json,
                                  self.statistics_csv, self.qc_png) if path is not None]


@dataclass(frozen=True)
class CaseRecord:
    """What became of one case: a line of the summary file and of the run's events.

    ``status``: ok, failed or skipped. ``output``: the label file (ok, skipped). ``error``:
    the cause (failed), with ``kind``/``field``/``value`` of a typed error
    (``sam2unet_core.errors``). ``seconds``, ``timings`` (per stage), ``shape_kji``,
    ``slices`` and, for DICOM input, ``series_uid``/``series_in_folder``: for ok cases.
    """

    case: str
    input: str
    status: str
    output: str | None = None
    error: str | None = None
    kind: str | None = None
    field: str | None = None
    value: Any = None
    seconds: float | None = None
    timings: dict[str, float] | None = None
    shape_kji: list[int] | None = None
    slices: int | None = None
    series_uid: str | None = None
    series_in_folder: int | None = None

    @classmethod
    def skipped(cls, case: Case, outputs: CaseOutputs) -> CaseRecord:
        return cls(case.name, str(case.path), "skipped", output=str(outputs.labels))

    @classmethod
    def failed(cls, name: str, input_path: Path, err: Exception) -> CaseRecord:
        """The record of a case (or of the summary file, ``name``) that ``err`` stopped;
        the message names ``input_path`` (once)."""
        message = str(err) if str(input_path) in str(err) else f"{input_path}: {err}"
        return cls(name, str(input_path), "failed", error=message, **error_fields(err))

    def as_dict(self) -> dict[str, Any]:
        """The summary file's entry: the fields of this status (see the class docstring)."""
        entry: dict[str, Any] = {"case": self.case, "input": self.input, "status": self.status}
        if self.status == "failed":
            entry["error"] = self.error
            if self.kind is not None:
                entry["kind"] = self.kind
            if self.field is not None:
                entry.update(field=self.field, value=self.value)
            return entry
        entry["output"] = self.output
        if self.status == "ok":
            entry.update(seconds=self.seconds, timings=self.timings, shape_kji=self.shape_kji,
                         slices=self.slices)
            if self.series_uid is not None:
                entry.update(series_uid=self.series_uid, series_in_folder=self.series_in_folder)
        return entry

    def event(self) -> dict[str, Any]:
        """The run's event for this record (``case_done``, ``case_skipped`` or ``case_error``)."""
        if self.status == "ok":
            return {"event": "case_done", "case": self.case, "output": self.output,
                    "seconds": self.seconds, "timings": self.timings}
        if self.status == "skipped":
            return {"event": "case_skipped", "case": self.case, "output": self.output}
        fields = {key: value for key, value in self.as_dict().items() if key in ("kind", "field", "value")}
        return {"event": "case_error", "case": self.case, "error": self.error, **fields}


@dataclass
class RunSummary:
    """What one :func:`predict_from_files` call did; ``cases``: a record per case, in order
    (the summary file's ``cases``)."""

    cases: list[CaseRecord] = field(default_factory=list)
    interruption: KeyboardInterrupt | None = None  # what stopped the run (Ctrl-C, a signal)
    seconds: float = 0.0
    summary_path: Path | None = None

    @property
    def interrupted(self) -> bool:
        return self.interruption is not None

    def count(self, status: str) -> int:
        return sum(case.status == status for case in self.cases)

    @property
    def counts(self) -> dict[str, int]:
        return {status: self.count(status) for status in ("ok", "failed", "skipped")}


def summary_path(output_dir: Path, options: PredictOptions) -> Path:
    if options.num_parts == 1:
        return output_dir / "predict_summary.json"
    return output_dir / f"predict_summary_part{options.part_id}_of_{options.num_parts}.json"


def select_cases(inputs: Path, output_dir: Path, options: PredictOptions) -> list[Case]:
    """Check the options and the folders and return this part's cases (before any model
    work): ``ValueError`` for bad options, inputs or an output folder equal to the input
    folder; ``OSError`` when the output folder cannot be written."""
    options.validate()
    inputs, output_dir = Path(inputs), Path(output_dir)
    if inputs.is_dir() and output_dir.resolve() == inputs.resolve():
        raise OptionError("the output folder must differ from the input folder (outputs would "
                          "be read as inputs on the next run)", "output_dir", str(output_dir))
    cases = select_part(find_cases(inputs), options.num_parts, options.part_id)
    if output_dir.exists() and not output_dir.is_dir():
        raise OSError(f"cannot write to the output folder {output_dir}: it is a file, not a "
                      "folder; name a folder (new or existing)")
    probe = output_dir / f"{WRITE_PROBE_PREFIX}{os.getpid()}"
    try:  # an unwritable output folder stops the run before any work
        output_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
    except OSError as err:
        raise OSError(f"cannot write to the output folder {output_dir}: {err.strerror or err}") from err
    finally:
        if probe.exists():  # also when writing it failed (a full disk)
            probe.unlink()
    return cases


def predict_from_files(predictor: Predictor, inputs: str | os.PathLike, output_dir: str | os.PathLike,
                       options: PredictOptions = PredictOptions(), on_event: EventFn | None = None,
                       record: Mapping[str, Any] | None = None,
                       cases: Sequence[Case] | None = None) -> RunSummary:
    """Segment the file, DICOM folder or folder of cases ``inputs`` into ``output_dir``.

    ``record``: extra top-level fields for the summary file (the CLI stores the model path
    and its arguments). ``cases``: what :func:`select_cases` returned for these inputs,
    output folder and options (a caller that checked its arguments with it before loading
    the model hands its plan over: the folder is walked once); None: selected here.
    A ``KeyboardInterrupt`` (Ctrl-C, or what a caller's signal handler raises) stops the
    run after recording what was done (``interrupted``, ``interruption``).
    Raises ``ValueError``/``OSError`` as :func:`select_cases` before any case runs.
    """
    inputs, output_dir = Path(inputs), Path(output_dir)
    if cases is None:
        cases = select_cases(inputs, output_dir, options)
    run = _CaseRunner(predictor, output_dir, options, on_event or (lambda event: None))
    run.emit("start", cases=len(cases))
    started = time.perf_counter()
    try:
        run.run(cases)
    except KeyboardInterrupt as stop:
        run.summary.interruption = stop
    run.summary.seconds = round(time.perf_counter() - started, 3)
    path = summary_path(output_dir, options)
    content = {
        **(record or {}),
        "device": predictor.description,
        "plane": predictor.metadata.plane,
        "planes": list(predictor.metadata.trained_planes),
        "labels": {label.value: label.name for label in predictor.metadata.labels},
        "options": asdict(options),
        "cases": [case.as_dict() for case in run.summary.cases],
        **run.summary.counts,
        "interrupted": run.summary.interrupted,
        "seconds": run.summary.seconds,
    }
    try:
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(content, indent=2)))
        run.summary.summary_path = path
    except OSError as err:
        run.summary.cases.append(CaseRecord(path.name, str(inputs), "failed",
                                            error=f"cannot write the summary {path}: {err.strerror or err}"))
    run.emit("done", **run.summary.counts)
    return run.summary


Job = tuple[Case, CaseOutputs]
Loaded = tuple[Any, float]  # (Volume, or the exception reading raised; seconds spent)
Ready = tuple[Case, CaseOutputs, Volume, float]  # a frame read and checked, its read seconds


def _is_frame(job: Job) -> bool:
    return job[0].path.suffix.lower() in PICTURE_SUFFIXES


class _CaseRunner:
    """Runs the cases of one :func:`predict_from_files` call and records each one."""

    def __init__(self, predictor: Predictor, output_dir: Path, options: PredictOptions,
                 on_event: EventFn) -> None:
        self.predictor = predictor
        self.output_dir = output_dir
        self.options = options
        self.on_event = on_event
        self.summary = RunSummary()
        self._writer: ThreadPoolExecutor | None = None
        self._writing: Callable[[], None] | None = None  # waits for a background write, records the case

    def emit(self, name: str, **fields: Any) -> None:
        self.on_event({"event": name, **fields})

    def record(self, record: CaseRecord) -> None:
        """Add ``record`` to the summary and send its event."""
        self.summary.cases.append(record)
        self.on_event(record.event())

    def run(self, cases: Sequence[Case]) -> None:
        """Remove what killed runs left half-written for these cases, skip finished cases,
        then predict the others, reading the next unit of work in a background thread."""
        outputs = [CaseOutputs.plan(case, self.output_dir, self.options) for case in cases]
        remove_partials([summary_path(self.output_dir, self.options),
                         *(path for planned in outputs for path in planned.paths)])
        jobs = []
        for case, planned in zip(cases, outputs):
            if not self.options.overwrite and self._finished(case, planned):
                logger.info("%s: already done (%s), skipped", case.name, planned.labels)
                self.record(CaseRecord.skipped(case, planned))
            else:
                jobs.append((case, planned))
        units = self._work_units(jobs)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="reader") as pool, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer") as self._writer:
            try:
                pending: Future | None = pool.submit(self._read, units[0]) if units else None
                for index, unit in enumerate(units):
                    loaded = pending.result()
                    pending = pool.submit(self._read, units[index + 1]) if index + 1 < len(units) else None
                    if _is_frame(unit[0]):
                        self._run_frames(unit, loaded)
                    else:
                        self._run_volume(unit[0], loaded[0])
            finally:  # also when interrupted: the previous case's outputs are finished and recorded
                self._finish_writing()

    def _finish_writing(self) -> None:
        """Wait for the outputs of the case written in the background, then record it (ok or
        failed), so that cases are recorded and reported in their order."""
        if self._writing is not None:
            record, self._writing = self._writing, None
            record()

    @staticmethod
    def _finished(case: Case, outputs: CaseOutputs) -> bool:
        """Whether every output of ``case`` exists and reads back; an output that exists
        but cannot be read (a 0-byte file of a full disk...) is redone, with a warning."""
        if not all(path.exists() for path in outputs.paths):
            return False
        for path in outputs.paths:
            problem = unreadable_output(path)
            if problem is not None:
                logger.warning("%s: the existing output %s cannot be read (%s); redoing the case",
                               case.name, path, problem)
                return False
        return True

    def _work_units(self, jobs: list[Job]) -> list[list[Job]]:
        """Volumes one by one; runs of consecutive PNG/JPG frames in groups of the
        predictor's ``batch_size``, which share runner batches."""
        units: list[list[Job]] = []
        for job in jobs:
            if (_is_frame(job) and units and _is_frame(units[-1][0])
                    and len(units[-1]) < self.predictor.batch_size):
                units[-1].append(job)
            else:
                units.append([job])
        return units

    def _read(self, unit: list[Job]) -> list[Loaded]:
        loaded = []
        for case, _ in unit:
            started = time.perf_counter()
            try:
                volume: Any = read_volume(case.path, series_uid=self.options.series_uid,
                                          volume_index=self.options.volume_index)
            except Exception as err:  # noqa: BLE001 - reported when the case's turn comes
                volume = err
            loaded.append((volume, time.perf_counter() - started))
        return loaded

    def _run_volume(self, job: Job, loaded: Loaded) -> None:
        case, outputs = job
        volume, read_seconds = loaded
        try:
            if isinstance(volume, Exception):
                raise volume
            self._check_format(case, volume, outputs)
            started = time.perf_counter()
            options = self.options
            total = self.predictor.count_slices(volume, options.axis, options.slice_range,
                                                options.planes)
            self.emit("case_start", case=case.name, slices=total)
            prediction = self.predictor.predict(
                volume, axis=options.axis, planes=options.planes,
                slice_range=options.slice_range, tta=options.tta,
                postprocess=options.postprocess, probabilities=options.save_probabilities,
                progress=lambda done, all_: self.emit("slices", case=case.name, done=done, total=all_),
            )
            busy_seconds = time.perf_counter() - started
        except Exception as err:  # noqa: BLE001 - one bad case must not stop the batch
            self._finish_writing()
            self._failed(case, err)
            return
        self._finish_writing()  # the previous case, written while the model ran on this one
        writing = self._writer.submit(self.write_case, prediction, outputs, volume)

        def record() -> None:
            try:
                write_seconds = writing.result()
            except Exception as err:  # noqa: BLE001
                self._failed(case, err)
                return
            timings = {**prediction.times.as_dict(), "write": write_seconds}
            self._succeeded(case, volume, outputs, timings, read_seconds, busy_seconds + write_seconds, total)

        self._writing = record

    def _run_frames(self, jobs: list[Job], loaded: list[Loaded]) -> None:
        """PNG/JPG frames predicted together (``Predictor.predict_images``), written at once."""
        self._finish_writing()
        ready: list[Ready] = []
        for (case, outputs), (volume, read_seconds) in zip(jobs, loaded):
            try:
                if isinstance(volume, Exception):
                    raise volume
                self._check_format(case, volume, outputs)
                ready.append((case, outputs, volume, read_seconds))
            except Exception as err:  # noqa: BLE001
                self._failed(case, err)
        for case, *_ in ready:
            self.emit("case_start", case=case.name, slices=1)
        if ready:
            self._predict_frames(ready)

    def _predict_frames(self, ready: list[Ready]) -> None:
        """Predict and write frames whose ``case_start`` was sent; when the shared batch
        fails, each frame again on its own, to find the bad one(s)."""
        started = time.perf_counter()
        try:
            predictions = self.predictor.predict_images(
                [volume for *_, volume, _ in ready], tta=self.options.tta,
                postprocess=self.options.postprocess, probabilities=self.options.save_probabilities)
        except Exception as err:  # noqa: BLE001
            if len(ready) == 1:
                self._failed(ready[0][0], err)
            else:
                for frame in ready:
                    self._predict_frames([frame])
            return
        shared_seconds = (time.perf_counter() - started) / len(ready)
        for (case, outputs, volume, read_seconds), prediction in zip(ready, predictions):
            try:
                self.emit("slices", case=case.name, done=1, total=1)
                written = time.perf_counter()
                timings = {**prediction.times.as_dict(), "write": self.write_case(prediction, outputs)}
                self._succeeded(case, volume, outputs, timings, read_seconds,
                                shared_seconds + time.perf_counter() - written, 1)
            except Exception as err:  # noqa: BLE001
                self._failed(case, err)

    @staticmethod
    def _check_format(case: Case, volume: Volume, outputs: CaseOutputs) -> None:
        if outputs.label_format == "dcm" and not volume.is_dicom:
            raise OptionError(f"{case.path}: the dcm output format (DICOM SEG) needs DICOM input; "
                              "use nii.gz or seg.nrrd", "output_format", outputs.label_format)
        if outputs.label_format == "dcm":
            dicom_seg_sources(volume)  # refuses unusable sources before the model runs

    def write_case(self, prediction: Prediction, outputs: CaseOutputs, image: Volume | None = None) -> float:
        """The one per-case write step: labels (and probabilities, statistics, QC picture,
        each where ``outputs`` has a path for it); ``image`` is the input volume the
        statistics and QC picture need. Returns the seconds it took."""
        started = time.perf_counter()
        metadata = self.predictor.metadata
        labels = prediction.labels
        writes = [(outputs.labels, lambda: write_labels(labels, outputs.labels, metadata.labels))]
        if prediction.probabilities is not None and outputs.probabilities is not None:
            writes.append((outputs.probabilities,
                           lambda: write_probabilities(prediction.probabilities, outputs.probabilities)))
        if image is not None and outputs.statistics_json is not None:
            from ..statistics import label_statistics, write_statistics

            writes.append((outputs.statistics_json, lambda: write_statistics(
                label_statistics(labels, image, metadata.labels, prediction.agreement),
                outputs.statistics_json, outputs.statistics_csv)))
        if image is not None and outputs.qc_png is not None:
            from ..qc import write_qc_png

            disputed = None if prediction.agreement is None else prediction.agreement.disputed
            writes.append((outputs.qc_png,
                           lambda: write_qc_png(labels, image, metadata.labels, outputs.qc_png, disputed)))
        for path, write in writes:
            try:
                write()
            except OSError as err:  # disk full, folder removed, permissions
                raise OSError(f"cannot write {path}: {err.strerror or err}") from err
        return time.perf_counter() - started

    def _succeeded(self, case: Case, volume: Volume, outputs: CaseOutputs, timings: dict[str, float],
                   read_seconds: float, busy_seconds: float, slices: int) -> None:
        dicom = "series_uid" in volume.meta
        self.record(CaseRecord(
            case.name, str(case.path), "ok", output=str(outputs.labels),
            seconds=round(read_seconds + busy_seconds, 3),
            timings={k: round(v, 3) for k, v in {"read": read_seconds, **timings}.items()},
            shape_kji=list(volume.shape_kji), slices=slices,
            series_uid=volume.meta["series_uid"] if dicom else None,
            series_in_folder=volume.meta.get("series_in_folder") if dicom else None,
        ))

    def _failed(self, case: Case, err: Exception) -> None:
        logger.debug("case %s failed", case.name, exc_info=err)
        if type(err).__name__ == "OutOfMemoryError" and not isinstance(err, OutOfMemoryError):
            # torch.cuda.OutOfMemoryError (no torch import here): a smaller batch needs less
            smaller = max(1, self.predictor.batch_size // 2)
            err = OutOfMemoryError(f"{err}; GPU out of memory: try a batch size of {smaller}",
                                   "batch_size", smaller)
        self.record(CaseRecord.failed(case.name, case.path, err))
