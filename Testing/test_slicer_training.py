"""The Train section's logic (``TrainingLogic``) on Slicer's real core (slicer-core): the export of
training pairs under parent transforms (labels and image line up in physical space), the
report of a pair missing a chosen segment before anything runs, and a run driven by the
events of ``sam2unet-train --request ... --progress jsonl`` (success, failure, Cancel)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from slicer_core_app import addSegmentsFromLabels, slicer, slicerCore, vtk  # noqa: F401 - slicerCore is a fixture
from slicer_fakes import FakeRunner, obliqueIjkToRas

from sam2unet_core.io import affine_ras, read_volume
from sam2unet_core.metadata import LabelInfo
from sam2unet_core.terminology import slicer_terminology_string
from sam2unet_core.training_request import TrainingRequest
from SAM2UNetSlicerLib.LabelImport import TERMINOLOGY_TAG
from SAM2UNetSlicerLib.Parameters import Device, TrainingBase, TrainingSettings
from SAM2UNetSlicerLib.SegmentationLogic import RunStatus
from SAM2UNetSlicerLib.TrainingLogic import TrainingLogic, TrainingPair, exportPair, segmentNames

SHAPE_KJI = (8, 20, 16)


def rigid(degreesAboutA: float, shift: tuple[float, float, float]) -> np.ndarray:
    """4x4 RAS matrix: a rotation about the A axis, then a shift."""
    c, s = np.cos(np.radians(degreesAboutA)), np.sin(np.radians(degreesAboutA))
    matrix = np.array([[c, 0.0, s, 0.0], [0.0, 1.0, 0.0, 0.0], [-s, 0.0, c, 0.0], [0.0, 0.0, 0.0, 1.0]])
    matrix[:3, 3] = shift
    return matrix


# The volume's parent transform and another one for the segmentation: the export must
# resample the segments through both.
VOLUME_PARENT = rigid(30.0, (12.0, -7.5, 30.0))
SEGMENTATION_PARENT = rigid(-50.0, (-4.0, 3.0, 9.0))
GREY_MATTER = LabelInfo(1, "grey matter", (200, 120, 60))


def boxes() -> np.ndarray:
    """Labels ``(K, J, I)``: 1 a box, 2 another box."""
    labels = np.zeros(SHAPE_KJI, np.uint8)
    labels[2:5, 6:12, 4:9] = 1
    labels[5:7, 13:17, 9:14] = 2
    return labels


def volumeIjkToRas(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def addPair(core, imageKji: np.ndarray, labelsKji: np.ndarray, ijkToRas: np.ndarray, names: list[str],
            name: str, volumeParent: np.ndarray | None = None, segmentationParent: np.ndarray | None = None,
            colors: list[tuple[float, float, float]] | None = None) -> TrainingPair:
    """A volume and a segmentation drawn on it in physical space: segment n holds the voxels of
    label n + 1, set through a reference grid that lies exactly on the volume's voxels in the
    world, whatever the two parent transforms are."""
    volume = slicer.util.addVolumeFromArray(imageKji, ijkToRAS=ijkToRas, name=name)
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{name} segmentation")
    segmentation.CreateDefaultDisplayNodes()  # as the Segment Editor makes it
    volumeWorld, segmentationWorld = np.eye(4), np.eye(4)
    if volumeParent is not None:
        volume.SetAndObserveTransformNodeID(core.addTransform(volumeParent, f"{name} parent").GetID())
        volumeWorld = volumeParent
    if segmentationParent is not None:
        segmentation.SetAndObserveTransformNodeID(core.addTransform(segmentationParent, f"{name} seg parent").GetID())
        segmentationWorld = segmentationParent
    drawingGrid = slicer.util.addVolumeFromArray(np.zeros_like(labelsKji), name="drawing grid",
                                                 ijkToRAS=np.linalg.inv(segmentationWorld) @ volumeWorld @ ijkToRas)
    drawingGrid.SetAndObserveTransformNodeID(segmentation.GetTransformNodeID())
    addSegmentsFromLabels(segmentation, labelsKji, names, drawingGrid, colors)
    slicer.mrmlScene.RemoveNode(drawingGrid)
    return TrainingPair(volume, segmentation)


def brightBoxes(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    labels = boxes()
    image = np.random.default_rng(seed).normal(100, 10, SHAPE_KJI) + 400 * (labels == 1) + 200 * (labels == 2)
    return image.astype(np.float32), labels


def makeLogic(runner=None) -> TrainingLogic:
    return TrainingLogic(slicer, vtk, runner or FakeRunner(), pythonExecutable=sys.executable,
                         baseEnvironment={"PATH": "/usr/bin:/bin"})


def test_exported_labels_and_image_line_up_in_physical_space_under_two_parent_transforms(slicerCore, tmp_path) -> None:
    image, labels = brightBoxes()
    ijkToRas = obliqueIjkToRas(spacing=(1.5, 1.2, 2.5), degrees=(10, -5, 20))
    pair = addPair(slicerCore, image, labels, ijkToRas, ["grey matter", "white matter", "skull"], "brain",
                   VOLUME_PARENT, SEGMENTATION_PARENT)
    segmentation = pair.segmentationNode.GetSegmentation()
    ids = [segmentation.GetSegmentIdBySegmentName(name) for name in ("white matter", "grey matter")]
    nodesBefore = slicerCore.nodeIds()
    transformBefore = pair.segmentationNode.GetTransformNodeID()

    exportPair(slicer, vtk, pair, ids, tmp_path / "image.nrrd", tmp_path / "label.nrrd")

    written, label = read_volume(tmp_path / "image.nrrd"), read_volume(tmp_path / "label.nrrd")
    np.testing.assert_array_equal(written.array_kji, image)  # the volume's own voxels and frame
    np.testing.assert_allclose(affine_ras(written), ijkToRas, atol=1e-4)
    np.testing.assert_allclose(affine_ras(label), affine_ras(written), atol=1e-4)  # on the image's grid
    expected = np.where(labels == 2, 1, np.where(labels == 1, 2, 0))  # values in the order of the IDs
    np.testing.assert_array_equal(label.array_kji, expected)
    assert image[label.array_kji == 2].min() > 400 and image[label.array_kji == 0].max() < 250  # on the bright box
    # The user's nodes are as they were: no node added or removed, same parent, same segments.
    assert slicerCore.nodeIds() == nodesBefore
    assert pair.segmentationNode.GetTransformNodeID() == transformBefore
    assert segmentNames(pair.segmentationNode) == ["grey matter", "white matter", "skull"]


def test_a_pair_missing_a_chosen_segment_is_reported_before_anything_runs(slicerCore, tmp_path) -> None:
    image, labels = brightBoxes()
    first = addPair(slicerCore, image, labels, np.eye(4), ["Grey Matter", "white matter"], "case 1")
    # Another name for grey matter, with its terminology: matched through the terminology.
    second = addPair(slicerCore, image, labels, np.eye(4), ["GM", "csf"], "case 2")
    for pair, name in ((first, "Grey Matter"), (second, "GM")):
        segmentation = pair.segmentationNode.GetSegmentation()
        segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(name))
        segment.SetTag(TERMINOLOGY_TAG, slicer_terminology_string(GREY_MATTER))
    nodesBefore = slicerCore.nodeIds()
    runner = FakeRunner()
    logic = makeLogic(runner)
    settings = TrainingSettings(tmp_path / "models" / "brain.safetensors")

    labels = logic.labelsFor([first, second], ["grey matter"], settings)
    assert [(label.name, label.type.meaning) for label in labels] == [("grey matter", "Gray Matter")]
    with pytest.raises(ValueError, match=r"case 2 segmentation \(the segmentation of case 2\) has no segment "
                                         r"'white matter'"):
        logic.start([first, second], ["grey matter", "white matter"], settings)
    assert runner.started == [] and not logic.isRunning()
    assert not (tmp_path / "models").exists() or list((tmp_path / "models").iterdir()) == []
    assert slicerCore.nodeIds() == nodesBefore


def answer(runner: FakeRunner, *events: dict) -> None:
    runner.emit(*(json.dumps(event) for event in events))


def test_run_reports_progress_and_moves_the_finished_model_to_the_output(slicerCore, tmp_path) -> None:
    image, labels = brightBoxes()
    pairs = [addPair(slicerCore, image, labels, np.eye(4), ["grey matter", "white matter"], f"case {n}",
                     colors=[(1.0, 0.0, 0.0), (0.0, 0.0, 1.0)]) for n in (1, 2)]
    runner = FakeRunner()
    logic = makeLogic(runner)
    progress, results = [], []
    logic.onProgress = lambda p: progress.append((p.step, p.dice, round(p.fraction(), 2)))
    logic.onFinished = results.append
    output = tmp_path / "models" / "brain.safetensors"
    logic.start(pairs, ["white matter", "grey matter"], TrainingSettings(output, minutes=2, device=Device.cpu))

    args, env = runner.started[-1]
    assert args[1:] == ["-m", "sam2unet_core.cli.train", "--request", args[4], "--progress", "jsonl"]
    request = json.loads(Path(args[4]).read_text())
    workDir = Path(args[4]).parent
    assert workDir.parent == output.parent and Path(env["TMPDIR"]).parent == workDir
    assert env["CUDA_VISIBLE_DEVICES"] == ""  # CPU chosen
    assert [(label["name"], label["value"], label["color"]) for label in request["labels"]] == [
        ("white matter", 1, [0, 0, 255]), ("grey matter", 2, [255, 0, 0])]
    assert "type" not in request["labels"][0]  # Slicer's default terminology says nothing
    assert (request["base"], request["plane"], request["minutes"], request["device"]) == ("scratch", "axial", 2.0, "cpu")
    assert [pair["name"] for pair in request["pairs"]] == ["00_case_1", "01_case_2"]
    parsed = TrainingRequest.from_json(Path(args[4]).read_text())  # the library reads what the module writes
    parsed.validate()
    assert [label.name for label in parsed.labels] == ["white matter", "grey matter"] and parsed.minutes == 2.0
    exportedLabels = read_volume(request["pairs"][1]["label"]).array_kji
    np.testing.assert_array_equal(exportedLabels, np.where(labels == 2, 1, np.where(labels == 1, 2, 0)))

    answer(runner, {"event": "train_start", "pairs": 2, "labels": ["white matter", "grey matter"], "device": "cpu",
                    "budget_s": 120.0, "base": "scratch"},
           {"event": "train_step", "step": 10, "loss": 0.5, "lr": 0.001, "elapsed_s": 30.0, "eta_s": 90.0},
           {"event": "validation", "epoch": 1, "step": 10, "dice": 0.7,
            "dice_per_label": {"white matter": 0.8, "grey matter": 0.6}})
    logic.poll()
    assert progress[-2:] == [(10, None, 0.25), (10, 0.7, 0.25)] and not output.exists()
    Path(request["output"]).write_bytes(b"model")  # what the CLI writes at the end
    answer(runner, {"event": "train_done", "model": request["output"], "best_dice": 0.7, "steps": 40, "seconds": 119.0})
    runner.finish(0)
    logic.poll()
    result = results[-1]
    assert (result.status, result.modelPath, result.bestDice, result.steps) == (RunStatus.succeeded, output.resolve(), 0.7, 40)
    assert output.read_bytes() == b"model" and not workDir.exists()
    assert list(output.parent.iterdir()) == [output]


@pytest.mark.parametrize("ending", ["cancel", "error"])
def test_cancel_or_a_failed_training_leaves_no_model_and_no_folder(slicerCore, tmp_path, ending: str) -> None:
    image, labels = brightBoxes()
    pair = addPair(slicerCore, image, labels, np.eye(4), ["grey matter"], "case")
    nodesBefore = slicerCore.nodeIds()
    runner = FakeRunner()
    logic = makeLogic(runner)
    results = []
    logic.onFinished = results.append
    output = tmp_path / "brain.safetensors"
    logic.start([pair], ["grey matter"], TrainingSettings(output, minutes=1))
    request = json.loads(Path(runner.args[4]).read_text())
    if ending == "cancel":
        logic.cancel()
        assert runner.cancelled == 1
    else:
        answer(runner, {"event": "train_error", "error": "labels 00_case_label.nrrd: no voxel of 'grey matter'"})
        runner.finish(1)
        logic.poll()
    assert results[-1].status is (RunStatus.cancelled if ending == "cancel" else RunStatus.failed)
    if ending == "error":
        assert "no voxel of 'grey matter'" in results[-1].message
    assert results[-1].modelPath is None and not logic.isRunning()
    assert list(tmp_path.iterdir()) == [] and not Path(request["output"]).parent.exists()
    assert slicerCore.nodeIds() == nodesBefore


def test_settings_name_the_unusable_value(tmp_path) -> None:
    with pytest.raises(ValueError, match="must end in .safetensors"):
        TrainingSettings(tmp_path / "model.pt").validate()
    with pytest.raises(ValueError, match="more than 0 minutes"):
        TrainingSettings(tmp_path / "m.safetensors", minutes=0).validate()
    with pytest.raises(ValueError, match="none.pt is not a file"):
        TrainingSettings(tmp_path / "m.safetensors", TrainingBase.sam2, tmp_path / "none.pt").validate()
    (tmp_path / "sam2.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="sam2.pt: a model to fine-tune is a .safetensors file"):
        TrainingSettings(tmp_path / "m.safetensors", TrainingBase.model, tmp_path / "sam2.pt").validate()
