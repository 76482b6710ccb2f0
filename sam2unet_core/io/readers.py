"""Read any supported image into a :class:`Volume`; the reader is chosen by file ending.

==========================  =========================================================
input                       reader
==========================  =========================================================
``.nii``, ``.nii.gz``       nibabel (any sform/qform, scaling applied), RAS -> LPS
``.nrrd``, ``.nhdr``        SimpleITK
``.mha``, ``.mhd``          SimpleITK
``.png``, ``.jpg``/``.jpeg`` Pillow; grey -> ``(1, H, W)``, colour -> ``(1, H, W, 3)``
a folder                    DICOM series (:mod:`sam2unet_core.io.dicom`)
``.dcm``                    one DICOM file (a slice or a multi-frame image), as is any
                            file with another ending that carries ``DICM`` at byte 128
==========================  =========================================================

Every reader raises ``ValueError`` naming the file and the cause when it cannot read it:
:func:`read_volume` is the one boundary where whatever the parsing libraries raise on
corrupt bytes (zlib, nibabel, pydicom, GDCM errors...) becomes such a ``ValueError``.
Sizes are checked against the free memory from the header, before any voxel is read.
"""

from __future__ import annotations

import gzip
import re
from functools import partial
from pathlib import Path
from typing import Callable, Protocol

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from PIL import Image, UnidentifiedImageError

from .convert import sitk_error_cause, volume_from_nifti, volume_from_sitk
from .dicom import looks_like_dicom, read_dicom_file, read_dicom_series
from .volume import Volume, check_fits_in_memory

__all__ = ["read_volume", "VolumeReader", "READERS", "IMAGE_SUFFIXES", "PICTURE_SUFFIXES", "split_suffix"]

GZIP_CHECK_CHUNK = 1 << 24  # bytes decompressed at a time by the integrity check


class VolumeReader(Protocol):
    def __call__(self, path: Path) -> Volume: ...


def _check_gzip(path: Path) -> None:
    """Decompress ``path`` to its end, which checks the gzip CRC: nibabel stops reading at
    the last voxel, so damaged bytes can otherwise decode silently into wrong voxels."""
    with gzip.open(path, "rb") as stream:
        while stream.read(GZIP_CHECK_CHUNK):
            pass


def _read_nifti(path: Path, volume_index: int | None = None) -> Volume:
    """nibabel reads the header here and the voxels (lazily) in ``volume_from_nifti``;
    ``volume_index`` picks one volume of a 4D image."""
    try:
        image = nib.load(path)
    except Exception as err:  # noqa: BLE001 - nibabel's header checks raise many kinds
        raise ValueError(f"{path}: not a readable NIfTI file ({err})") from err
    if not isinstance(image, nib.Nifti1Image):  # Nifti2Image is a Nifti1Image too
        raise ValueError(  # CIFTI-2 (.dconn/.dtseries.nii...): surface/grayordinate matrices
            f"{path}: a {type(image).__name__} file, not a NIfTI image volume; "
            "expected a 3D (or 4D) NIfTI-1/NIfTI-2 image"
        )
    slope, inter = image.header.get_slope_inter()
    scaled = slope not in (None, 1.0) or inter not in (None, 0.0)
    itemsize = 8 if scaled else image.get_data_dtype().itemsize  # scaling gives float64
    check_fits_in_memory(path, image.shape[:3] if volume_index is not None else image.shape,
                         itemsize)
    if path.name.lower().endswith(".gz"):
        _check_gzip(path)
    return volume_from_nifti(image, source=path, volume_index=volume_index)


def _read_sitk(path: Path) -> Volume:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        pixel = sitk.GetPixelIDValueAsString(reader.GetPixelIDValue())  # "16-bit signed..."
        bits = re.search(r"(\d+)-bit", pixel)
        itemsize = (int(bits.group(1)) // 8 if bits else 8) * reader.GetNumberOfComponents()
        check_fits_in_memory(path, reader.GetSize(), itemsize)
        image = reader.Execute()
    except RuntimeError as err:
        raise ValueError(f"{path}: SimpleITK cannot read it ({sitk_error_cause(err)})") from err
    return volume_from_sitk(image, source=path)


def _read_picture(path: Path) -> Volume:
    """PNG/JPG: column index i, row index j, spacing 1, identity direction."""
    try:
        with Image.open(path) as picture:
            picture.load()
            if picture.mode in ("L", "I", "I;16", "F"):
                array = np.asarray(picture)
            else:
                array = np.asarray(picture.convert("RGB"))  # palette, RGBA, CMYK -> RGB
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path}: not a readable PNG/JPEG image ({err})") from err
    return Volume(array[np.newaxis], source=path)  # (H, W[, 3]) -> (1, H, W[, 3])


READERS: dict[str, Callable[[Path], Volume]] = {
    ".nii.gz": _read_nifti,
    ".nii": _read_nifti,
    ".nrrd": _read_sitk,
    ".nhdr": _read_sitk,
    ".mha": _read_sitk,
    ".mhd": _read_sitk,
    ".png": _read_picture,
    ".jpg": _read_picture,
    ".jpeg": _read_picture,
    ".dcm": read_dicom_file,
}
IMAGE_SUFFIXES = tuple(READERS)
PICTURE_SUFFIXES = tuple(s for s, read in READERS.items() if read is _read_picture)  # 2D frames
_CONVERT = "; convert it to NIfTI first (e.g. with nibabel, or Slicer's Save)"
UNSUPPORTED_HINTS = {  # medical formats users try, with what to do about them
    ".hdr": f" (Analyze 7.5 / NIfTI pair: its orientation is ambiguous){_CONVERT}",
    ".img": f" (Analyze 7.5 / NIfTI pair: its orientation is ambiguous){_CONVERT}",
    ".mgz": f" (FreeSurfer MGH){_CONVERT} or mri_convert",
    ".mgh": f" (FreeSurfer MGH){_CONVERT} or mri_convert",
    ".mnc": f" (MINC){_CONVERT}",
    ".par": f" (Philips PAR/REC){_CONVERT} or dcm2niix",
    ".rec": f" (Philips PAR/REC){_CONVERT} or dcm2niix",
}


def split_suffix(path: Path) -> tuple[str, str]:
    """``("CASE_0000", ".nii.gz")`` for ``CASE_0000.nii.gz``; suffix "" when unknown.

    Slicer segmentations (``.seg.nrrd``) are outputs, not images: their suffix is reported
    as ``.seg.nrrd`` so that callers can leave them out.
    """
    name = path.name
    lower = name.lower()
    for suffix in (".seg.nrrd", *IMAGE_SUFFIXES):
        if lower.endswith(suffix):
            return name[: -len(suffix)], suffix
    return name, ""


def read_volume(
    path: str | Path, series_uid: str | None = None, volume_index: int | None = None
) -> Volume:
    """Read an image file or a DICOM folder as a :class:`Volume`.

    Args:
        path: a file with a supported ending, or a folder of DICOM files.
        series_uid: for DICOM folders with several series, the SeriesInstanceUID to read
            (default: the series with the most files).
        volume_index: for 4D NIfTI images (time series, echoes), the 0-based volume to
            read; 3D images ignore it. Without it, a 4D image is refused.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    if path.is_dir():
        reader: Callable[[Path], Volume] = lambda folder: read_dicom_series(folder, series_uid)
    else:
        _, suffix = split_suffix(path)
        if suffix in READERS:
            reader = READERS[suffix]
        elif looks_like_dicom(path):  # DICOM exports often have no file ending
            reader = read_dicom_file
        else:
            hint = UNSUPPORTED_HINTS.get(path.suffix.lower(), "")
            raise ValueError(
                f"{path}: unsupported file type{hint}; expected one of "
                f"{', '.join(IMAGE_SUFFIXES)} or a folder of DICOM files"
            )
        if reader is _read_nifti and volume_index is not None:
            reader = partial(_read_nifti, volume_index=volume_index)
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty (0 bytes)")
    try:
        return reader(path)
    except ValueError as err:
        if str(path) in str(err):
            raise
        raise ValueError(f"{path}: {err}") from err
    except MemoryError as err:
        raise ValueError(f"{path}: not enough memory to read it ({err})") from err
    except Exception as err:  # noqa: BLE001 - corrupt bytes make parsers raise anything
        raise ValueError(
            f"{path}: corrupt or unreadable file ({type(err).__name__}: {err})"
        ) from err
