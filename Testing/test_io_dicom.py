"""DICOM series: pydicom's bundled real files, an oblique series written here with pydicom,
series listing/selection, the bad-series errors, and DICOM SEG output (highdicom)."""

from __future__ import annotations

import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file
from scipy.spatial.transform import Rotation

from dicom_data import write_ct_series
from sam2unet_core.io import list_dicom_series, read_volume, write_labels
from sam2unet_core.metadata import LabelInfo

TEST_FILES = Path(get_testdata_file("CT_small.dcm")).parent
CT_SERIES = TEST_FILES / "dicomdirtests" / "98892001" / "CT5N"  # 5 real axial CT slices
TWO_SERIES = TEST_FILES / "dicomdirtests" / "98892001"  # CT5N plus a 2-file scout
UNEVEN_GAPS = TEST_FILES / "dicomdirtests" / "77654033" / "CT2"  # slices 1.25 and 202.5 mm apart
MIXED_ORIENTATIONS = TEST_FILES / "dicomdirtests" / "98892003" / "MR700"  # projections


def write_oblique_series(folder: Path, shape_kji=(6, 10, 12), seed: int = 0) -> dict:
    """A CT series with oblique orientation, shuffled file names and HU rescaling."""
    rotation = Rotation.from_euler("xyz", [15, -25, 40], degrees=True).as_matrix()
    row, col = rotation[:, 0], rotation[:, 1]
    normal = np.cross(row, col)
    spacing = (0.6, 0.8, 1.7)  # i (along a row), j (down a column), k
    origin = np.array([-30.0, 12.5, 80.0])
    pixels = np.random.default_rng(seed).integers(0, 2000, shape_kji).astype(np.uint16)
    positions = [origin + k * spacing[2] * normal for k in range(shape_kji[0])]
    series_uid = write_ct_series(
        folder, pixels, positions, row, col, spacing[:2], rescale_intercept=-1024,
        file_name=lambda k: f"img{(k * 7) % shape_kji[0]:03d}",
        tags={"SliceThickness": spacing[2], "SeriesDescription": "oblique"},
    )
    return {"direction": np.stack([row, col, normal], axis=1), "spacing": spacing,
            "origin": origin, "hu": pixels.astype(np.int32) - 1024, "uid": series_uid}


def test_real_ct_series_matches_its_headers_and_simpleitk() -> None:
    volume = read_volume(CT_SERIES)
    headers = sorted((pydicom.dcmread(f) for f in CT_SERIES.iterdir()),
                     key=lambda ds: float(ds.ImagePositionPatient[2]))
    assert volume.shape_kji == (5, 16, 16)
    np.testing.assert_allclose(volume.origin_lps, [float(v) for v in headers[0].ImagePositionPatient])
    np.testing.assert_allclose(volume.spacing_ijk[:2], [float(v) for v in headers[0].PixelSpacing][::-1])
    np.testing.assert_allclose(volume.spacing_ijk[2], 2.5, atol=1e-4)
    for k, ds in enumerate(headers):  # slice order follows the normal; rescale applied
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(volume.array_kji[k], hu)
    assert [Path(f).name for f in volume.dicom_files] == [Path(ds.filename).name for ds in headers]

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(CT_SERIES)))
    reference = reader.Execute()
    np.testing.assert_allclose(reference.GetOrigin(), volume.origin_lps, atol=1e-4)
    np.testing.assert_allclose(reference.GetSpacing(), volume.spacing_ijk, atol=1e-4)
    assert volume.meta["modality"] == "CT"


def test_oblique_series_geometry_and_values(tmp_path: Path) -> None:
    truth = write_oblique_series(tmp_path / "oblique")
    volume = read_volume(tmp_path / "oblique")
    np.testing.assert_allclose(volume.direction_lps, truth["direction"], atol=1e-6)
    np.testing.assert_allclose(volume.spacing_ijk, truth["spacing"], atol=1e-5)
    np.testing.assert_allclose(volume.origin_lps, truth["origin"], atol=1e-4)
    np.testing.assert_array_equal(volume.array_kji, truth["hu"])


def test_label_map_of_a_dicom_series_has_its_geometry_in_nifti(tmp_path: Path) -> None:
    """DICOM in, NIfTI out: SimpleITK reading our NIfTI equals SimpleITK reading the DICOM."""
    write_oblique_series(tmp_path / "oblique")
    volume = read_volume(tmp_path / "oblique")
    labels = volume.with_array((volume.array_kji > 0).astype(np.uint8))
    out = sitk.ReadImage(str(write_labels(labels, tmp_path / "labels.nii.gz")))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "oblique")))
    reference = reader.Execute()
    assert out.GetSize() == reference.GetSize()
    np.testing.assert_allclose(out.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(out.GetSpacing(), reference.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(out.GetDirection(), reference.GetDirection(), atol=1e-5)


def test_folder_with_two_series_lists_both_and_takes_the_largest() -> None:
    found = list_dicom_series(TWO_SERIES)
    assert [len(s.files) for s in found] == [5, 2]
    assert found[1].description == "Scout"
    volume = read_volume(TWO_SERIES)
    assert volume.meta["series_uid"] == found[0].uid and volume.meta["series_in_folder"] == 2


def test_series_is_chosen_by_uid_and_an_unknown_uid_lists_the_choices(tmp_path: Path) -> None:
    truth = write_oblique_series(tmp_path / "mixed" / "a")
    shutil.copytree(CT_SERIES, tmp_path / "mixed" / "b")
    assert read_volume(tmp_path / "mixed", series_uid=truth["uid"]).shape_kji == (6, 10, 12)
    assert read_volume(tmp_path / "mixed").shape_kji == (6, 10, 12)  # largest: 6 > 5 files
    with pytest.raises(ValueError, match="no series with SeriesInstanceUID 1.2.3") as info:
        read_volume(tmp_path / "mixed", series_uid="1.2.3")
    assert truth["uid"] in str(info.value)


@pytest.mark.parametrize(
    ("folder", "message"),
    [
        (UNEVEN_GAPS, "slice gaps are uneven"),
        (MIXED_ORIENTATIONS, "different orientations"),
    ],
)
def test_series_that_are_not_one_regular_volume_are_refused(folder: Path, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        read_volume(folder)
    assert str(folder) in str(info.value)


def test_folder_without_dicom_and_duplicate_positions_are_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match="no DICOM image files"):
        read_volume(tmp_path / "empty")
    (tmp_path / "twice").mkdir()
    for name in ("a.dcm", "b.dcm"):
        shutil.copy(CT_SERIES / sorted(p.name for p in CT_SERIES.iterdir())[0],
                    tmp_path / "twice" / name)
    with pytest.raises(ValueError, match="share one position"):
        read_volume(tmp_path / "twice")


def test_single_dicom_files_read_as_one_slice() -> None:
    ct = read_volume(TEST_FILES / "CT_small.dcm")
    assert ct.shape_kji == (1, 128, 128)
    np.testing.assert_allclose(ct.origin_lps, [-158.135803, -179.035797, -75.699997])
    mr = read_volume(TEST_FILES / "MR_small.dcm")
    assert mr.shape_kji == (1, 64, 64) and mr.is_dicom


def test_dicom_seg_references_each_source_slice(tmp_path: Path) -> None:
    write_oblique_series(tmp_path / "oblique")
    volume = read_volume(tmp_path / "oblique")
    array = np.zeros(volume.shape_kji, np.uint8)
    array[1:4, 2:6, 3:9] = 1
    array[4, 5:8, 1:4] = 2
    labels = [LabelInfo(1, "lesion", (255, 0, 0)), LabelInfo(2, "vessel", (0, 0, 255))]
    path = write_labels(volume.with_array(array), tmp_path / "seg.dcm", labels)

    seg = hd.seg.segread(path)
    assert seg.get_segment_description(1).segment_label == "lesion"
    assert seg.get_segment_description(2).segment_label == "vessel"
    source_uids = [str(pydicom.dcmread(f).SOPInstanceUID) for f in volume.dicom_files]
    combined = seg.get_pixels_by_source_instance(source_uids, combine_segments=True)
    np.testing.assert_array_equal(combined, array)
    source = pydicom.dcmread(volume.dicom_files[0])
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID


def test_dicom_seg_of_the_real_ct_series(tmp_path: Path) -> None:
    volume = read_volume(CT_SERIES)
    array = (volume.array_kji > np.median(volume.array_kji)).astype(np.uint8)
    path = write_labels(volume.with_array(array), tmp_path / "ct.dcm",
                        [LabelInfo(1, "dense", (250, 250, 210))])
    seg = hd.seg.segread(path)
    uids = [str(pydicom.dcmread(f).SOPInstanceUID) for f in volume.dicom_files]
    np.testing.assert_array_equal(
        seg.get_pixels_by_source_instance(uids, combine_segments=True), array
    )
