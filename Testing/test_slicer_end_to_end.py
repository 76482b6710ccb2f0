"""SegmentationLogic driving the real ``sam2unet-predict`` in a child process (a tiny random
hiera_t model) against the fake Slicer scene: the whole Segment button minus Qt."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from slicer_fakes import fakeVtk, makeFakeSlicer, obliqueIjkToRas

from sam2unet_core import SAM2UNet, save_model
from sam2unet_core.io.orientation import plane_view
from sam2unet_core.metadata import Architecture, ModelMetadata, default_labels
from SAM2UNetSlicerLib.Parameters import Device, RunParameters, SliceAxis
from SAM2UNetSlicerLib.ProcessRunner import SubprocessRunner
from SAM2UNetSlicerLib.SegmentationLogic import RunStatus, SegmentationLogic

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SHAPE_KJI = (5, 40, 48)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-class (background + 2) hiera_t model at 64 px whose head is biased to label 1."""
    architecture = Architecture(backbone="hiera_t", num_classes=3, in_channels=3, freeze_encoder=False)
    metadata = ModelMetadata(architecture=architecture, labels=default_labels(3, ["brain", "skin"]),
                             input_size=64, intensity={"kind": "percentile", "lower": 0.5, "upper": 99.5},
                             mean=[], std=[])
    model = SAM2UNet(backbone="hiera_t", num_classes=3, in_channels=3, freeze_encoder=False)
    import torch

    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([0.0, 50.0, 0.0]))  # label 1 wins everywhere
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_model(model, path, metadata)
    return path


def makeLogic():
    slicer = makeFakeSlicer()
    volume = slicer.mrmlScene.addVolume("MR head", np.random.default_rng(3).normal(100, 30, SHAPE_KJI).astype(np.float32),
                                        obliqueIjkToRas(spacing=(1.0, 1.1, 3.0), degrees=(10, 5, -15)))
    logic = SegmentationLogic(slicer, fakeVtk, SubprocessRunner(cwd=str(REPO)), pythonExecutable=sys.executable,
                              baseEnvironment={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"})
    logs: list[str] = []
    logic.onLog = logs.append
    return slicer, volume, logic, logs


def test_real_cli_run_imports_named_segments_on_the_input_grid(checkpoint: Path) -> None:
    slicer, volume, logic, logs = makeLogic()
    progress = []
    logic.onProgress = lambda done, total: progress.append((done, total))
    result = logic.runAndWait(volume, None, RunParameters(checkpoint, Device.cpu, SliceAxis.axial, (1, 2)),
                              timeoutSeconds=240)
    output = result.segmentationNode
    assert result.status is RunStatus.succeeded, result.message + "\n" + "\n".join(logs)
    segments = output.GetSegmentation().segments
    assert [segments[sid].name for sid in result.segmentIds] == ["brain", "skin"]
    brain = segments[result.segmentIds[0]]
    assert brain.maskKji.shape == SHAPE_KJI
    np.testing.assert_array_equal(brain.ijkToRas, volume.ijkToRas)
    # Only the two chosen slices along the axial voxel axis are segmented, and fully (biased head).
    view = plane_view(np.diag([-1.0, -1.0, 1.0]) @ (volume.ijkToRas[:3, :3] / np.linalg.norm(volume.ijkToRas[:3, :3], axis=0)), "axial")
    perSlice = np.moveaxis(brain.maskKji, view.slice_array_axis, 0).reshape(SHAPE_KJI[view.slice_array_axis], -1).sum(axis=1)
    assert [bool(count) for count in perSlice] == [index in (1, 2) for index in range(len(perSlice))]
    assert segments[result.segmentIds[1]].maskKji.sum() == 0
    assert progress[0] == (0, 0) and progress[-1] == (2, 2)
    assert [node.GetName() for node in slicer.mrmlScene.nodes] == ["MR head", "MR head segmentation"]


def test_real_cli_cancel_leaves_the_scene_as_it_was(checkpoint: Path) -> None:
    slicer, volume, logic, logs = makeLogic()
    logic.onLog = lambda line: logs.append(line) or (logic.cancel() if '"event": "start"' in line else None)
    result = logic.runAndWait(volume, None, RunParameters(checkpoint, Device.cpu, SliceAxis.axial), timeoutSeconds=240)
    assert result.status is RunStatus.cancelled
    assert any('"event": "start"' in line for line in logs)  # the CLI was running, model loaded
    assert [node.GetName() for node in slicer.mrmlScene.nodes] == ["MR head"]
