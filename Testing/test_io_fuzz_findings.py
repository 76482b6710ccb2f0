"""Regression tests for what ``Testing/fuzz/fuzz_inputs.py --target volume`` found (see
``Testing/fuzz/FINDINGS.md``): each kind of mutated file, rebuilt here from a valid one,
must give a ``ValueError`` that names the file and the cause, nothing else."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from sam2unet_core.io import read_volume

CT_SMALL = Path(get_testdata_file("CT_small.dcm"))  # explicit VR little endian


def nifti_bytes() -> bytes:
    """A valid single-file NIfTI-1 (348-byte header, 4 extension bytes, int16 voxels)."""
    image = nib.Nifti1Image(np.arange(32 * 32 * 8, dtype=np.int16).reshape(32, 32, 8), np.eye(4))
    return image.to_bytes()


def with_header_field(offset: int, fmt: str, value: float) -> bytes:
    data = bytearray(nifti_bytes())
    data[offset:offset + struct.calcsize(fmt)] = struct.pack(fmt, value)
    return bytes(data)


def deflate_broken() -> bytes:
    """A .nii.gz whose deflate stream is damaged (30 bytes inverted near its start)."""
    data = bytearray(gzip.compress(nifti_bytes(), mtime=0))
    for index in range(30, 60):
        data[index] ^= 0xFF
    return bytes(data)


def dicom_element_edit(tag: bytes, edit: str) -> bytes:
    """CT_small.dcm with one explicit-VR element (``tag`` = group, element as bytes)
    given an unknown VR, an odd value length, or two values where one is expected."""
    data = bytearray(CT_SMALL.read_bytes())
    at = data.index(tag + b"US")
    if edit == "unknown_vr":
        data[at + 4:at + 6] = b"TS"
    elif edit == "odd_length":
        data[at + 6:at + 8] = struct.pack("<H", 3)
        data[at + 8:at + 8] = b"\x00"
    else:  # two values
        data[at + 6:at + 8] = struct.pack("<H", 4)
        data[at + 8:at + 8] = b"\x00\x00"
    return bytes(data)


def dicom_position_text(text: bytes) -> bytes:
    """CT_small.dcm whose ImagePositionPatient starts with ``text`` instead of a number."""
    data = bytearray(CT_SMALL.read_bytes())
    at = data.index(b"\x20\x00\x32\x00DS") + 8  # (0020,0032) DS, 2-byte length, value
    data[at:at + len(text)] = text
    return bytes(data)


def dicom_without_columns(folder: Path) -> bytes:
    ds = pydicom.dcmread(CT_SMALL)
    del ds.Columns
    ds.save_as(folder / "source.dcm")
    return (folder / "source.dcm").read_bytes()


ROWS = b"\x28\x00\x10\x00"  # (0028,0010) Rows
COLUMNS = b"\x28\x00\x11\x00"  # (0028,0011) Columns


@pytest.mark.parametrize(
    ("name", "build", "message"),
    [
        # nibabel HeaderDataError
        ("voxoffset.nii", lambda _: with_header_field(108, "<f", 10.0), "vox offset 10 too low"),
        ("datacode.nii", lambda _: with_header_field(70, "<h", 0), "data code 0 not supported"),
        # zlib.error, EOFError from gzip
        ("deflate.nii.gz", lambda _: deflate_broken(), "Error -3 while decompressing"),
        ("cut.nii.gz", lambda _: gzip.compress(nifti_bytes(), mtime=0)[:900],
         "Compressed file ended"),
        # pydicom NotImplementedError, BytesLengthException, TypeError, AttributeError
        ("vr.dcm", lambda _: dicom_element_edit(COLUMNS, "unknown_vr"), "Unknown Value Representation"),
        ("odd.dcm", lambda _: dicom_element_edit(COLUMNS, "odd_length"), "BytesLengthException"),
        ("rows.dcm", lambda _: dicom_element_edit(ROWS, "two_values"), "corrupt DICOM header"),
        ("columns.dcm", dicom_without_columns, "corrupt DICOM header.*Columns"),
        # ValueError that did not name the file (float("abc...") in the slice sorting)
        ("position.dcm", lambda _: dicom_position_text(b"abc"), "could not convert string to float"),
    ],
)
def test_mutated_files_give_a_value_error_naming_the_file(
    tmp_path: Path, name: str, build, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(build(tmp_path))
    with pytest.raises(ValueError, match=message) as info:
        read_volume(path)
    assert str(path) in str(info.value)


def test_a_corrupt_slice_in_a_dicom_folder_is_skipped_with_a_warning_and_shows_as_a_gap(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Five real CT slices, the middle one damaged: the series has a hole, which is refused
    as uneven gaps rather than read as a shorter volume."""
    series = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" / "98892001" / "CT5N"
    files = sorted(series.iterdir(), key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    folder = tmp_path / "series"
    folder.mkdir()
    for index, source in enumerate(files):
        data = source.read_bytes()
        if index == 2:
            at = data.index(b"\x20\x00\x32\x00DS") + 8
            data = data[:at] + b"abc" + data[at + 3:]
        (folder / f"slice{index}.dcm").write_bytes(data)
    with pytest.raises(ValueError, match="slice gaps are uneven") as info:
        read_volume(folder)
    assert str(folder) in str(info.value)
    assert "slice2.dcm" in caplog.text and "corrupt DICOM header" in caplog.text
