"""The .nii.gz path: one ISA-L decompression that still checks the gzip CRC, ISA-L
compressed outputs that every reader reads back exactly, and an I/O import that costs
neither torch nor the other readers' libraries."""

from __future__ import annotations

import gzip
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from sam2unet_core.io import Volume, read_volume, write_labels


def ct_like(shape_ijk=(40, 30, 12)) -> nib.Nifti1Image:
    rng = np.random.default_rng(3)
    data = rng.integers(-1000, 1500, size=shape_ijk).astype(np.int16)
    angle = 0.2  # an oblique in-plane rotation
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-0.7, -0.7, 2.5])
    affine[:3, 3] = (12, -40, 80)
    return nib.Nifti1Image(data, affine)


def test_compressed_nifti_reads_the_voxels_and_geometry_nibabel_reads(tmp_path):
    path = tmp_path / "ct.nii.gz"
    nib.save(ct_like(), path)
    volume = read_volume(path)
    reference = nib.load(path)
    np.testing.assert_array_equal(volume.array_kji, np.asarray(reference.dataobj).transpose(2, 1, 0))
    itk = sitk.ReadImage(str(path))
    np.testing.assert_allclose(volume.origin_lps, itk.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(volume.spacing_ijk, itk.GetSpacing(), atol=1e-5)


def test_a_damaged_crc_is_refused_though_every_voxel_decodes(tmp_path):
    """The deflate stream is intact and the voxels end before the trailer: only reading to the
    end of the stream finds the wrong CRC-32."""
    data = bytearray(gzip.compress(ct_like().to_bytes(), mtime=0))
    data[-8] ^= 0xFF  # first byte of the CRC-32 in the gzip trailer
    path = tmp_path / "crc.nii.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=str(path)):
        read_volume(path)


def test_a_4d_compressed_image_gives_the_chosen_volume(tmp_path):
    data = np.arange(6 * 5 * 4 * 3, dtype=np.int16).reshape(6, 5, 4, 3)
    path = tmp_path / "series.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    for index in (2, 0):  # a later volume first, then a seek back to the first
        np.testing.assert_array_equal(read_volume(path, volume_index=index).array_kji,
                                      data[..., index].transpose(2, 1, 0))


def test_written_label_maps_read_back_exactly_and_the_bytes_are_reproducible(tmp_path):
    source = tmp_path / "ct.nii.gz"
    nib.save(ct_like(), source)
    volume = read_volume(source)
    labels = volume.with_array((volume.array_kji > 300).astype(np.uint8))
    first = write_labels(labels, tmp_path / "a.nii.gz")
    second = write_labels(labels, tmp_path / "b.nii.gz")
    assert first.read_bytes() == second.read_bytes()  # no time stamp nor file name inside
    back = read_volume(first)
    np.testing.assert_array_equal(back.array_kji, labels.array_kji)
    assert back.same_grid(volume, atol=1e-6)
    itk = sitk.ReadImage(str(first))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(itk), labels.array_kji)
    np.testing.assert_allclose(itk.GetDirection(), volume.direction_lps.ravel(), atol=1e-6)
    np.testing.assert_array_equal(nib.load(first).affine, nib.load(source).affine)


def test_labels_of_a_non_contiguous_array_are_written_in_nifti_order(tmp_path):
    array = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(6, 5, 4).transpose(0, 2, 1)  # (6, 4, 5) view
    path = write_labels(Volume(array), tmp_path / "view.nii.gz")
    np.testing.assert_array_equal(read_volume(path).array_kji, array)


def test_importing_the_checkpoint_module_loads_no_image_reader_library():
    code = ("import sys, sam2unet_core.checkpoint; "
            "print(sorted(m for m in ('pydicom', 'SimpleITK', 'highdicom', 'PIL') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_importing_io_costs_no_torch():
    code = "import sys, sam2unet_core.io; from sam2unet_core.io import read_volume; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
