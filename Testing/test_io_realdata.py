"""Real files nobody on the team made (shipped inside nibabel and pydicom): each test pins
a bug found by running ``sam2unet-predict`` on them.

* a multi-frame RT Dose (one file, 15 frames) was read by GDCM's series reader as a 4D
  image and refused; it is a 3D volume with its own geometry;
* a DICOM SEG object was segmented as if it were an image; SEG, SR, RT objects are refused
  naming what they are;
* a CIFTI-2 ``.dconn.nii`` failed with an AttributeError from nibabel's internals;
* DICOM SEG output from sources it cannot reference (no FrameOfReferenceUID, legacy
  multi-frame) failed inside highdicom after the model ran, with its internal message;
* a pixel-data decode failure did not say which encoding failed;
* Siemens MOSAIC slices (nibabel's DICOM test data) were segmented as one 2D image placed
  at the mosaic's position; they are refused with what to do;
* DICOM SEG output failed inside highdicom on a real export's ``PatientSex "N/A"`` and
  malformed dates;
* loose DICOM files and Analyze/MGH/PAR files in a batch folder were skipped silently.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file

from sam2unet_core import SAM2UNet, save_model
from sam2unet_core.cli.predict import main
from sam2unet_core.io import read_volume
from sam2unet_core.io.cases import find_cases
from sam2unet_core.io.writers import dicom_seg_sources, write_labels
from sam2unet_core.metadata import Architecture, ModelMetadata, default_labels

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


def packaged_dicom(name: str) -> Path:
    """A pydicom test file; the test is skipped only when this pydicom lacks it."""
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom's test data has no {name}")
    return Path(path)


def packaged_nifti(name: str) -> Path:
    """A file of nibabel's test data (``name`` may hold a sub-folder of the package)."""
    path = NIBABEL_DATA / name
    if not path.exists():
        path = Path(nib.__file__).parent / name
    if not path.exists():
        pytest.skip(f"nibabel's test data has no {name}")
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    meta = ModelMetadata(
        architecture=Architecture("hiera_t", num_classes=3, in_channels=1), input_size=32,
        intensity={"kind": "percentile", "lower": 0.5, "upper": 99.5}, mean=[], std=[],
    )
    model = SAM2UNet("hiera_t", num_classes=3, in_channels=1)
    return save_model(model, tmp_path_factory.mktemp("model") / "tiny.safetensors", meta)


def predict(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[dict]]:
    code = main(argv + ["--device", "cpu", "--progress", "jsonl"])
    return code, [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize("name", ["rtdose.dcm", "rtdose_rle.dcm", "rtdose_expb.dcm"])
def test_multiframe_rt_dose_is_one_3d_volume_with_its_geometry(name: str) -> None:
    path = packaged_dicom(name)
    volume = read_volume(path)
    reference = sitk.ReadImage(str(path))  # GDCM's own reading of the one file
    assert volume.array_kji.shape == (15, 10, 10)
    np.testing.assert_allclose(volume.spacing_ijk, reference.GetSpacing())  # 5 mm frames
    np.testing.assert_allclose(volume.origin_lps, reference.GetOrigin())
    np.testing.assert_allclose(volume.direction_lps.ravel(), reference.GetDirection())
    np.testing.assert_array_equal(volume.array_kji, sitk.GetArrayFromImage(reference))


def test_multiframe_predicts_with_input_geometry_and_refuses_dicom_seg_before_the_model(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source = packaged_dicom("rtdose.dcm")
    reference = sitk.ReadImage(str(source))
    code, _ = predict(["-i", str(source), "-o", str(tmp_path / "nii"), "-m", str(checkpoint),
                       "--axis", "coronal"], capsys)
    assert code == 0
    output = tmp_path / "nii" / "rtdose.nii.gz"
    image = sitk.ReadImage(str(output))
    assert image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-6)
    affine_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ nib.load(output).affine
    np.testing.assert_allclose(affine_lps[:3, 3], reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(affine_lps[:3, :3], axis=0),
                               reference.GetSpacing(), atol=1e-5)

    code, events = predict(["-i", str(source), "-o", str(tmp_path / "seg"), "-m",
                            str(checkpoint), "--format", "dcm"], capsys)
    error = next(e for e in events if e["event"] == "case_error")
    assert code == 1 and str(source) in error["error"]
    assert "legacy multi-frame" in error["error"] and "formats that work without them: nii.gz" in error["error"]
    assert not any(e["event"] == "case_start" for e in events)  # refused before the model
    assert [p.name for p in (tmp_path / "seg").iterdir()] == ["predict_summary.json"]


def test_dicom_seg_output_needs_a_frame_of_reference() -> None:
    path = packaged_dicom("693_J2KI.dcm")  # a JPEG 2000 CT slice without one
    with pytest.raises(ValueError, match="FrameOfReferenceUID") as caught:
        dicom_seg_sources(read_volume(path))
    assert str(path) in str(caught.value)
    assert len(dicom_seg_sources(read_volume(packaged_dicom("CT_small.dcm")))) == 1


@pytest.mark.parametrize("name, what", [
    ("liver_1frame.dcm", "Segmentation Storage"),
    ("rtstruct.dcm", "RT Structure Set Storage"),
    ("reportsi.dcm", "Basic Text SR Storage"),
    ("JPEGLSNearLossless_08.dcm", "without the SeriesInstanceUID"),
])
def test_non_image_dicom_objects_are_refused_naming_what_they_are(name: str, what: str) -> None:
    path = packaged_dicom(name)
    with pytest.raises(ValueError, match="not a DICOM image to segment") as caught:
        read_volume(path)
    assert str(path) in str(caught.value) and what in str(caught.value)


def test_dicom_seg_files_in_a_series_folder_are_not_a_series(tmp_path: Path) -> None:
    (tmp_path / "seg.dcm").write_bytes(packaged_dicom("liver_1frame.dcm").read_bytes())
    with pytest.raises(ValueError, match="no DICOM image files found"):
        read_volume(tmp_path)


def test_undecodable_pixel_data_names_the_file_and_its_encoding() -> None:
    path = packaged_dicom("JPEG2000-embedded-sequence-delimiter.dcm")
    with pytest.raises(ValueError, match="could not decode the JPEG 2000") as caught:
        read_volume(path)
    assert str(path) in str(caught.value)


def test_cifti2_file_is_refused_as_not_a_volume() -> None:
    path = packaged_nifti("row_major.dconn.nii")
    with pytest.raises(ValueError, match="Cifti2Image file, not a NIfTI image volume") as caught:
        read_volume(path)
    assert str(path) in str(caught.value)


def test_dicom_file_without_an_ending_is_read_as_dicom() -> None:
    path = packaged_dicom("CT_small.dcm").parent / "dicomdirtests" / "98892001" / "CT5N" / "2062"
    if not path.exists():
        pytest.skip("pydicom's test data has no dicomdirtests/98892001/CT5N/2062")
    volume = read_volume(path)  # a scanner export: DICM preamble, no ".dcm"
    reference = sitk.ReadImage(str(path))
    assert volume.shape_kji == (1, 16, 16) and volume.is_dicom
    np.testing.assert_allclose(volume.origin_lps, reference.GetOrigin())
    np.testing.assert_allclose(volume.spacing_ijk[:2], reference.GetSpacing()[:2])


@pytest.mark.parametrize("name, hint", [
    ("analyze.hdr", "Analyze 7.5"), ("test.mgz", "FreeSurfer MGH"), ("tiny.mnc", "MINC"),
    ("T1.PAR", "Philips PAR/REC"),
])
def test_unsupported_formats_say_what_they_are_and_what_to_do(name: str, hint: str) -> None:
    path = packaged_nifti(name)
    with pytest.raises(ValueError, match="unsupported file type") as caught:
        read_volume(path)
    assert str(path) in str(caught.value) and hint in str(caught.value)
    assert "convert it to NIfTI" in str(caught.value)


@pytest.mark.parametrize("name", ["0.dcm", "nicom/tests/data/csa_slice_norm.dcm"])
def test_siemens_mosaic_is_refused_with_what_to_do(name: str) -> None:
    path = packaged_nifti(name)
    with pytest.raises(ValueError, match="Siemens MOSAIC") as caught:
        read_volume(path)
    assert str(path) in str(caught.value) and "dcm2niix" in str(caught.value)


def test_dicom_seg_of_a_real_export_with_malformed_patient_fields(tmp_path: Path) -> None:
    source = packaged_nifti("nicom/tests/data/slicethickness_empty_string.dcm")
    header = pydicom.dcmread(source, stop_before_pixels=True)
    assert header.PatientSex == "N/A"  # what highdicom refused
    volume = read_volume(source)
    labels = volume.with_array(np.ones(volume.shape_kji, np.uint8))
    seg = pydicom.dcmread(write_labels(labels, tmp_path / "seg.dcm", default_labels(2)))
    assert seg.PatientSex == "" and seg.PatientID == header.PatientID
    assert seg.StudyInstanceUID == header.StudyInstanceUID and seg.NumberOfFrames == 1


def test_batch_folder_warns_about_files_it_leaves_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("anatomical.nii", "test.mgz", "analyze.hdr"):
        shutil.copy(packaged_nifti(name), tmp_path / name)
    shutil.copy(packaged_dicom("CT_small.dcm"), tmp_path / "CT_small.dcm")
    with caplog.at_level(logging.WARNING, logger="sam2unet_core.io.cases"):
        cases = find_cases(tmp_path)
    assert [case.name for case in cases] == ["anatomical"]
    assert "ignoring 1 DICOM files" in caplog.text and "CT_small.dcm" in caplog.text
    assert "ignoring 2 files of unsupported formats (analyze.hdr, test.mgz)" in caplog.text


def test_wide_colour_rle_is_refused_and_8_bit_colour_rle_matches_pydicom() -> None:
    wide = packaged_dicom("SC_rgb_rle_16bit.dcm")  # GDCM decodes its first pixel as
    with pytest.raises(ValueError, match="16- or 32-bit samples") as caught:  # not red
        read_volume(wide)
    assert str(wide) in str(caught.value)
    narrow = packaged_dicom("SC_rgb_rle.dcm")
    expected = pydicom.dcmread(narrow).pixel_array  # pydicom's own RLE decoder
    np.testing.assert_array_equal(read_volume(narrow).array_kji[0], expected)


@pytest.mark.parametrize("name, fmt", [("reoriented_anat_moved.nii", "seg.nrrd"),
                                       ("anatomical.nii", "nii.gz")])
def test_labels_land_on_the_voxels_they_were_predicted_for(
    name: str, fmt: str, tmp_path: Path
) -> None:
    """A "model" that thresholds intensity, run across sagittal slices: read back by
    SimpleITK, the labels must match the threshold of SimpleITK's own reading of the input
    voxel for voxel (a flip or transpose anywhere would break that)."""
    from sam2unet_core.inference.engine import Predictor
    from sam2unet_core.inference.torch_runner import TorchRunner

    path = packaged_nifti(name)
    meta = ModelMetadata(
        architecture=Architecture("hiera_t", num_classes=1, in_channels=1), input_size=128,
        intensity={"kind": "percentile", "lower": 0.5, "upper": 99.5}, mean=[], std=[],
    )
    predictor = Predictor(TorchRunner(lambda x: (x[:, :1] - 0.5) * 40, metadata=meta,
                                      device="cpu", precision="fp32"))
    volume = read_volume(path)
    low, high = np.percentile(volume.array_kji, [0.5, 99.5])
    output = write_labels(predictor.predict(volume, axis="sagittal").labels, tmp_path / f"l.{fmt}")
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(path))) > (low + high) / 2
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(output))) > 0
    assert 0.2 < expected.mean() < 0.8
    assert (labels == expected).mean() > 0.98


def test_axis_on_a_single_slice_is_reported_not_silently_dropped(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = packaged_dicom("MR_small.dcm")
    with caplog.at_level(logging.WARNING, logger="sam2unet_core.inference.engine"):
        code, _ = predict(["-i", str(source), "-o", str(tmp_path), "-m", str(checkpoint),
                           "--axis", "sagittal"], capsys)
    assert code == 0 and "a single slice; the sagittal plane does not apply" in caplog.text
    assert sitk.ReadImage(str(tmp_path / "MR_small.nii.gz")).GetSize() == (64, 64, 1)
