"""The Segment button's warm worker (``SAM2UNetSlicerLib.WarmWorker``) on Slicer's real core
(slicer-core) with the real worker process: the second run reuses the worker, gives the
segments of a plain child process voxel for voxel, Cancel kills it at once, a crashed or idle
worker is replaced, and another model gets a new worker."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from slicer_core_app import slicer, slicerCore, vtk  # noqa: F401 - slicerCore is a fixture

from conftest import randomize_
from sam2unet_core import SAM2UNet, save_model
from sam2unet_core.metadata import Architecture, ModelMetadata, default_labels
from SAM2UNetSlicerLib.Parameters import Device, RunParameters, SliceAxis
from SAM2UNetSlicerLib.ProcessRunner import SubprocessRunner
from SAM2UNetSlicerLib.SegmentationLogic import RunStatus, SegmentationLogic
from SAM2UNetSlicerLib.WarmWorker import WarmPredictRunner

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
ENVIRONMENT = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"}
posixOnly = pytest.mark.skipif(os.name == "nt", reason="checks process ids with os.kill(pid, 0)")


def _checkpoint(folder: Path, seed: int) -> Path:
    architecture = Architecture(backbone="hiera_t", num_classes=3, in_channels=3, freeze_encoder=False)
    metadata = ModelMetadata(architecture=architecture, labels=default_labels(3, ["liver", "tumour"]), input_size=64,
                             intensity={"kind": "percentile", "lower": 0.5, "upper": 99.5}, mean=[], std=[])
    model = randomize_(SAM2UNet(backbone="hiera_t", num_classes=3, in_channels=3, freeze_encoder=False), seed=seed)
    import torch

    with torch.no_grad():  # a mild bias so that both foreground labels appear
        model.head.bias.copy_(torch.tensor([0.0, 0.02, 0.01]))
    return save_model(model, folder / f"tiny{seed}.safetensors", metadata)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("models")
    return [_checkpoint(folder, 5), _checkpoint(folder, 6)]


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A smooth 48 x 40 x 12 volume (int16, oblique-free RAS storage)."""
    k, j, i = np.meshgrid(np.arange(12), np.arange(40), np.arange(48), indexing="ij")
    data = (400 * np.sin(i / 7.0) * np.cos(j / 5.0) + 30 * k).astype(np.int16)  # KJI
    path = tmp_path_factory.mktemp("scan") / "scan.nii.gz"
    nib.save(nib.Nifti1Image(data.transpose(2, 1, 0), np.diag([0.9, 0.9, 2.5, 1.0])), str(path))
    return path


def warmLogic(worker: WarmPredictRunner) -> SegmentationLogic:
    return SegmentationLogic(slicer, vtk, SubprocessRunner(cwd=str(REPO)), pythonExecutable=sys.executable,
                             baseEnvironment=ENVIRONMENT, predictRunner=worker)


def masks(result, volume) -> list[np.ndarray]:
    return [slicer.util.arrayFromSegmentBinaryLabelmap(result.segmentationNode, segmentId, volume)
            for segmentId in result.segmentIds]


def processGone(pid: int, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except (ProcessLookupError, FileNotFoundError):
            return True
        time.sleep(0.05)
    return False


@posixOnly
def test_second_run_reuses_the_worker_and_equals_a_plain_child_process(slicerCore, scan, checkpoints) -> None:
    volume = slicerCore.loadVolume(scan, "scan")
    params = RunParameters(checkpoints[0], Device.cpu, SliceAxis.axial)
    plain = SegmentationLogic(slicer, vtk, SubprocessRunner(cwd=str(REPO)), pythonExecutable=sys.executable,
                              baseEnvironment=ENVIRONMENT).runAndWait(volume, None, params, timeoutSeconds=300)
    assert plain.status is RunStatus.succeeded, plain.message
    worker = WarmPredictRunner(cwd=str(REPO))
    logic = warmLogic(worker)
    try:
        logs: list[str] = []
        logic.onLog = logs.append
        first = logic.runAndWait(volume, None, params, timeoutSeconds=300)
        pid = worker.workerProcessId()
        second = logic.runAndWait(volume, None, params, timeoutSeconds=300)
        assert first.status is second.status is RunStatus.succeeded, second.message
        assert worker.workersStarted == 1 and worker.workerProcessId() == pid is not None
        for run in (first, second):
            assert [run.segmentationNode.GetSegmentation().GetSegment(s).GetName() for s in run.segmentIds] \
                == ["liver", "tumour"]
            for mask, expected in zip(masks(run, volume), masks(plain, volume)):
                assert 0 < expected.sum() < expected.size
                np.testing.assert_array_equal(mask, expected)
        events = [line for line in logs if line.startswith('{"event"')]  # the CLI's own events, per run
        assert [e.split('"')[3] for e in events].count("case_done") == 2
        assert not any('"worker"' in line for line in logs)  # the worker's own lines stay inside
    finally:
        worker.stop()
    assert processGone(pid)


@posixOnly
def test_cancel_kills_the_worker_at_once_and_the_next_run_gets_a_new_one(slicerCore, scan, checkpoints) -> None:
    volume = slicerCore.loadVolume(scan, "scan")
    before = slicerCore.nodeIds()
    worker = WarmPredictRunner(cwd=str(REPO))
    logic = warmLogic(worker)
    params = RunParameters(checkpoints[0], Device.cpu, SliceAxis.axial, batchSize=1)
    pids = []
    logic.onLog = lambda line: (pids.append(worker.workerProcessId()), logic.cancel()) if line.startswith("slices ") else None
    try:
        cancelled = logic.runAndWait(volume, None, params, timeoutSeconds=300)
        assert cancelled.status is RunStatus.cancelled and slicerCore.nodeIds() == before
        assert pids and processGone(pids[0], seconds=5.0)  # killed, not left to finish the volume
        logic.onLog = lambda line: None
        again = logic.runAndWait(volume, None, params, timeoutSeconds=300)
        assert again.status is RunStatus.succeeded, again.message
        assert worker.workersStarted == 2
    finally:
        worker.stop()


@posixOnly
def test_a_crashed_worker_fails_its_run_and_is_replaced_on_the_next_press(slicerCore, scan, checkpoints) -> None:
    volume = slicerCore.loadVolume(scan, "scan")
    worker = WarmPredictRunner(cwd=str(REPO))
    logic = warmLogic(worker)
    params = RunParameters(checkpoints[0], Device.cpu, SliceAxis.axial, batchSize=1)
    logs: list[str] = []

    def crashOnFirstSlices(line: str) -> None:
        logs.append(line)
        if line.startswith("slices ") and worker.workerProcessId() is not None:
            os.kill(worker.workerProcessId(), signal.SIGKILL)  # as the out-of-memory killer does

    logic.onLog = crashOnFirstSlices
    try:
        crashed = logic.runAndWait(volume, None, params, timeoutSeconds=300)
        assert crashed.status is RunStatus.failed and "exit code -9" in crashed.message
        logic.onLog = logs.append
        pid = worker.workerProcessId()  # None: the dead worker was let go
        assert pid is None
        again = logic.runAndWait(volume, None, params, timeoutSeconds=300)
        assert again.status is RunStatus.succeeded, again.message
        assert worker.workersStarted == 2
        # a worker that dies between runs is replaced too, and the log says so
        os.kill(worker.workerProcessId(), signal.SIGKILL)
        assert worker._worker.process.wait(timeout=30) == -signal.SIGKILL  # dead before the next press
        logs.clear()
        third = logic.runAndWait(volume, None, params, timeoutSeconds=300)
        assert third.status is RunStatus.succeeded, third.message
        assert worker.workersStarted == 3
        assert any("stopped unexpectedly (exit code -9)" in line for line in logs)
    finally:
        worker.stop()


@posixOnly
def test_another_model_gets_a_new_worker_and_an_idle_one_stops_by_itself(slicerCore, scan, checkpoints) -> None:
    volume = slicerCore.loadVolume(scan, "scan")
    worker = WarmPredictRunner(idleTimeoutSeconds=3.0, cwd=str(REPO))
    logic = warmLogic(worker)
    try:
        first = logic.runAndWait(volume, None, RunParameters(checkpoints[0], Device.cpu, SliceAxis.axial),
                                 timeoutSeconds=300)
        firstPid = worker.workerProcessId()
        worker.keepOnly(checkpoints[0], "cpu")  # the panel still shows this model and device
        assert worker.workerProcessId() == firstPid is not None
        worker.keepOnly(checkpoints[1], "cpu")  # the panel's model changed: its worker goes
        assert worker.workerProcessId() is None and processGone(firstPid)
        second = logic.runAndWait(volume, None, RunParameters(checkpoints[1], Device.cpu, SliceAxis.axial),
                                  timeoutSeconds=300)
        assert first.status is second.status is RunStatus.succeeded, second.message
        assert worker.workersStarted == 2
        assert any((a != b).any() for a, b in zip(masks(first, volume), masks(second, volume)))  # other weights
        idlePid = worker.workerProcessId()
        assert processGone(idlePid, seconds=60.0)  # past the idle timeout it exits by itself
        third = logic.runAndWait(volume, None, RunParameters(checkpoints[1], Device.cpu, SliceAxis.axial),
                                 timeoutSeconds=300)
        assert third.status is RunStatus.succeeded and worker.workersStarted == 3
    finally:
        worker.stop()
