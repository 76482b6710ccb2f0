"""Geometry round trips of the Volume type through NIfTI, NRRD, MHA, seg.nrrd and PNG,
checked against nibabel (RAS) and SimpleITK (LPS) reading the same files."""

from __future__ import annotations

import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy.spatial.transform import Rotation

from sam2unet_core.io import Volume, affine_ras, read_volume, write_labels, write_probabilities
from sam2unet_core.io.convert import volume_to_sitk
from sam2unet_core.io.volume import geometry_from_affine_ras, label_dtype
from sam2unet_core.metadata import LabelInfo, default_labels

OBLIQUE = Rotation.from_euler("xyz", [20, -35, 50], degrees=True).as_matrix()


def oblique_volume(shape_kji=(7, 11, 13), dtype=np.int16, seed=0) -> Volume:
    rng = np.random.default_rng(seed)
    array = rng.integers(-1000, 1000, size=shape_kji).astype(dtype)
    return Volume(array, spacing_ijk=(0.7, 0.9, 2.5), origin_lps=(-12.5, 30.25, 101.0),
                  direction_lps=OBLIQUE)


def assert_geometry(image: sitk.Image, volume: Volume) -> None:
    assert image.GetSize() == volume.shape_kji[::-1]
    np.testing.assert_allclose(image.GetSpacing(), volume.spacing_ijk, atol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), volume.origin_lps, atol=1e-4)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), volume.direction_lps,
                               atol=1e-5)


def test_lps_and_ras_affines_place_a_voxel_at_the_same_point() -> None:
    volume = oblique_volume()
    index_ijk = np.array([3.0, 5.0, 2.0])
    lps = volume.origin_lps + volume.direction_lps @ (volume.spacing_ijk * index_ijk)
    ras = affine_ras(volume) @ np.append(index_ijk, 1.0)
    np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1])
    image = volume_to_sitk(volume)
    np.testing.assert_allclose(image.TransformContinuousIndexToPhysicalPoint(index_ijk), lps)


def test_nifti_written_by_nibabel_reads_like_simpleitk_reads_it(tmp_path: Path) -> None:
    """A RAS file made by nibabel alone: our reader must give SimpleITK's LPS geometry and
    the same (K, J, I) array."""
    data_ijk = np.random.default_rng(1).normal(size=(9, 8, 5)).astype(np.float32)
    affine = np.eye(4)
    affine[:3, :3] = OBLIQUE @ np.diag([0.8, 1.1, 3.0])
    affine[:3, 3] = [10.0, -20.0, 5.0]
    path = tmp_path / "ras.nii.gz"
    nib.save(nib.Nifti1Image(data_ijk, affine), path)

    volume = read_volume(path)
    reference = sitk.ReadImage(str(path))
    assert_geometry(reference, volume)
    np.testing.assert_array_equal(volume.array_kji, sitk.GetArrayFromImage(reference))
    np.testing.assert_array_equal(volume.array_kji[4, 7, 8], data_ijk[8, 7, 4])
    np.testing.assert_allclose(affine_ras(volume), affine, atol=1e-6)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".seg.nrrd"])
def test_label_map_keeps_oblique_geometry_for_both_libraries(tmp_path: Path, suffix: str) -> None:
    volume = oblique_volume()
    labels = volume.with_array((volume.array_kji > 0).astype(np.uint8) * 2)
    path = write_labels(labels, tmp_path / f"labels{suffix}", default_labels(3))

    image = sitk.ReadImage(str(path))
    assert_geometry(image, volume)
    assert image.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), labels.array_kji)
    back = read_volume(path) if suffix != ".seg.nrrd" else None
    if back is not None:
        assert back.same_grid(volume)
        np.testing.assert_array_equal(back.array_kji, labels.array_kji)
    if suffix.startswith(".nii"):
        nifti = nib.load(path)
        np.testing.assert_allclose(nifti.affine, affine_ras(volume), atol=1e-4)
        assert int(nifti.header["qform_code"]) == 1 and int(nifti.header["sform_code"]) == 1
        np.testing.assert_array_equal(np.asanyarray(nifti.dataobj), labels.array_kji.T)


def test_axis_aligned_lps_volume_has_negative_ras_diagonal(tmp_path: Path) -> None:
    """An identity LPS direction (DICOM axial) is diag(-1, -1, 1) in nibabel's RAS."""
    volume = Volume(np.zeros((2, 3, 4), np.uint8), spacing_ijk=(1, 2, 3), origin_lps=(5, 6, 7))
    path = write_labels(volume, tmp_path / "x.nii.gz")
    np.testing.assert_allclose(nib.load(path).affine[:3, :3], np.diag([-1.0, -2.0, 3.0]))
    np.testing.assert_allclose(nib.load(path).affine[:3, 3], [-5.0, -6.0, 7.0])
    assert nib.aff2axcodes(nib.load(path).affine) == ("L", "P", "S")


def test_seg_nrrd_carries_segment_names_colours_and_extents(tmp_path: Path) -> None:
    labels = [LabelInfo(1, "liver", (200, 100, 50)), LabelInfo(2, "spleen", (0, 255, 0))]
    array = np.zeros((4, 5, 6), np.uint8)
    array[1:3, 2:4, 0:5] = 1  # k 1..2, j 2..3, i 0..4
    path = write_labels(Volume(array), tmp_path / "s.seg.nrrd", labels)
    image = sitk.ReadImage(str(path))
    fields = {key: image.GetMetaData(key) for key in image.GetMetaDataKeys()}
    assert fields["Segment0_Name"] == "liver" and fields["Segment1_Name"] == "spleen"
    assert fields["Segment0_LabelValue"] == "1" and fields["Segment1_LabelValue"] == "2"
    np.testing.assert_allclose([float(v) for v in fields["Segment0_Color"].split()],
                               [200 / 255, 100 / 255, 50 / 255], atol=1e-5)
    assert fields["Segment0_Extent"] == "0 4 2 3 1 2"
    assert fields["Segment1_Extent"] == "0 -1 0 -1 0 -1"  # empty segment
    assert fields["Segmentation_MasterRepresentation"] == "Binary labelmap"
    text = path.read_bytes()[:400].decode("latin-1")
    assert "space: left-posterior-superior" in text
    assert fields["Segment1_ID"] == "Segment_2"


def test_label_maps_past_255_classes_are_uint16(tmp_path: Path) -> None:
    assert label_dtype(255) == np.uint8 and label_dtype(256) == np.uint16
    array = np.full((2, 2, 2), 300, np.uint16)
    image = sitk.ReadImage(str(write_labels(Volume(array), tmp_path / "many.nii.gz")))
    assert image.GetPixelID() == sitk.sitkUInt16 and sitk.GetArrayFromImage(image).max() == 300


def test_writes_are_atomic_and_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    float_labels = Volume(np.zeros((2, 2, 2), np.float32))
    with pytest.raises(ValueError, match="integer"):
        write_labels(float_labels, tmp_path / "bad.nii.gz")
    not_dicom = Volume(np.zeros((2, 2, 2), np.uint8), source=tmp_path / "x.nii.gz")
    with pytest.raises(ValueError, match="DICOM SEG needs a DICOM input"):
        write_labels(not_dicom, tmp_path / "seg.dcm", default_labels(1))
    assert list(tmp_path.iterdir()) == []


def test_probability_maps_keep_geometry_and_channels(tmp_path: Path) -> None:
    volume = oblique_volume(shape_kji=(3, 4, 5))
    probs = volume.with_array(np.random.default_rng(0).random((3, 4, 5, 2)).astype(np.float32))
    path = write_probabilities(probs, tmp_path / "p.nii.gz")
    nifti = nib.load(path)
    assert nifti.shape == (5, 4, 3, 2)
    np.testing.assert_allclose(np.asanyarray(nifti.dataobj)[..., 1].T, probs.array_kji[..., 1])
    np.testing.assert_allclose(nifti.affine, affine_ras(volume), atol=1e-4)


def test_png_and_jpg_pictures_read_as_one_slice(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "frame.png")
    Image.fromarray(rgb).save(tmp_path / "frame.jpg")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    colour = read_volume(tmp_path / "frame.png")
    assert colour.array_kji.shape == (1, 20, 30, 3) and colour.num_channels == 3
    np.testing.assert_array_equal(colour.array_kji[0], rgb)
    assert read_volume(tmp_path / "frame.jpg").array_kji.shape == (1, 20, 30, 3)
    assert read_volume(tmp_path / "grey.png").array_kji.shape == (1, 20, 30)

    mask = colour.with_array((rgb[np.newaxis, ..., 0] > 128).astype(np.uint8))
    written = np.asarray(Image.open(write_labels(mask, tmp_path / "mask.png")))
    np.testing.assert_array_equal(written, mask.array_kji[0] * 255)  # binary -> 0/255


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        (b"not a nifti", "broken.nii.gz", "not a readable NIfTI"),
        (b"not a nifti", "broken.nii", "not a readable NIfTI"),
        (b"NRRD0004\ngarbage", "broken.nrrd", "SimpleITK cannot read"),
        (b"\x89PNG\r\n", "broken.png", "not a readable PNG"),
        (b"hello", "notes.txt", "unsupported file type"),
    ],
)
def test_bad_files_raise_errors_naming_the_file(
    tmp_path: Path, content: bytes, name: str, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        read_volume(path)
    assert str(path) in str(info.value)


def test_missing_path_and_4d_nifti_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file"):
        read_volume(tmp_path / "absent.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)), tmp_path / "4d.nii.gz")
    with pytest.raises(ValueError, match="expected a 3D volume"):
        read_volume(tmp_path / "4d.nii.gz")


def test_sheared_affine_keeps_its_shear_through_nibabel(tmp_path: Path) -> None:
    affine = np.array([[1.0, 0.3, 0, 0], [0, 1.0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    spacing, origin, direction = geometry_from_affine_ras(affine)
    volume = Volume(np.zeros((2, 2, 2), np.uint8), spacing, origin, direction)
    np.testing.assert_allclose(affine_ras(volume), affine, atol=1e-12)


REAL_NIFTI = [
    Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii",  # LAS, big-endian int16
    Path(nib.__file__).parent / "tests" / "data" / "reoriented_anat_moved.nii",  # RAS float
    Path(nib.__file__).parent / "tests" / "data" / "standard.nii.gz",  # sform only
]


@pytest.mark.parametrize("path", REAL_NIFTI, ids=lambda p: p.name)
def test_real_nifti_files_read_like_simpleitk_and_write_back_their_affine(
    path: Path, tmp_path: Path
) -> None:
    volume = read_volume(path)
    reference = sitk.ReadImage(str(path))
    assert_geometry(reference, volume)
    np.testing.assert_array_equal(volume.array_kji, sitk.GetArrayFromImage(reference))
    labels = volume.with_array((volume.array_kji > np.median(volume.array_kji)).astype(np.uint8))
    written = nib.load(write_labels(labels, tmp_path / "labels.nii.gz"))
    np.testing.assert_allclose(written.affine, nib.load(path).affine, atol=1e-4)
    assert written.shape == nib.load(path).shape
    assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(nib.load(path).affine)


@given(
    angles=st.tuples(*[st.floats(-180, 180)] * 3),
    spacing=st.tuples(*[st.floats(0.1, 5.0)] * 3),
    origin=st.tuples(*[st.floats(-500, 500)] * 3),
    shape=st.tuples(*[st.integers(1, 6)] * 3),
    suffix=st.sampled_from([".nii.gz", ".seg.nrrd", ".mha"]),
)
@settings(max_examples=40, deadline=None)
def test_any_geometry_survives_a_label_round_trip(angles, spacing, origin, shape, suffix) -> None:
    volume = Volume(np.ones(shape, np.uint8), spacing, origin,
                    Rotation.from_euler("xyz", angles, degrees=True).as_matrix())
    with tempfile.TemporaryDirectory() as folder:
        path = write_labels(volume, Path(folder) / f"x{suffix}", default_labels(1))
        assert_geometry(sitk.ReadImage(str(path)), volume)
        if suffix == ".nii.gz":
            assert read_volume(path).same_grid(volume)


def test_nifti_output_keeps_the_inputs_qform_and_sform_when_they_disagree(tmp_path: Path) -> None:
    """nibabel trusts the sform, ITK/Slicer may trust the qform: with both copied, the
    output lands on the input in either tool."""
    data = np.zeros((6, 7, 5), np.int16)
    image = nib.Nifti1Image(data, np.eye(4))
    qform = np.eye(4)
    qform[:3, :3] = Rotation.from_euler("z", 10, degrees=True).as_matrix() @ np.diag([1, 1, 2])
    qform[:3, 3] = [1, 2, 3]
    sform = np.diag([1.0, 1.0, 2.0, 1.0])
    sform[:3, 3] = [4, 5, 6]
    image.set_qform(qform, code=1)
    image.set_sform(sform, code=2)
    nib.save(image, tmp_path / "in.nii.gz")

    volume = read_volume(tmp_path / "in.nii.gz")
    labels = volume.with_array(np.ones(volume.shape_kji, np.uint8))
    out = nib.load(write_labels(labels, tmp_path / "out.nii.gz"))
    q, q_code = out.header.get_qform(coded=True)
    s, s_code = out.header.get_sform(coded=True)
    assert (int(q_code), int(s_code)) == (1, 2)
    np.testing.assert_allclose(q, qform, atol=1e-5)
    np.testing.assert_allclose(s, sform, atol=1e-5)
    reference, written = sitk.ReadImage(str(tmp_path / "in.nii.gz")), sitk.ReadImage(str(tmp_path / "out.nii.gz"))
    np.testing.assert_allclose(written.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(written.GetDirection(), reference.GetDirection(), atol=1e-5)
