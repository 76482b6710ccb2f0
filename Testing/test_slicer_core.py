"""The module's SegmentationLogic on Slicer's real core (slicer-core): real scans loaded by
``vtkSlicerVolumesLogic.AddArchetypeVolume`` under a parent transform, the real child process
(``sam2unet-predict``) on a tiny random model whose output depends on the image, and every
segment compared voxel for voxel, in physical space, with a direct CLI run on the same file."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from nibabel.testing import data_path as NIBABEL_DATA
from pydicom.data import get_testdata_file

from slicer_core_app import slicer, slicerCore, vtk  # noqa: F401 - slicerCore is a fixture

from conftest import randomize_
from sam2unet_core import SAM2UNet, save_model
from sam2unet_core.io import affine_ras, read_volume
from sam2unet_core.metadata import Architecture, ModelMetadata, default_labels
from SAM2UNetSlicerLib.Parameters import Device, RunParameters, SliceAxis
from SAM2UNetSlicerLib.ProcessRunner import SubprocessRunner
from SAM2UNetSlicerLib.SegmentationLogic import RunStatus, SegmentationLogic

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
ENVIRONMENT = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"}
CT_SERIES = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" / "98892001" / "CT5N"
LABEL_NAMES = ["liver", "tumour"]
# Rotation of 20 degrees about S and a shift: the parent transform every volume is loaded under.
PARENT_RAS = np.array([[0.94, -0.342, 0.0, 12.0], [0.342, 0.94, 0.0, -7.5], [0.0, 0.0, 1.0, 30.0], [0, 0, 0, 1.0]])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes (background, liver, tumour), 64 px, random weights: the labels follow the image."""
    architecture = Architecture(backbone="hiera_t", num_classes=3, in_channels=3, freeze_encoder=False)
    metadata = ModelMetadata(architecture=architecture, labels=default_labels(3, LABEL_NAMES), input_size=64,
                             intensity={"kind": "percentile", "lower": 0.5, "upper": 99.5}, mean=[], std=[])
    model = randomize_(SAM2UNet(backbone="hiera_t", num_classes=3, in_channels=3, freeze_encoder=False), seed=5)
    import torch

    with torch.no_grad():  # a mild bias so that both foreground labels appear
        model.head.bias.copy_(torch.tensor([0.0, 0.02, 0.01]))
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_model(model, path, metadata)
    return path


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real voxels in three storage layouts Slicer must get right."""
    folder = tmp_path_factory.mktemp("scans")
    anatomical = nib.as_closest_canonical(nib.load(str(Path(NIBABEL_DATA) / "anatomical.nii")))  # RAS storage
    data = np.asanyarray(anatomical.dataobj).astype(np.int16)
    flipI = np.diag([-1.0, 1.0, 1.0, 1.0])
    flipI[0, 3] = data.shape[0] - 1
    las = nib.Nifti1Image(data[::-1].copy(), anatomical.affine @ flipI)  # same voxels, stored L-A-S
    las.set_qform(las.affine, 1)
    las.set_sform(las.affine, 1)
    assert nib.aff2axcodes(las.affine) == ("L", "A", "S")
    nib.save(las, str(folder / "anatomical_las.nii.gz"))
    image = sitk.GetImageFromArray(data.transpose(2, 1, 0).copy())  # KJI array
    image.SetSpacing((2.0, 2.2, 3.0))
    image.SetOrigin((10.0, -20.0, 5.0))
    image.SetDirection(sitk.VersorTransform((0.3, -0.5, 1.0), 0.6).GetMatrix())  # oblique
    sitk.WriteImage(image, str(folder / "anatomical_oblique.nrrd"))
    # pydicom's single-file CT, loaded as DICOM; its 5-slice CT series, which slicer-core's
    # archetype reader refuses (the desktop application loads series through its DICOM
    # module), as NRRD.
    dicomFolder = tmp_path_factory.mktemp("dicom")
    shutil.copy(get_testdata_file("CT_small.dcm"), dicomFolder / "CT_small.dcm")
    series = sitk.ImageSeriesReader()
    series.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(CT_SERIES)))
    ctFolder = tmp_path_factory.mktemp("ct")
    sitk.WriteImage(series.Execute(), str(ctFolder / "CT5N.nrrd"))
    return {"las_nifti": folder / "anatomical_las.nii.gz", "oblique_nrrd": folder / "anatomical_oblique.nrrd",
            "ct_series": ctFolder / "CT5N.nrrd", "dicom_file": dicomFolder / "CT_small.dcm"}


@pytest.fixture(scope="module")
def cliLabels(scans: dict[str, Path], checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Direct ``sam2unet-predict`` runs on the original files: the reference (one run for the
    folder holding the NIfTI and the NRRD, one for the DICOM series)."""
    output = tmp_path_factory.mktemp("cli")
    for source in (scans["las_nifti"].parent, scans["ct_series"].parent, scans["dicom_file"].parent):
        subprocess.run([sys.executable, "-m", "sam2unet_core.cli.predict", "-i", str(source), "-o", str(output),
                        "-m", str(checkpoint), "--device", "cpu", "--axis", "axial", "--format", "nii.gz",
                        "--progress", "none"], check=True, env=ENVIRONMENT, cwd=REPO, timeout=300,
                       capture_output=True)
    cases = {"las_nifti": "anatomical_las", "oblique_nrrd": "anatomical_oblique", "ct_series": "CT5N",
             "dicom_file": scans["dicom_file"].parent.name}
    return {name: read_volume(output / f"{case}.nii.gz") for name, case in cases.items()}


def makeLogic() -> SegmentationLogic:
    return SegmentationLogic(slicer, vtk, SubprocessRunner(cwd=str(REPO)), pythonExecutable=sys.executable,
                             baseEnvironment=ENVIRONMENT)


def worldIjkToRas(node) -> np.ndarray:
    """4x4 IJK-to-world-RAS of a volume node: its IJK-to-RAS under its parent transforms."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    ijkToRas = slicer.util.arrayFromVTKMatrix(matrix)
    transform = node.GetParentTransformNode()
    if transform is None:
        return ijkToRas
    toWorld = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(toWorld)
    return slicer.util.arrayFromVTKMatrix(toWorld) @ ijkToRas


def onGrid(maskKji: np.ndarray, maskIjkToWorld: np.ndarray, referenceShapeKji, referenceIjkToWorld: np.ndarray) -> np.ndarray:
    """Move the binary ``maskKji`` onto the reference grid by physical position. The grids must
    share voxel centres (a signed permutation of axes and a whole-voxel shift, e.g. a cropped
    extent); mask voxels outside the reference grid must be empty."""
    mapping = np.linalg.inv(referenceIjkToWorld) @ maskIjkToWorld  # mask IJK -> reference IJK
    np.testing.assert_allclose(mapping, np.round(mapping), atol=1e-3, err_msg="the grids do not share voxel centres")
    shapeIjk = np.array(maskKji.shape[::-1])
    i, j, k = np.meshgrid(*(np.arange(n) for n in shapeIjk), indexing="ij")
    values = maskKji[k.ravel(), j.ravel(), i.ravel()].astype(bool)
    target = np.round(mapping @ np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)]))[:3].astype(int)
    inside = np.all((target >= 0) & (target < np.array(referenceShapeKji[::-1])[:, None]), axis=0)
    assert not values[~inside].any(), "the mask has voxels outside the reference grid"
    ti, tj, tk = target[:, inside]
    out = np.zeros(referenceShapeKji, np.uint8)
    out[tk, tj, ti] = values[inside]
    return out


def assertSegmentsEqualCli(core, volume, result, cliVolume) -> None:
    referenceKji = slicer.util.arrayFromVolume(volume).shape
    segmentationNode = result.segmentationNode
    assert segmentationNode.GetTransformNodeID() == volume.GetTransformNodeID()
    toWorld = worldIjkToRas(volume)
    parent = toWorld @ np.linalg.inv(slicer.util.arrayFromVTKMatrix(_ijkToRas(volume)))
    cliIjkToWorld = parent @ affine_ras(cliVolume)
    for value, segmentId in enumerate(result.segmentIds, start=1):
        expected = onGrid(cliVolume.array_kji == value, cliIjkToWorld, referenceKji, toWorld)
        assert 0 < expected.sum() < expected.size, f"the tiny model should give label {value} to some voxels"
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volume)
        assert mask.shape == referenceKji
        np.testing.assert_array_equal(mask.astype(bool), expected.astype(bool), err_msg=f"label {value}")


def _ijkToRas(node):
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return matrix


def _segmentUnderParentTransform(slicerCore, path: Path, name: str, checkpoint: Path):
    """Load ``path`` under the rotated parent transform and segment it on the CPU along the
    axial plane; returns the volume node and the succeeded run's result (segment names checked)."""
    transform = slicerCore.addTransform(PARENT_RAS)
    volume = slicerCore.loadVolume(path, name, transform)
    result = makeLogic().runAndWait(volume, None, RunParameters(checkpoint, Device.cpu, SliceAxis.axial),
                                    timeoutSeconds=300)
    assert result.status is RunStatus.succeeded, result.message
    segmentation = result.segmentationNode.GetSegmentation()
    assert [segmentation.GetSegment(sid).GetName() for sid in result.segmentIds] == LABEL_NAMES
    return volume, result


@pytest.mark.parametrize("scan", ["las_nifti", "oblique_nrrd", "ct_series", "dicom_file"])
def test_segments_equal_a_direct_cli_run_in_physical_space(slicerCore, scans, cliLabels, checkpoint, scan: str) -> None:
    volume, result = _segmentUnderParentTransform(slicerCore, scans[scan], scan, checkpoint)
    segmentation = result.segmentationNode.GetSegmentation()
    liver = segmentation.GetSegment(result.segmentIds[0])
    tag = vtk.reference("")
    assert liver.GetTag(liver.GetTerminologyEntryTagName(), tag) and "~SCT^10200004^Liver~" in str(tag)
    assertSegmentsEqualCli(slicerCore, volume, result, cliLabels[scan])
    if scan == "las_nifti":  # Slicer's array of a LAS NIfTI has the K axis flipped relative to nibabel's
        nibabelKji = np.asanyarray(nib.load(str(scans[scan])).dataobj).transpose(2, 1, 0)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume), nibabelKji[::-1])


def test_second_run_overwrites_same_named_segments_and_seg_nrrd_reads_back_equal(
        slicerCore, scans, cliLabels, checkpoint, tmp_path: Path) -> None:
    transform = slicerCore.addTransform(PARENT_RAS)
    volume = slicerCore.loadVolume(scans["oblique_nrrd"], "oblique", transform)
    output = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    output.SetAndObserveTransformNodeID(transform.GetID())
    # No empty user segment here: with one, Slicer stores the shared layer oversampled
    # (80 x 122 x 140 instead of 25 x 41 x 33), which the exact voxel comparison does not cover;
    # kept user segments are checked by test_slicer_segmentation_logic's fake-scene tests.
    logic = makeLogic()
    params = RunParameters(checkpoint, Device.cpu, SliceAxis.axial)
    first = logic.runAndWait(volume, output, params, timeoutSeconds=300)
    second = logic.runAndWait(volume, output, params, timeoutSeconds=300)
    assert first.status is second.status is RunStatus.succeeded, second.message
    assert second.segmentIds == first.segmentIds
    segmentation = output.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 2
    assertSegmentsEqualCli(slicerCore, volume, second, cliLabels["oblique_nrrd"])

    storage = output.CreateDefaultStorageNode()  # Slicer's own .seg.nrrd writer
    path = tmp_path / "written.seg.nrrd"
    storage.SetFileName(str(path))
    assert storage.WriteData(output)
    written = slicerio.read_segmentation(str(path))
    byName = {segment["name"]: segment for segment in written["segments"]}
    assert set(byName) == set(LABEL_NAMES)
    assert byName["liver"]["terminology"]["type"] == ["SCT", "10200004", "Liver"]
    ijkToLps = np.asarray(written["ijkToLPS"])
    ijkToWorld = PARENT_RAS @ np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijkToLps  # file is in the node's (parent) space
    referenceKji = slicer.util.arrayFromVolume(volume).shape
    for name, segmentId in zip(LABEL_NAMES, second.segmentIds):
        segment = byName[name]
        voxels = written["voxels"]
        fileMaskKji = (voxels[segment["layer"]] if voxels.ndim == 4 else voxels).transpose(2, 1, 0) == segment["labelValue"]
        fromFile = onGrid(fileMaskKji, ijkToWorld, referenceKji, worldIjkToRas(volume))
        inScene = slicer.util.arrayFromSegmentBinaryLabelmap(output, segmentId, volume)
        np.testing.assert_array_equal(fromFile.astype(bool), inScene.astype(bool), err_msg=name)


def test_cancel_mid_run_leaves_the_scenes_node_ids_as_they_were(slicerCore, scans, checkpoint) -> None:
    volume = slicerCore.loadVolume(scans["las_nifti"], "las", slicerCore.addTransform(PARENT_RAS))
    before = slicerCore.nodeIds()
    logic = makeLogic()
    lines: list[str] = []
    logic.onLog = lambda line: lines.append(line) or (logic.cancel() if '"event": "start"' in line else None)
    result = logic.runAndWait(volume, None, RunParameters(checkpoint, Device.cpu, SliceAxis.axial), timeoutSeconds=300)
    assert result.status is RunStatus.cancelled
    assert any('"event": "start"' in line for line in lines)  # it was running, model loaded
    assert slicerCore.nodeIds() == before


# ------------------------------------------------------------------------------ ONNX route
@pytest.fixture(scope="module")
def onnxCheckpoint(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint exported by sam2unet-export's library call: the ONNX route's model."""
    from sam2unet_core.checkpoint import load_model
    from sam2unet_core.export.onnx import export_onnx

    return export_onnx(load_model(checkpoint), tmp_path_factory.mktemp("onnx") / "tiny.onnx")


@pytest.fixture(scope="module")
def cliOnnxLabels(scans: dict[str, Path], onnxCheckpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A direct ``sam2unet-predict -m tiny.onnx`` run on the NIfTI and NRRD files: the reference."""
    output = tmp_path_factory.mktemp("cli_onnx")
    subprocess.run([sys.executable, "-m", "sam2unet_core.cli.predict", "-i", str(scans["las_nifti"].parent),
                    "-o", str(output), "-m", str(onnxCheckpoint), "--device", "cpu", "--axis", "axial",
                    "--format", "nii.gz", "--progress", "none"], check=True, env=ENVIRONMENT, cwd=REPO, timeout=300,
                   capture_output=True)
    return {"las_nifti": read_volume(output / "anatomical_las.nii.gz"),
            "oblique_nrrd": read_volume(output / "anatomical_oblique.nii.gz")}


@pytest.mark.parametrize("scan", ["las_nifti", "oblique_nrrd"])
def test_onnx_model_segments_equal_a_direct_onnx_cli_run(slicerCore, scans, cliOnnxLabels, onnxCheckpoint,
                                                         scan: str) -> None:
    volume, result = _segmentUnderParentTransform(slicerCore, scans[scan], scan, onnxCheckpoint)
    assertSegmentsEqualCli(slicerCore, volume, result, cliOnnxLabels[scan])
