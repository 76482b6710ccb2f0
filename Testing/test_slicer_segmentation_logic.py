"""SegmentationLogic with a fake process: run, progress, cancel, errors, and the label import
(KJI arrays, IJK-to-RAS of oblique volumes). Tests taking ``backend`` run twice: on the fake
Slicer scene and on Slicer's real core (slicer-core), which checks the fakes against Slicer."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from slicer_fakes import FakeRunner, fakeVtk, makeFakeSlicer, obliqueIjkToRas

try:
    from slicer_core_app import slicerCore  # noqa: F401 - a fixture
except pytest.skip.Exception:  # slicer-core not installed: only the fakes run
    slicerCore = None

from sam2unet_core.metadata import Architecture, ModelMetadata, default_labels
from SAM2UNetSlicerLib.LabelImport import checkSameGrid, readLabelFile
from SAM2UNetSlicerLib.Parameters import Device, RunParameters, SliceAxis
from SAM2UNetSlicerLib.SegmentationLogic import RunStatus, SegmentationLogic

SHAPE_KJI = (7, 12, 10)
METADATA = ModelMetadata(
    architecture=Architecture(backbone="hiera_t", num_classes=3),
    labels=default_labels(3, ["liver", "tumour"]),
    input_size=64,
)


def expectedLabelsKji() -> np.ndarray:
    labels = np.zeros(SHAPE_KJI, np.uint8)
    labels[2, 3:5, 4:9] = 1  # slice k=2, rows j=3..4, columns i=4..8
    labels[5, 8, 1] = 2
    return labels


class Harness:
    """A scene with one oblique volume under a parent transform, the logic under test (with a
    FakeRunner) and its recorded callbacks. ``core``: a slicer_core_app.SlicerCore for Slicer's
    real scene and logics; None for the fakes."""

    def __init__(self, tmp_path: Path, ijkToRas: np.ndarray | None = None, core=None) -> None:
        rng = np.random.default_rng(0)
        voxels = rng.integers(-1000, 1000, SHAPE_KJI).astype(np.int16)
        ijkToRas = obliqueIjkToRas() if ijkToRas is None else ijkToRas
        self.core = core
        if core is None:
            self.slicer, vtkModule = makeFakeSlicer(), fakeVtk
            self.scene = self.slicer.mrmlScene
            self.volume = self.scene.addVolume("CT chest", voxels, ijkToRas)
            self.volume.SetAndObserveTransformNodeID("vtkMRMLLinearTransformNode7")
        else:
            import slicer
            import vtk as vtkModule

            self.slicer, self.scene = slicer, slicer.mrmlScene
            self.volume = slicer.util.addVolumeFromArray(voxels, ijkToRAS=ijkToRas, name="CT chest")
            self.volume.SetAndObserveTransformNodeID(core.addTransform(np.eye(4)).GetID())
        self.ijkToRas = ijkToRas
        self.checkpoint = tmp_path / "model.safetensors"
        self.checkpoint.write_bytes(b"weights")
        self.runner = FakeRunner()
        self.logic = SegmentationLogic(self.slicer, vtkModule, self.runner, pythonExecutable="/opt/Slicer/bin/PythonSlicer",
                                       metadataReader=lambda path: METADATA, baseEnvironment={"PATH": "/usr/bin"})
        self.logs: list[str] = []
        self.progress: list[tuple[int, int]] = []
        self.results = []
        self.logic.onLog = self.logs.append
        self.logic.onProgress = lambda done, total: self.progress.append((done, total))
        self.logic.onFinished = self.results.append

    # Reading the scene the same way on both backends.
    def segmentNames(self, output, segmentIds) -> list[str]:
        return [output.GetSegmentation().GetSegment(sid).GetName() for sid in segmentIds]

    def segmentIds(self, output) -> set[str]:
        segmentation = output.GetSegmentation()
        if self.core is None:
            return set(segmentation.segments)
        return {segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())}

    def segmentMask(self, output, segmentId) -> np.ndarray:
        """The segment's voxels on the input volume's grid, KJI."""
        if self.core is None:
            segment = output.GetSegmentation().segments[segmentId]
            if segment.maskKji is None:  # never imported into
                return np.zeros(SHAPE_KJI, np.uint8)
            np.testing.assert_array_equal(segment.ijkToRas, self.volume.ijkToRas)  # input geometry, exactly
            return segment.maskKji
        return self.slicer.util.arrayFromSegmentBinaryLabelmap(output, segmentId, self.volume)

    def terminologyTag(self, output, segmentId) -> str:
        segment = output.GetSegmentation().GetSegment(segmentId)
        if self.core is None:
            return segment.tags["TerminologyEntry"]
        import vtk

        value = vtk.reference("")
        segment.GetTag("TerminologyEntry", value)
        return str(value)

    def params(self, **overrides) -> RunParameters:
        return RunParameters(**{"checkpointPath": self.checkpoint, **overrides})

    def start(self, output=None, show3D: bool = False, **overrides):
        return self.logic.start(self.volume, output, self.params(**overrides), show3D)

    def runFakeCli(self, labelsKji: np.ndarray, returnCode: int = 0, geometryFrom: Path | None = None) -> Path:
        """Do what sam2unet-predict does: read the exported input, write a label map on its grid."""
        inputPath = Path(self.runner.argument("-i"))
        outputPath = Path(self.runner.argument("-o")) / "input.nii.gz"
        outputPath.parent.mkdir(parents=True, exist_ok=True)
        labels = sitk.GetImageFromArray(labelsKji)  # KJI array -> IJK image
        labels.CopyInformation(sitk.ReadImage(str(geometryFrom or inputPath)))
        sitk.WriteImage(labels, str(outputPath))
        total = labelsKji.shape[0]
        self.runner.emit(
            json.dumps({"event": "start", "cases": 1}),
            json.dumps({"event": "case_start", "case": "input", "slices": total}),
            "Predicting:  50%|#####     | 4/7 [00:01<00:01,  3.1it/s]",
            json.dumps({"event": "slices", "case": "input", "done": 4, "total": total}),
            json.dumps({"event": "slices", "case": "input", "done": total, "total": total}),
            json.dumps({"event": "case_done", "case": "input", "output": str(outputPath), "seconds": 1.5}),
            json.dumps({"event": "done", "ok": 1, "failed": 0, "skipped": 0}),
        )
        self.runner.finish(returnCode)
        return outputPath

    def pollUntilFinished(self) -> None:
        for _ in range(10):
            if not self.logic.poll():
                return
        raise AssertionError("the fake process did not finish")

    def sceneNames(self) -> list[str]:
        """Names of the volume and segmentation nodes, in scene order."""
        if self.core is None:
            return [node.GetName() for node in self.scene.nodes]
        nodes = (self.scene.GetNthNode(i) for i in range(self.scene.GetNumberOfNodes()))
        return [node.GetName() for node in nodes
                if node.IsA("vtkMRMLVolumeNode") or node.IsA("vtkMRMLSegmentationNode")]


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    harness.logic.cancel()  # a run the test left going: cancelling removes its temporary folder


@pytest.fixture(params=["fake", "slicer"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    """The harness on the fakes, then on Slicer's real core."""
    if request.param == "slicer" and slicerCore is None:
        pytest.skip("slicer-core is not installed (pip install -r requirements-slicer.txt)")
    core = request.getfixturevalue("slicerCore") if request.param == "slicer" else None
    harness = Harness(tmp_path, core=core)
    yield harness
    harness.logic.cancel()


def test_command_line_carries_the_exported_input_and_all_options(harness: Harness) -> None:
    harness.start(device=Device.cpu, sliceAxis=SliceAxis.coronal, sliceRange=(3, 5), batchSize=2)
    args, env = harness.runner.started[0]
    assert args[:3] == ["/opt/Slicer/bin/PythonSlicer", "-m", "sam2unet_core.cli.predict"]
    assert harness.runner.argument("-m") == str(harness.checkpoint)
    assert harness.runner.argument("--device") == "cpu"
    assert harness.runner.argument("--axis") == "coronal"
    assert harness.runner.argument("--format") == "nii.gz"
    assert harness.runner.argument("--batch-size") == "2"
    assert harness.runner.argument("--progress") == "jsonl"
    assert harness.runner.argument("--slice-range") == "3:6"
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["PYTHONUNBUFFERED"] == "1" and env["PATH"] == "/usr/bin"
    # The exported NRRD holds the voxels in KJI order and the volume's geometry (LPS on disk).
    exported, ijkToRas = readLabelFile(Path(harness.runner.argument("-i")))
    np.testing.assert_array_equal(exported, harness.volume.arrayKji)
    np.testing.assert_allclose(ijkToRas, harness.volume.ijkToRas, atol=1e-6)


def test_success_creates_named_coloured_segments_on_the_oblique_input_grid(backend: Harness) -> None:
    harness = backend
    output = harness.start(show3D=True)
    assert output.GetName() == "CT chest segmentation"
    assert output.GetTransformNodeID() == harness.volume.GetTransformNodeID()
    tempDir = Path(harness.runner.argument("-o")).parent
    labelsKji = expectedLabelsKji()
    harness.runFakeCli(labelsKji)
    harness.pollUntilFinished()

    [result] = harness.results
    assert result.status is RunStatus.succeeded, result.message
    assert result.segmentationNode is output
    assert harness.segmentNames(output, result.segmentIds) == ["liver", "tumour"]
    color = output.GetSegmentation().GetSegment(result.segmentIds[0]).GetColor()
    assert tuple(color) == pytest.approx(tuple(c / 255 for c in METADATA.labels[0].color))
    for value, segmentId in enumerate(result.segmentIds, start=1):
        np.testing.assert_array_equal(harness.segmentMask(output, segmentId), (labelsKji == value).astype(np.uint8))
    if harness.core is None:
        for segmentId in result.segmentIds:
            assert output.GetSegmentation().segments[segmentId].transformNodeId == harness.volume.GetTransformNodeID()
        assert output.referenceVolume is harness.volume
        assert output.closedSurface
    else:
        assert output.GetSegmentation().ContainsRepresentation("Closed surface")
    tags = [harness.terminologyTag(output, sid) for sid in result.segmentIds]
    assert "~SCT^10200004^Liver~" in tags[0] and "~SCT^108369006^Tumor~" in tags[1]
    assert harness.sceneNames() == ["CT chest", "CT chest segmentation"]  # temporary label volume removed
    assert not tempDir.exists()
    assert harness.progress[:3] == [(0, 0), (0, 7), (4, 7)] and harness.progress[-1] == (7, 7)
    assert not any("it/s]" in line for line in harness.logs)  # tqdm noise kept out of the log
    assert "slices 4/7" in harness.logs and any('"event": "case_done"' in line for line in harness.logs)
    assert result.seconds >= 0


def test_existing_output_keeps_its_segments_and_reuses_same_named_ones(backend: Harness) -> None:
    harness = backend
    output = harness.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my segmentation")
    segmentation = output.GetSegmentation()
    kept = segmentation.AddEmptySegment("", "lungs", (0.1, 0.2, 0.3))
    reused = segmentation.AddEmptySegment("", "tumour", (0.9, 0.9, 0.0))
    assert harness.start(output=output) is output
    harness.runFakeCli(expectedLabelsKji())
    harness.pollUntilFinished()
    [result] = harness.results
    assert result.status is RunStatus.succeeded
    assert result.segmentIds[1] == reused
    assert harness.segmentIds(output) == {kept, reused, result.segmentIds[0]}
    assert harness.segmentMask(output, reused).sum() == 1
    assert harness.segmentMask(output, kept).sum() == 0  # untouched
    assert segmentation.GetSegment(kept).GetName() == "lungs"


def test_cancel_kills_the_process_and_removes_the_created_segmentation(backend: Harness) -> None:
    harness = backend
    namesBefore = harness.sceneNames()
    harness.start()
    assert harness.sceneNames() == namesBefore + ["CT chest segmentation"]
    tempDir = Path(harness.runner.argument("-o")).parent
    harness.runner.emit(json.dumps({"event": "case_start", "case": "input", "slices": 7}))
    harness.logic.poll()
    harness.logic.cancel()

    assert harness.runner.cancelled == 1
    [result] = harness.results
    assert result.status is RunStatus.cancelled and result.segmentationNode is None
    assert harness.sceneNames() == namesBefore
    assert not tempDir.exists()
    assert not harness.logic.isRunning()
    harness.logic.cancel()  # a second cancel does nothing
    assert harness.runner.cancelled == 1 and len(harness.results) == 1


def test_cancel_leaves_a_chosen_output_untouched(backend: Harness) -> None:
    harness = backend
    output = harness.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    segmentId = output.GetSegmentation().AddEmptySegment("", "liver", (1.0, 0.0, 0.0))
    harness.start(output=output)
    harness.logic.cancel()
    assert harness.sceneNames() == ["CT chest", "mine"]
    assert harness.segmentIds(output) == {segmentId}
    if harness.core is None:
        assert output.referenceVolume is None


def test_error_event_fails_with_its_message_and_removes_the_created_node(backend: Harness) -> None:
    harness = backend
    harness.start()
    harness.runner.emit(json.dumps({"event": "case_error", "case": "input", "error": "CUDA out of memory (--batch-size 4)",
                                    "kind": "out_of_memory", "field": "batch_size", "value": 4}))
    harness.runner.finish(1)
    harness.pollUntilFinished()
    [result] = harness.results
    assert result.status is RunStatus.failed
    assert "CUDA out of memory" in result.message and "lower the batch size" in result.message
    assert harness.sceneNames() == ["CT chest"]


@pytest.mark.parametrize("event", [
    {"error": "input.nii.gz: the labels and 3-channel float32 probabilities fused over the planes need about "
              "9 GiB; segment along one plane (--axis)", "kind": "out_of_memory", "field": "axis", "value": None},
    {"error": "input.nii.gz: not a readable NIfTI file (words: out of memory)", "kind": "unreadable_input"},
])
def test_batch_size_advice_comes_from_the_error_kind_not_its_words(backend: Harness, event: dict) -> None:
    harness = backend
    harness.start()
    harness.runner.emit(json.dumps({"event": "case_error", "case": "input", **event}))
    harness.runner.finish(1)
    harness.pollUntilFinished()
    [result] = harness.results
    assert result.status is RunStatus.failed and event["error"] in result.message
    assert "lower the batch size" not in result.message


def test_nonzero_exit_without_events_fails_and_names_the_exit_code(backend: Harness) -> None:
    harness = backend
    harness.start()
    harness.runner.emit("Traceback (most recent call last):", "ModuleNotFoundError: No module named 'sam2'")
    harness.runner.finish(137)
    harness.pollUntilFinished()
    [result] = harness.results
    assert result.status is RunStatus.failed and "137" in result.message
    assert "ModuleNotFoundError: No module named 'sam2'" in harness.logs
    assert harness.sceneNames() == ["CT chest"]


def test_label_map_off_the_input_grid_is_refused_and_nothing_is_left(backend: Harness, tmp_path: Path) -> None:
    harness = backend
    harness.start()
    shifted = sitk.ReadImage(harness.runner.argument("-i"))
    shifted.SetOrigin([value + 3.0 for value in shifted.GetOrigin()])  # 3 mm off
    sitk.WriteImage(shifted, str(tmp_path / "shifted.nrrd"))
    harness.runFakeCli(expectedLabelsKji(), geometryFrom=tmp_path / "shifted.nrrd")
    harness.pollUntilFinished()
    [result] = harness.results
    assert result.status is RunStatus.failed
    assert "not on the input volume's voxel grid" in result.message
    assert harness.sceneNames() == ["CT chest"]


def test_failed_import_removes_the_segments_it_added(harness: Harness) -> None:
    output = harness.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    kept = output.GetSegmentation().AddEmptySegment("", "tumour", (1.0, 0.0, 0.0))
    harness.slicer.modules.segmentations.logic().fail = True
    harness.start(output=output)
    harness.runFakeCli(expectedLabelsKji())
    harness.pollUntilFinished()
    [result] = harness.results
    assert result.status is RunStatus.failed and "could not import" in result.message
    assert list(output.GetSegmentation().segments) == [kept]
    assert harness.sceneNames() == ["CT chest", "mine"]


def test_problems_before_the_start_change_nothing(harness: Harness, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a file"):
        harness.logic.start(harness.volume, None, RunParameters(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="first <= last"):
        harness.start(sliceRange=(5, 2))
    with pytest.raises(ValueError, match="batch size must be at least 1, got 0"):
        harness.start(batchSize=0)
    with pytest.raises(ValueError, match="no input volume"):
        harness.logic.start(None, None, harness.params())
    harness.slicer.util.exportFails = True
    with pytest.raises(RuntimeError, match="could not write CT chest"):
        harness.start()
    harness.slicer.util.exportFails = False
    harness.logic._runner = FakeRunner(failToStart=True)
    with pytest.raises(OSError, match="cannot run"):
        harness.start()
    assert harness.sceneNames() == ["CT chest"]
    assert harness.runner.started == [] and harness.results == []
    assert not harness.logic.isRunning()


def test_second_start_while_running_is_refused(harness: Harness) -> None:
    harness.start()
    with pytest.raises(RuntimeError, match="already running"):
        harness.start()


def test_unnamed_label_values_are_reported_not_imported(backend: Harness, caplog: pytest.LogCaptureFixture) -> None:
    harness = backend
    harness.start()
    labelsKji = expectedLabelsKji()
    labelsKji[0, 0, 0] = 9
    harness.runFakeCli(labelsKji)
    with caplog.at_level(logging.WARNING):
        harness.pollUntilFinished()
    assert harness.results[0].status is RunStatus.succeeded
    assert "values [9]" in caplog.text


def test_read_label_file_gives_kji_arrays_and_ras_geometry_like_nibabel(tmp_path: Path) -> None:
    """nibabel works in IJK arrays and RAS affines: an independent check of both conventions."""
    dataIjk = np.zeros((10, 12, 7), np.uint8)  # I, J, K
    dataIjk[4, 3, 2] = 1
    dataIjk[1, 8, 5] = 2
    affineRas = obliqueIjkToRas()
    path = tmp_path / "labels.nii.gz"
    nib.save(nib.Nifti1Image(dataIjk, affineRas), str(path))
    labelsKji, ijkToRas = readLabelFile(path)
    assert labelsKji.shape == (7, 12, 10)
    assert labelsKji[2, 3, 4] == 1 and labelsKji[5, 8, 1] == 2
    np.testing.assert_array_equal(labelsKji, dataIjk.transpose(2, 1, 0))
    np.testing.assert_allclose(ijkToRas, affineRas, atol=1e-5)


def test_grid_check_names_the_file_and_the_shapes(tmp_path: Path) -> None:
    matrix = obliqueIjkToRas()
    checkSameGrid(tmp_path / "a.nii.gz", np.zeros((7, 12, 10)), matrix, (10, 12, 7), matrix)
    with pytest.raises(ValueError, match=r"a\.nii\.gz has array shape \(K, J, I\) = \(10, 12, 7\), expected \(7, 12, 10\)"):
        checkSameGrid(tmp_path / "a.nii.gz", np.zeros((10, 12, 7)), matrix, (10, 12, 7), matrix)
    flipped = matrix.copy()
    flipped[:3, 0] *= -1  # I axis reversed
    with pytest.raises(ValueError, match="voxel grid"):
        checkSameGrid(tmp_path / "a.nii.gz", np.zeros((7, 12, 10)), flipped, (10, 12, 7), matrix)


def test_run_and_wait_returns_the_result_and_cancels_on_request_or_timeout(harness: Harness) -> None:
    idleCalls = []
    cancelled = harness.logic.runAndWait(harness.volume, None, harness.params(), cancelAfterSeconds=-1)
    assert cancelled.status is RunStatus.cancelled and harness.sceneNames() == ["CT chest"]
    with pytest.raises(TimeoutError, match="CT chest took more than -1 s"):
        harness.logic.runAndWait(harness.volume, None, harness.params(), timeoutSeconds=-1)
    assert harness.sceneNames() == ["CT chest"] and not harness.logic.isRunning()

    original = harness.runner.start

    def startAndAnswer(args, env, onLine, onFinished):
        original(args, env, onLine, onFinished)
        harness.runFakeCli(expectedLabelsKji())

    harness.runner.start = startAndAnswer
    result = harness.logic.runAndWait(harness.volume, None, harness.params(), idle=lambda: idleCalls.append(1))
    assert result.status is RunStatus.succeeded and idleCalls
    assert harness.logic.onFinished == harness.results.append  # restored


def test_pt_checkpoint_is_described_by_a_child_process_before_the_run(tmp_path: Path) -> None:
    """A .pt/.pth file is never read in Slicer's process: the describe command runs first on the
    same runner, its JSON gives the labels, then sam2unet-predict starts."""
    harness = Harness(tmp_path)
    harness.logic._metadataReader = None  # the module's default reader
    official = tmp_path / "SAM2-UNet-official.pth"
    official.write_bytes(b"not read here")
    harness.start(checkpointPath=official)
    describeArgs, _ = harness.runner.started[0]
    assert describeArgs == ["/opt/Slicer/bin/PythonSlicer", "-m", "sam2unet_core.cli.describe", str(official)]
    harness.runner.emit(METADATA.to_json())
    harness.runner.finish(0)
    harness.logic.poll()
    assert len(harness.runner.started) == 2 and harness.runner.argument("-m") == str(official)
    harness.runFakeCli(expectedLabelsKji())
    harness.pollUntilFinished()
    [result] = harness.results
    assert result.status is RunStatus.succeeded, result.message
    segments = result.segmentationNode.GetSegmentation().segments
    assert [segments[sid].name for sid in result.segmentIds] == ["liver", "tumour"]


def test_pt_checkpoint_the_child_cannot_read_fails_naming_it_and_changes_nothing(tmp_path: Path) -> None:
    harness = Harness(tmp_path)
    harness.logic._metadataReader = None
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"\x00" * 10)
    harness.start(checkpointPath=broken)
    harness.runner.emit("error: broken.pt: not a readable PyTorch checkpoint (truncated or corrupt?)")
    harness.runner.finish(1)
    harness.pollUntilFinished()
    [result] = harness.results
    assert result.status is RunStatus.failed
    assert f"cannot read the model metadata of {broken}: error: broken.pt: not a readable" in result.message
    assert harness.sceneNames() == ["CT chest"] and len(harness.runner.started) == 1
