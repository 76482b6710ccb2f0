"""The Train button: training pairs from the scene, their export to files, ``sam2unet-train
--request REQUEST.json --progress jsonl`` in the background, progress, Cancel, the new model.

A training pair is a scalar volume and a segmentation node. The chosen segments are matched
in every pair by name (case and spacing ignored), else by terminology where the segment
carries a specific one; a pair that lacks a chosen segment is reported before anything runs.

Geometry: each pair is written as the volume (``slicer.util.exportNode``, NRRD, exactly as
the Segment button writes its input: the volume's own frame) and a label map on the
volume's own voxel grid, made the way the Segment button's output comes in, the other way
round: a label volume cloned from the volume (``CreateAndAddLabelVolume``: same grid, same
parent transform) is filled by Slicer's ``ExportSegmentsToLabelmapNode`` with the volume as
reference geometry (the whole grid) from a copy of the segmentation whose parent transform
is hardened (so Slicer resamples once, through the volume's parent transform), so labels
and image line up in physical space. The label map's grid is then checked with
``LabelImport.checkSameGrid``. Every node made for this is removed again: the user's nodes
and node IDs stay as they were.

Files: all that a run writes lives in one hidden working folder next to the output model
(``.SAM2UNetTraining-*``): the exported pairs, the request, the library's temporary files
(``TMPDIR`` points there) and the model, which is renamed to the output path (same folder:
an atomic rename) only when the training succeeded. Cancel kills the process tree and
deletes that folder: no model file, no temporary folder.

Threading as in ``SegmentationLogic``: a child process on a ``ProcessRunnerProtocol``;
``poll()`` (a ``qt.QTimer`` on the main thread) delivers its JSON lines. ``slicer`` and
``vtk`` are passed in.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .LabelImport import TERMINOLOGY_TAG, checkSameGrid, volumeIjkToRas
from .ModelInfo import MetadataReader, readCheckpointMetadata
from .Parameters import TrainingBase, TrainingSettings, buildTrainArgs, processEnvironment
from .ProcessRunner import ProcessRunnerProtocol, findPythonSlicer, parseProgressLine, waitForResult
from .SegmentationLogic import RunStatus

__all__ = [
    "TrainingPair",
    "TrainingProgress",
    "TrainingResult",
    "segmentNames",
    "findSegmentId",
    "missingSegments",
    "trainingLabels",
    "exportPair",
    "trainingRequest",
    "TrainingLogic",
]

logger = logging.getLogger(__name__)

_TEMPORARY_NODE_NAME = "__SAM2UNetSlicer_training__"
WORK_FOLDER_PREFIX = ".SAM2UNetTraining-"


@dataclass
class TrainingPair:
    """One training case of the scene: a scalar volume and the segmentation drawn on it."""

    volumeNode: Any
    segmentationNode: Any

    def describe(self) -> str:
        return f"{self.volumeNode.GetName()} + {self.segmentationNode.GetName()}"


@dataclass
class TrainingProgress:
    """Where a training stands, from its last ``train_step`` and ``validation`` events."""

    step: int = 0
    loss: float | None = None
    elapsedSeconds: float = 0.0
    remainingSeconds: float | None = None
    dice: float | None = None  # mean validation Dice of the last validation

    def fraction(self) -> float:
        """Share of the time budget used, 0..1 (0 while unknown)."""
        if self.remainingSeconds is None:
            return 0.0
        total = self.elapsedSeconds + self.remainingSeconds
        return min(1.0, self.elapsedSeconds / total) if total > 0 else 1.0


@dataclass
class TrainingResult:
    """Outcome of one Train run, given to ``TrainingLogic.onFinished``."""

    status: RunStatus
    message: str
    seconds: float
    modelPath: Path | None = None  # the written model; None unless succeeded
    bestDice: float | None = None
    steps: int = 0


@dataclass
class _Run:
    workDir: Path
    output: Path
    startTime: float
    progress: TrainingProgress = field(default_factory=TrainingProgress)
    modelPath: Path | None = None
    bestDice: float | None = None
    errors: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------- segments
def _normalisedName(name: str) -> str:
    return " ".join(name.lower().split())


def _segmentIds(segmentationNode: Any) -> list[str]:
    segmentation = segmentationNode.GetSegmentation()
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


def segmentNames(segmentationNode: Any) -> list[str]:
    """Names of the segments of a segmentation node, in its order."""
    segmentation = segmentationNode.GetSegmentation()
    return [segmentation.GetSegment(segmentId).GetName() for segmentId in _segmentIds(segmentationNode)]


def _segmentCodes(vtk: Any, segment: Any) -> Any:
    """(category, type, modifier) ``Code``s of a segment's terminology tag; None when it says
    nothing specific (``sam2unet_core.terminology.codes_from_slicer_terminology``)."""
    from sam2unet_core.terminology import codes_from_slicer_terminology

    text = vtk.reference("")
    if not segment.GetTag(TERMINOLOGY_TAG, text):
        return None
    return codes_from_slicer_terminology(str(text))


def findSegmentId(vtk: Any, segmentationNode: Any, name: str, codes: Any = None) -> str | None:
    """The ID of the segment called ``name`` (case and spacing ignored); else of the one
    segment whose terminology equals ``codes`` (when given); else None."""
    segmentation = segmentationNode.GetSegmentation()
    ids = _segmentIds(segmentationNode)
    for segmentId in ids:
        if _normalisedName(segmentation.GetSegment(segmentId).GetName()) == _normalisedName(name):
            return segmentId
    if codes is not None:
        sameCodes = [i for i in ids if _segmentCodes(vtk, segmentation.GetSegment(i)) == codes]
        if len(sameCodes) == 1:
            return sameCodes[0]
    return None


def trainingLabels(vtk: Any, pairs: Sequence[TrainingPair], names: Sequence[str],
                   baseLabels: Sequence[Any] = ()) -> list[Any]:
    """The labels 1..K of a training: a ``sam2unet_core.metadata.LabelInfo`` per chosen
    segment name, with the colour and terminology of the first pair that has it.

    ``baseLabels`` are the labels of a model being fine-tuned: chosen names among them come
    first, in the model's order (they keep their channels), then the new ones in the given
    order. A name no pair has raises ``ValueError``.
    """
    from sam2unet_core.metadata import LabelInfo

    known = [label.name for label in baseLabels if any(_normalisedName(label.name) == _normalisedName(n) for n in names)]
    ordered = known + [n for n in names if _normalisedName(n) not in {_normalisedName(k) for k in known}]
    labels = []
    for value, name in enumerate(ordered, start=1):
        for pair in pairs:
            segmentId = findSegmentId(vtk, pair.segmentationNode, name)
            if segmentId:
                segment = pair.segmentationNode.GetSegmentation().GetSegment(segmentId)
                color = tuple(int(round(255 * channel)) for channel in segment.GetColor())
                codes = _segmentCodes(vtk, segment)
                category, type_, modifier = codes if codes else (None, None, None)
                labels.append(LabelInfo(value, name, color, category, type_, modifier))
                break
        else:
            raise ValueError(f"no training pair has a segment called {name!r}")
    return labels


def _labelCodes(label: Any) -> Any:
    """(category, type, modifier) of a ``LabelInfo`` that has its own terminology, else None."""
    return (label.category, label.type, label.modifier) if label.type is not None else None


def missingSegments(vtk: Any, pairs: Sequence[TrainingPair], labels: Sequence[Any]) -> list[str]:
    """One sentence per pair that lacks a segment of ``labels`` (matched by name, else by
    terminology); empty when every pair has every label."""
    problems = []
    for pair in pairs:
        missing = [label.name for label in labels
                   if findSegmentId(vtk, pair.segmentationNode, label.name, _labelCodes(label)) is None]
        if missing:
            problems.append(f"{pair.segmentationNode.GetName()} (the segmentation of {pair.volumeNode.GetName()}) "
                            f"has no segment {', '.join(repr(name) for name in missing)}")
    return problems


# ---------------------------------------------------------------------------------- export
def exportPair(slicer: Any, vtk: Any, pair: TrainingPair, segmentIds: Sequence[str], imagePath: Path,
               labelPath: Path) -> None:
    """Write the pair's volume to ``imagePath`` and its segments ``segmentIds`` (label value
    n + 1 for entry n) as a label map on the volume's voxel grid to ``labelPath`` (see the
    module docstring). Nodes made here are removed again, also on failure."""
    scene = slicer.mrmlScene
    volume = pair.volumeNode
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        if not slicer.util.exportNode(volume, str(imagePath), {}):
            raise RuntimeError(f"could not write {volume.GetName()} to {imagePath}; see the application log")
        labelNode = slicer.modules.volumes.logic().CreateAndAddLabelVolume(volume, _TEMPORARY_NODE_NAME)
        segmentationCopy = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", _TEMPORARY_NODE_NAME)
        segmentationCopy.GetSegmentation().DeepCopy(pair.segmentationNode.GetSegmentation())
        segmentationCopy.SetAndObserveTransformNodeID(pair.segmentationNode.GetTransformNodeID())
        slicer.vtkSlicerTransformLogic.hardenTransform(segmentationCopy)  # the copy now lies in world space
        idArray = vtk.vtkStringArray()
        for segmentId in segmentIds:
            idArray.InsertNextValue(segmentId)
        if not slicer.modules.segmentations.logic().ExportSegmentsToLabelmapNode(
                segmentationCopy, idArray, labelNode, volume, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY):
            raise RuntimeError(f"Slicer could not export the segments of {pair.segmentationNode.GetName()} "
                               f"onto {volume.GetName()}")
        checkSameGrid(labelPath, slicer.util.arrayFromVolume(labelNode), volumeIjkToRas(slicer, vtk, labelNode),
                      volume.GetImageData().GetDimensions(), volumeIjkToRas(slicer, vtk, volume))
        if not slicer.util.exportNode(labelNode, str(labelPath), {}):
            raise RuntimeError(f"could not write the label map of {pair.describe()} to {labelPath}")
    finally:
        made = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in reversed(made):
            if node.GetID() not in before:
                scene.RemoveNode(node)


def trainingRequest(pairs: Sequence[tuple[Path, Path, str]], labels: Sequence[Any], output: Path,
                    settings: TrainingSettings) -> Any:
    """The ``sam2unet_core.training_request.TrainingRequest`` (torch-free) that
    ``sam2unet-train --request`` carries out, checked by its own validator. ``pairs`` are
    (image, label, name)."""
    from sam2unet_core.training_request import TrainingPair as RequestPair, TrainingRequest

    request = TrainingRequest(
        pairs=[RequestPair(image, label, name) for image, label, name in pairs],
        labels=list(labels), output=output, base=settings.base.value,
        base_path=str(settings.basePath) if settings.base is not TrainingBase.scratch else "",
        plane=settings.plane.value, minutes=float(settings.minutes), device=settings.device.value,
        seed=int(settings.seed))
    request.validate()
    return request


def _fileStem(index: int, name: str) -> str:
    return f"{index:02d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', name).strip('_') or 'volume'}"


# ---------------------------------------------------------------------------------- logic
class TrainingLogic:
    """Runs one training at a time.

    ``slicer``/``vtk`` are the Slicer modules, ``runner`` a ``ProcessRunnerProtocol``.
    Assign ``onLog(text)``, ``onProgress(TrainingProgress)`` and ``onFinished(TrainingResult)``
    to follow a run.
    """

    def __init__(self, slicer: Any, vtk: Any, runner: ProcessRunnerProtocol, pythonExecutable: str | None = None,
                 baseEnvironment: Mapping[str, str] | None = None,
                 metadataReader: MetadataReader | None = None) -> None:
        self._slicer = slicer
        self._vtk = vtk
        self._runner = runner
        self._python = pythonExecutable
        self._baseEnvironment = baseEnvironment
        self._metadataReader = metadataReader
        self._run: _Run | None = None
        self.onLog: Callable[[str], None] = lambda text: None
        self.onProgress: Callable[[TrainingProgress], None] = lambda progress: None
        self.onFinished: Callable[[TrainingResult], None] = lambda result: None

    def isRunning(self) -> bool:
        return self._run is not None

    def labelsFor(self, pairs: Sequence[TrainingPair], names: Sequence[str], settings: TrainingSettings) -> list[Any]:
        """The labels a training of ``names`` on ``pairs`` gets (see :func:`trainingLabels`);
        ``ValueError`` listing every pair that lacks one of them, and for unusable pairs."""
        if not pairs:
            raise ValueError("add at least one training pair (a volume and its segmentation)")
        if not names:
            raise ValueError("choose at least one segment to learn")
        for pair in pairs:
            if pair.volumeNode is None or pair.segmentationNode is None:
                raise ValueError("every training pair needs a volume and a segmentation")
            if pair.volumeNode.GetClassName() != "vtkMRMLScalarVolumeNode":
                raise ValueError(f"{pair.volumeNode.GetName()} is not a scalar volume (a label map or a vector "
                                 f"volume cannot be a training image)")
            if pair.volumeNode.GetImageData() is None:
                raise ValueError(f"{pair.volumeNode.GetName()} has no voxels")
        volumeIds = [pair.volumeNode.GetID() for pair in pairs]
        if len(set(volumeIds)) != len(volumeIds):
            raise ValueError("a volume appears in two training pairs; each volume is one case")
        baseLabels = []
        if settings.base is TrainingBase.model and settings.basePath is not None and settings.basePath.is_file():
            baseLabels = readCheckpointMetadata(settings.basePath, self._metadataReader).labels
        labels = trainingLabels(self._vtk, pairs, names, baseLabels)
        problems = missingSegments(self._vtk, pairs, labels)
        if problems:
            raise ValueError("every training pair must have every chosen segment: " + "; ".join(problems))
        return labels

    def start(self, pairs: Sequence[TrainingPair], names: Sequence[str], settings: TrainingSettings) -> None:
        """Check the pairs, export them, write the request and start the training.

        Raises ``ValueError``/``RuntimeError`` for problems found before the process starts
        (a pair missing a chosen segment first); nothing is then left behind.
        """
        if self._run is not None:
            raise RuntimeError("a training is already running; cancel it first")
        settings.validate()
        labels = self.labelsFor(pairs, names, settings)
        python = self._python or findPythonSlicer()
        output = settings.output.resolve()
        output.parent.mkdir(parents=True, exist_ok=True)
        workDir = Path(tempfile.mkdtemp(prefix=WORK_FOLDER_PREFIX, dir=output.parent))
        try:
            exported = []
            for index, pair in enumerate(pairs):
                stem = _fileStem(index, pair.volumeNode.GetName())
                image, label = workDir / "pairs" / f"{stem}_image.nrrd", workDir / "pairs" / f"{stem}_label.nrrd"
                image.parent.mkdir(exist_ok=True)
                segmentIds = [findSegmentId(self._vtk, pair.segmentationNode, label.name, _labelCodes(label))
                              for label in labels]
                exportPair(self._slicer, self._vtk, pair, segmentIds, image, label)
                exported.append((image, label, stem))
            requestPath = workDir / "request.json"
            request = trainingRequest(exported, labels, workDir / output.name, settings)
            requestPath.write_text(request.to_json(), encoding="utf-8")
            env = processEnvironment(dict(self._baseEnvironment or os.environ), settings.device)
            tmp = workDir / "tmp"
            tmp.mkdir()
            env.update(TMPDIR=str(tmp), TEMP=str(tmp), TMP=str(tmp))  # the library's temporary folders too
            self._run = _Run(workDir, output, time.monotonic())
            self.onLog(f"Training {', '.join(label.name for label in labels)} on {len(pairs)} pair(s), "
                       f"{settings.base.label().lower()}, {settings.minutes:g} min on {settings.device.value}; "
                       f"the model will be {output}")
            self._runner.start(buildTrainArgs(python, requestPath), env, self._onLine, self._onProcessFinished)
        except Exception:
            self._run = None
            shutil.rmtree(workDir, ignore_errors=True)
            raise

    def runAndWait(self, pairs: Sequence[TrainingPair], names: Sequence[str], settings: TrainingSettings,
                   idle: Callable[[], None] = lambda: None, timeoutSeconds: float = 7200.0,
                   cancelAfterSeconds: float | None = None) -> TrainingResult:
        """Scripting and test helper: train, call ``idle()`` while waiting, return the result
        (see ``ProcessRunner.waitForResult``)."""
        results: list[TrainingResult] = []
        previous = self.onFinished
        self.onFinished = results.append
        try:
            self.start(pairs, names, settings)
            return waitForResult(results, self.poll, self.cancel, "training", idle, timeoutSeconds,
                                 cancelAfterSeconds)
        finally:
            self.onFinished = previous

    def poll(self) -> bool:
        """Deliver the process's output and completion; call from the main thread."""
        return self._runner.poll()

    def cancel(self) -> None:
        """Kill the process tree and delete the working folder: no model file is written."""
        if self._run is None:
            return
        self._runner.cancel()
        self.onLog("Cancelled: the training was stopped; no model was written.")
        self._finish(RunStatus.cancelled, "Training cancelled")

    # ------------------------------------------------------------------ process events
    def _onLine(self, line: str) -> None:
        run = self._run
        if run is None:
            return
        event = parseProgressLine(line)
        if event is None:
            self.onLog(line)
            return
        data, progress = event.data, run.progress
        if event.event == "train_start":
            validation = "a held-out pair" if data.get("held_out") else "the training pairs"
            self.onLog(f"Training started: {data.get('pairs')} pair(s), labels {', '.join(data.get('labels', []))}, "
                       f"device {data.get('device')}, budget {float(data.get('budget_s') or 0) / 60:.1f} min, "
                       f"base {data.get('base')}; validation Dice on {validation}")
        elif event.event == "train_step":
            progress.step = int(data.get("step", progress.step))
            progress.loss = data.get("loss")
            progress.elapsedSeconds = float(data.get("elapsed_s", progress.elapsedSeconds))
            progress.remainingSeconds = data.get("eta_s")
            self.onLog(f"step {progress.step}: loss {progress.loss:.4f}" if progress.loss is not None
                       else f"step {progress.step}")
        elif event.event == "validation":
            progress.dice = data.get("dice")
            perLabel = ", ".join(f"{name} {dice:.3f}" for name, dice in data.get("dice_per_label", {}).items())
            self.onLog(f"validation Dice {progress.dice:.3f} ({perLabel})" if progress.dice is not None else line)
        elif event.event == "train_done":
            run.modelPath = Path(data["model"]) if data.get("model") else None
            run.bestDice = data.get("best_dice")
            progress.step = int(data.get("steps", progress.step))
            progress.remainingSeconds = 0.0
            self.onLog(line)
        elif event.event == "train_error":
            run.errors.append(str(data.get("error", "unknown error")))
            self.onLog(f"error: {run.errors[-1]}")
        else:
            self.onLog(line)
        self.onProgress(progress)

    def _onProcessFinished(self, returnCode: int) -> None:
        run = self._run
        if run is None:
            return
        if run.errors:
            self._finish(RunStatus.failed, "Training failed: " + "; ".join(run.errors))
            return
        if returnCode != 0:
            self._finish(RunStatus.failed, f"sam2unet-train stopped with exit code {returnCode}; see the log")
            return
        if run.modelPath is None or not run.modelPath.is_file():
            self._finish(RunStatus.failed, f"sam2unet-train ended without writing the model ({run.modelPath})")
            return
        os.replace(run.modelPath, run.output)  # same folder: the finished file appears at once
        dice = f", best validation Dice {run.bestDice:.3f}" if run.bestDice is not None else ""
        self._finish(RunStatus.succeeded, f"Model written to {run.output} ({run.progress.step} steps{dice})",
                     run.output)

    def _finish(self, status: RunStatus, message: str, modelPath: Path | None = None) -> None:
        run, self._run = self._run, None
        shutil.rmtree(run.workDir, ignore_errors=True)
        seconds = time.monotonic() - run.startTime
        logger.info("Training %s after %.1f s: %s", status.value, seconds, message)
        self.onFinished(TrainingResult(status, message, seconds, modelPath, run.bestDice, run.progress.step))
