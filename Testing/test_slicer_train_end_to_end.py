"""The Train section end to end on Slicer's real core (slicer-core) and the real child process
(``sam2unet-train --request ... --progress jsonl``): two demo brain volumes with hand-made
segmentations (two segments) train a model from scratch for about a CPU minute; the Segment
section then segments a third volume with it (segments named, coloured and coded as the
training segments were); a fine-tune on one more pair adds a new segment as a new label;
Cancel mid-training leaves no model file, no folder and the scene's node IDs as they were.

One trained model is shared by the tests (module fixture); the demo volumes are 4 mm."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from slicer_core_app import installedCore, slicer, slicerCore, vtk  # noqa: F401 - slicerCore is a fixture

from benchmarks.brain_data import build_brain_dataset
from sam2unet_core.metadata import LabelInfo, read_metadata
from sam2unet_core.terminology import slicer_terminology_string
from SAM2UNetSlicerLib.LabelImport import TERMINOLOGY_TAG
from SAM2UNetSlicerLib.Parameters import Device, RunParameters, SliceAxis, TrainingBase, TrainingSettings
from SAM2UNetSlicerLib.ProcessRunner import SubprocessRunner
from SAM2UNetSlicerLib.SegmentationLogic import RunStatus, SegmentationLogic
from SAM2UNetSlicerLib.TrainingLogic import WORK_FOLDER_PREFIX, TrainingLogic, TrainingPair

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
ENVIRONMENT = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"}
NAMES = ["cortex", "white matter"]  # "cortex" is no name of the terminology table: its codes come from the segment
COLORS = [(0.9, 0.8, 0.2), (0.3, 0.6, 1.0)]
GREY_MATTER_TERMINOLOGY = slicer_terminology_string(LabelInfo(1, "grey matter", (0, 0, 0)))  # Tissue / Gray Matter


@pytest.fixture(scope="module")
def brainCases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four demo cases for training (imagesTr) and one held out (imagesTs), 4 mm voxels."""
    return build_brain_dataset(tmp_path_factory.mktemp("brain"), 4, 1, seed=0, resolution_mm=4)


def loadPair(core, cases: Path, case: str, split: str = "Tr") -> TrainingPair:
    """A demo case as a user's pair: segments "cortex" (grey matter, with its terminology
    chosen in Slicer) and "white matter" (Slicer's default terminology)."""
    volume, segmentation = core.loadSegmentedCase(cases / f"images{split}" / f"{case}_0000.nii.gz",
                                                  cases / f"labels{split}" / f"{case}.nii.gz", NAMES, case, COLORS)
    cortex = segmentation.GetSegmentation().GetSegment(segmentation.GetSegmentation().GetSegmentIdBySegmentName("cortex"))
    cortex.SetTag(TERMINOLOGY_TAG, GREY_MATTER_TERMINOLOGY)
    return TrainingPair(volume, segmentation)


def trainingLogic() -> TrainingLogic:
    return TrainingLogic(slicer, vtk, SubprocessRunner(cwd=str(REPO)), pythonExecutable=sys.executable,
                         baseEnvironment=ENVIRONMENT)


@pytest.fixture(scope="module")
def trainedModel(brainCases: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Trained from scratch on brain_000 and brain_001 for one minute on the CPU."""
    output = tmp_path_factory.mktemp("models") / "brain.safetensors"
    with pytest.MonkeyPatch.context() as monkeypatch, installedCore(monkeypatch) as core:
        pairs = [loadPair(core, brainCases, case) for case in ("brain_000", "brain_001")]
        result = trainingLogic().runAndWait(pairs, NAMES, TrainingSettings(output, minutes=1.0, device=Device.cpu),
                                            timeoutSeconds=600)
    assert result.status is RunStatus.succeeded, result.message
    assert result.modelPath == output.resolve() and result.steps > 0
    assert [path.name for path in output.parent.iterdir()] == ["brain.safetensors"]  # no working folder left
    return output


def test_trained_model_segments_a_third_volume_into_the_training_segments(slicerCore, brainCases,
                                                                          trainedModel: Path) -> None:
    metadata = read_metadata(trainedModel)
    assert [(label.value, label.name) for label in metadata.labels] == [(1, "cortex"), (2, "white matter")]
    assert metadata.labels[0].type.meaning == "Gray Matter" and metadata.labels[0].category.meaning == "Tissue"
    assert [label.color for label in metadata.labels] == [tuple(round(255 * c) for c in color) for color in COLORS]

    volume = slicerCore.loadVolume(brainCases / "imagesTs" / "brain_004_0000.nii.gz", "brain_004")
    segmentation = SegmentationLogic(slicer, vtk, SubprocessRunner(cwd=str(REPO)), pythonExecutable=sys.executable,
                                     baseEnvironment=ENVIRONMENT)
    result = segmentation.runAndWait(volume, None, RunParameters(trainedModel, Device.cpu, SliceAxis.model),
                                     timeoutSeconds=300)
    assert result.status is RunStatus.succeeded, result.message
    segments = [result.segmentationNode.GetSegmentation().GetSegment(sid) for sid in result.segmentIds]
    assert [segment.GetName() for segment in segments] == NAMES
    for segment, color in zip(segments, COLORS):
        np.testing.assert_allclose(segment.GetColor(), color, atol=0.5 / 255)
    tags = []
    for segment in segments:
        tag = vtk.reference("")
        assert segment.GetTag(TERMINOLOGY_TAG, tag)
        tags.append(str(tag))
    assert "~SCT^389081007^Gray Matter~" in tags[0] and "~SCT^389080008^White Matter~" in tags[1]
    mask = slicer.util.arrayFromSegmentBinaryLabelmap(result.segmentationNode, result.segmentIds[1], volume)
    assert mask.shape == slicer.util.arrayFromVolume(volume).shape  # on the volume's grid


def test_fine_tuning_on_one_more_pair_keeps_the_labels_and_adds_the_new_segment(slicerCore, brainCases,
                                                                               trainedModel: Path, tmp_path) -> None:
    pair = loadPair(slicerCore, brainCases, "brain_002")
    shape = slicer.util.arrayFromVolume(pair.volumeNode).shape
    lesion = np.zeros(shape, np.uint8)
    centre = np.array(shape) // 2
    lesion[centre[0] - 2:centre[0] + 2, centre[1] - 3:centre[1] + 3, centre[2] - 3:centre[2] + 3] = 1
    segmentId = pair.segmentationNode.GetSegmentation().AddEmptySegment("", "lesion", (1.0, 0.0, 0.0))
    slicer.util.updateSegmentBinaryLabelmapFromArray(lesion, pair.segmentationNode, segmentId, pair.volumeNode)
    output = tmp_path / "brain_lesion.safetensors"
    settings = TrainingSettings(output, TrainingBase.model, trainedModel, minutes=0.3, device=Device.cpu)
    # Chosen in another order: the base model's labels keep their values.
    result = trainingLogic().runAndWait([pair], ["lesion", "white matter", "cortex"], settings, timeoutSeconds=600)
    assert result.status is RunStatus.succeeded, result.message
    labels = read_metadata(output).labels
    assert [(label.value, label.name, label.color) for label in labels] == [
        (1, "cortex", (230, 204, 51)), (2, "white matter", (76, 153, 255)), (3, "lesion", (255, 0, 0))]
    assert labels[0].type.meaning == "Gray Matter"


def test_cancel_mid_training_leaves_no_model_no_folder_and_the_node_ids(slicerCore, brainCases, tmp_path) -> None:
    pairs = [loadPair(slicerCore, brainCases, case) for case in ("brain_000", "brain_003")]
    before = slicerCore.nodeIds()
    logic = trainingLogic()
    steps = []
    logic.onProgress = lambda progress: steps.append(progress.step)
    output = tmp_path / "models" / "cancelled.safetensors"
    result = logic.runAndWait(pairs, NAMES, TrainingSettings(output, minutes=5.0, device=Device.cpu),
                              idle=lambda: logic.cancel() if any(steps) else None, timeoutSeconds=600)
    assert result.status is RunStatus.cancelled and any(steps)  # it was training
    assert not output.exists() and list(output.parent.iterdir()) == []
    assert not list(tmp_path.rglob(f"{WORK_FOLDER_PREFIX}*"))
    assert slicerCore.nodeIds() == before
