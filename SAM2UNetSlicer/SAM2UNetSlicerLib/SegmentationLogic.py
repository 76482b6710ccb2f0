"""The Segment button: export the input, run ``sam2unet-predict`` in the background, import
the result, or leave the scene as it was when cancelled or failed.

Threading: the CLI runs in a child process (with a ``WarmWorker.WarmPredictRunner``: in a worker
process that keeps the model loaded between runs); ``poll()`` (called by a ``qt.QTimer`` on the main
thread) delivers its output, so every MRML change below happens on the main thread. A
``.pt``/``.pth`` checkpoint or an ``.onnx`` model is first described by a child process too
(its labels are needed for the import), so Slicer's own process never imports torch (nor
loads a large model on the GUI thread).
"""

from __future__ import annotations

import enum
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .LabelImport import importLabels
from .ModelInfo import MetadataReader, describeCommand, modelProblem, parseDescribeOutput, readCheckpointMetadata
from .Parameters import RunParameters, buildPredictArgs, processEnvironment
from .ProcessRunner import ProcessRunnerProtocol, findPythonSlicer, parseProgressLine, waitForResult

__all__ = ["RunStatus", "RunResult", "SegmentationLogic"]

logger = logging.getLogger(__name__)

_TQDM_LINE = re.compile(r"(it/s|s/it)\]\s*$")  # e.g. "50%|#####     | 4/7 [00:01<00:01,  3.1it/s]"
# A case_error's "kind" and "field" (sam2unet_core.errors): the GPU ran out of memory and a
# smaller batch needs less. Other memory refusals say in their message what needs less.
OUT_OF_MEMORY = "out_of_memory"
BATCH_SIZE_FIELD = "batch_size"


class RunStatus(enum.Enum):
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


@dataclass
class RunResult:
    """Outcome of one Segment run, given to ``SegmentationLogic.onFinished``."""

    status: RunStatus
    message: str
    seconds: float
    segmentationNode: Any = None  # None unless succeeded
    segmentIds: list[str] = field(default_factory=list)


@dataclass
class _Run:
    inputVolume: Any
    segmentationNode: Any
    createdNode: Any  # the segmentation created by this run, or None
    metadata: Any  # None until the describe process has read a .pt/.pth/.onnx model
    tempDir: Path
    show3D: bool
    startTime: float
    predictArgs: list[str] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)
    totalSlices: int = 0
    outputPath: Path | None = None
    errors: list[str] = field(default_factory=list)
    batchTooLarge: bool = False  # a case ran out of GPU memory: a smaller batch needs less


class SegmentationLogic:
    """Runs one segmentation at a time.

    ``slicer``/``vtk`` are the Slicer modules (fakes in tests), ``runner`` a
    ``ProcessRunnerProtocol`` for the describe step, ``predictRunner`` the one that runs
    ``sam2unet-predict`` (default: ``runner``; the module gives a ``WarmPredictRunner``). Assign ``onLog(text)``, ``onProgress(done, total)`` (total 0:
    not known yet) and ``onFinished(RunResult)`` to follow a run.
    """

    def __init__(self, slicer: Any, vtk: Any, runner: ProcessRunnerProtocol,
                 pythonExecutable: str | None = None, metadataReader: MetadataReader | None = None,
                 baseEnvironment: Mapping[str, str] | None = None,
                 predictRunner: ProcessRunnerProtocol | None = None) -> None:
        self._slicer = slicer
        self._vtk = vtk
        self._runner = runner
        self._warmRunner = predictRunner
        self._python = pythonExecutable
        self._metadataReader = metadataReader
        self._baseEnvironment = baseEnvironment
        self._run: _Run | None = None
        self.onLog: Callable[[str], None] = lambda text: None
        self.onProgress: Callable[[int, int], None] = lambda done, total: None
        self.onFinished: Callable[[RunResult], None] = lambda result: None

    def isRunning(self) -> bool:
        return self._run is not None

    @property
    def _predictRunner(self) -> ProcessRunnerProtocol:
        """The runner of ``sam2unet-predict``: the warm worker when given, else ``runner``."""
        return self._warmRunner or self._runner

    def start(self, inputVolume: Any, outputSegmentation: Any, params: RunParameters,
              show3D: bool = False) -> Any:
        """Start segmenting ``inputVolume``; returns the output segmentation node.

        With ``outputSegmentation`` None, a node "<volume> segmentation" is created (under the
        input's parent transform) and removed again if the run is cancelled or fails.
        Raises ``ValueError``/``RuntimeError`` for problems found before the process starts;
        the scene is then unchanged.
        """
        if self._run is not None:
            raise RuntimeError("a segmentation is already running; cancel it first")
        if inputVolume is None:
            raise ValueError("no input volume selected")
        params.validate()
        metadata = readCheckpointMetadata(params.checkpointPath, self._metadataReader)
        problem = modelProblem(metadata, params.allowUntrained) if metadata is not None else None
        if problem:
            raise ValueError(problem)
        python = self._python or findPythonSlicer()

        tempDir = Path(tempfile.mkdtemp(prefix="SAM2UNetSlicer-"))
        createdNode = None
        try:
            inputPath = tempDir / "input.nrrd"  # NRRD keeps spacing, origin and oblique directions
            if not self._slicer.util.exportNode(inputVolume, str(inputPath), {}):
                raise RuntimeError(f"could not write {inputVolume.GetName()} to {inputPath}; see the application log")
            if outputSegmentation is None:
                outputSegmentation = createdNode = self._slicer.mrmlScene.AddNewNodeByClass(
                    "vtkMRMLSegmentationNode", f"{inputVolume.GetName()} segmentation")
                createdNode.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())
            args = buildPredictArgs(python, inputPath, tempDir / "output", params)
            env = processEnvironment(dict(self._baseEnvironment or os.environ), params.device)
            self._run = _Run(inputVolume, outputSegmentation, createdNode, metadata, tempDir, show3D,
                             time.monotonic(), args, env)
            self.onLog(f"Segmenting {inputVolume.GetName()} with {params.checkpointPath.name} "
                       f"(device {params.device.value}, {params.sliceAxis.value} slices)")
            if metadata is None:  # .pt/.pth/.onnx: a child process reads the labels first
                describeLines: list[str] = []
                self._runner.start(describeCommand(python, params.checkpointPath), env, describeLines.append,
                                   lambda returnCode: self._onDescribed(params.checkpointPath, describeLines, returnCode))
            else:
                self._predictRunner.start(args, env, self._onLine, self._onProcessFinished)
        except Exception:
            self._run = None
            if createdNode is not None:
                self._slicer.mrmlScene.RemoveNode(createdNode)
            shutil.rmtree(tempDir, ignore_errors=True)
            raise
        return outputSegmentation

    def runAndWait(self, inputVolume: Any, outputSegmentation: Any, params: RunParameters, show3D: bool = False,
                   idle: Callable[[], None] = lambda: None, timeoutSeconds: float = 3600.0,
                   cancelAfterSeconds: float | None = None) -> RunResult:
        """Scripting and self-test helper: run, call ``idle()`` (``slicer.app.processEvents``)
        while waiting, return the ``RunResult``. Cancels after ``cancelAfterSeconds`` if given;
        raises ``TimeoutError`` (after cancelling) past ``timeoutSeconds``."""
        results: list[RunResult] = []
        previous = self.onFinished
        self.onFinished = results.append
        try:
            self.start(inputVolume, outputSegmentation, params, show3D)
            return waitForResult(results, self.poll, self.cancel, f"segmentation of {inputVolume.GetName()}",
                                 idle, timeoutSeconds, cancelAfterSeconds)
        finally:
            self.onFinished = previous

    def poll(self) -> bool:
        """Deliver the process's output and completion; call from the main thread."""
        running = self._runner.poll()
        if self._predictRunner is not self._runner:
            running = self._predictRunner.poll() or running
        return running

    def cancel(self) -> None:
        """Kill the process tree and undo this run's scene changes."""
        if self._run is None:
            return
        self._runner.cancel()
        if self._predictRunner is not self._runner:
            self._predictRunner.cancel()
        self.onLog("Cancelled: the process was stopped and the scene left as it was.")
        self._finish(RunStatus.cancelled, "Cancelled")

    # ------------------------------------------------------------------ process events
    def _onLine(self, line: str) -> None:
        run = self._run
        if run is None:
            return
        progress = parseProgressLine(line)
        if progress is None:
            if not _TQDM_LINE.search(line):  # the progress bar already shows what tqdm prints
                self.onLog(line)
            return
        data = progress.data
        if progress.event == "slices":
            self.onLog(f"slices {data.get('done')}/{data.get('total')}")
        else:
            self.onLog(line)
        if progress.event == "start":
            self.onProgress(0, 0)
        elif progress.event == "case_start":
            run.totalSlices = int(data.get("slices", 0))
            self.onProgress(0, run.totalSlices)
        elif progress.event == "slices":
            run.totalSlices = int(data.get("total", run.totalSlices))
            self.onProgress(int(data.get("done", 0)), run.totalSlices)
        elif progress.event == "case_done":
            run.outputPath = Path(data["output"]) if data.get("output") else None
        elif progress.event == "case_error":
            run.errors.append(str(data.get("error", "unknown error")))
            if data.get("kind") == OUT_OF_MEMORY and data.get("field") == BATCH_SIZE_FIELD:
                run.batchTooLarge = True

    def _onDescribed(self, checkpoint: Path, lines: list[str], returnCode: int) -> None:
        run = self._run
        if run is None:
            return
        try:
            run.metadata = parseDescribeOutput(lines, checkpoint, returnCode)
            problem = modelProblem(run.metadata, "--allow-untrained" in run.predictArgs)
            if problem:
                raise ValueError(problem)
            self._predictRunner.start(run.predictArgs, run.environment, self._onLine, self._onProcessFinished)
        except (ValueError, OSError) as err:
            self._finish(RunStatus.failed, str(err))

    def _onProcessFinished(self, returnCode: int) -> None:
        run = self._run
        if run is None:
            return
        if run.errors:
            message = "Segmentation failed: " + "; ".join(run.errors)
            if run.batchTooLarge:
                message += " (lower the batch size in Advanced, or choose the CPU)"
            self._finish(RunStatus.failed, message)
            return
        if returnCode != 0:
            self._finish(RunStatus.failed, f"sam2unet-predict stopped with exit code {returnCode}; see the log")
            return
        try:
            labelPath = run.outputPath or self._findOutput(run.tempDir / "output")
            segmentIds = importLabels(self._slicer, self._vtk, labelPath, run.inputVolume,
                                      run.segmentationNode, run.metadata.labels)
            if run.show3D:
                run.segmentationNode.CreateClosedSurfaceRepresentation()
        except Exception as err:
            logger.exception("Import of the segmentation failed")
            self._finish(RunStatus.failed, f"Import of the result failed: {err}")
            return
        self._finish(RunStatus.succeeded, f"{len(segmentIds)} segment(s) in {run.segmentationNode.GetName()}",
                     segmentIds)

    @staticmethod
    def _findOutput(outputDir: Path) -> Path:
        found = sorted(outputDir.glob("*.nii.gz"))
        if len(found) != 1:
            raise RuntimeError(f"expected one .nii.gz label map in {outputDir}, found {[p.name for p in found]}")
        return found[0]

    def _finish(self, status: RunStatus, message: str, segmentIds: list[str] | None = None) -> None:
        run, self._run = self._run, None
        if status is not RunStatus.succeeded and run.createdNode is not None:
            self._slicer.mrmlScene.RemoveNode(run.createdNode)
        shutil.rmtree(run.tempDir, ignore_errors=True)
        seconds = time.monotonic() - run.startTime
        result = RunResult(status, message, seconds,
                           run.segmentationNode if status is RunStatus.succeeded else None, segmentIds or [])
        logger.info("Segmentation %s after %.1f s: %s", status.value, seconds, message)
        self.onFinished(result)
