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

A compressed NIfTI file is decompressed once, with ISA-L (``isal.igzip``, several times
faster than zlib), straight into the voxel array, and then to its end, which checks the gzip
CRC. A NIfTI file is decompressed when its bytes start with the gzip magic, whatever its name
says (``.nii.gz`` files that are not compressed, which SimpleITK reads too, and ``.nii``
files that are, which it refuses); a warning names the file and the wrong ending. A path that cannot be read at
all (a link to nothing, a link loop, no read permission) is refused with the reason, by
:func:`unreadable_reason`, which the batch search uses too.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import re
from pathlib import Path
from dataclasses import dataclass
from typing import Protocol

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from isal import igzip
from nibabel.fileholders import FileHolder
from PIL import Image, UnidentifiedImageError

from ..errors import OutOfMemoryError, Sam2UNetError, UnreadableInputError
from .convert import sitk_error_cause, volume_from_nifti, volume_from_sitk
from .dicom import looks_like_dicom, read_dicom_file, read_dicom_series
from .errors import error_text
from .sitk_paths import sitk_read_paths
from .volume import GIB, Volume, available_memory, check_fits_in_memory

__all__ = ["read_volume", "VolumeReader", "READERS", "IMAGE_SUFFIXES", "PICTURE_SUFFIXES",
           "split_suffix", "unreadable_reason", "ReadOptions"]

logger = logging.getLogger(__name__)

GZIP_CHECK_CHUNK = 1 << 24  # bytes decompressed at a time by the integrity check
GZIP_MAGIC = b"\x1f\x8b"
NIFTI2_HEADER_SIZE = 540  # sizeof_hdr of NIfTI-2 (NIfTI-1: 348)


@dataclass(frozen=True)
class ReadOptions:
    """Choices a reader may need: ``series_uid`` picks a series of a DICOM folder (default:
    the largest), ``volume_index`` one volume of a 4D NIfTI (default: 4D is refused)."""

    series_uid: str | None = None
    volume_index: int | None = None


class VolumeReader(Protocol):
    """Every entry of :data:`READERS` (and the DICOM folder reader) has this signature."""

    def __call__(self, path: Path, options: ReadOptions) -> Volume: ...


def _read_gzip_nifti(path: Path, image_class: type[nib.Nifti1Image],
                     volume_index: int | None) -> Volume:
    """Decompress a ``.nii.gz`` once: nibabel reads the header and the voxels from an ISA-L
    stream (straight into the array), then the stream is read to its end, which checks the
    gzip CRC: the voxels end before the file does, so damaged bytes would otherwise decode
    silently into wrong voxels."""
    with igzip.open(path, "rb") as stream:
        holder = FileHolder(fileobj=stream)
        image = image_class.from_file_map({"header": holder, "image": holder})
        volume = volume_from_nifti(image, source=path, volume_index=volume_index)
        while stream.read(GZIP_CHECK_CHUNK):
            pass
    return volume


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as stream:
        return stream.read(len(GZIP_MAGIC)) == GZIP_MAGIC


def _load_misnamed_nifti(path: Path, compressed: bool) -> nib.Nifti1Image:
    """nibabel picks (de)compression from the file name; a misnamed file is read from its
    (decompressed) bytes instead, after its header's size has passed the memory check."""
    opener = igzip.open if compressed else open
    with opener(path, "rb") as stream:
        head = stream.read(NIFTI2_HEADER_SIZE)
        is_nifti2 = NIFTI2_HEADER_SIZE in (int.from_bytes(head[:4], "little"),
                                           int.from_bytes(head[:4], "big"))
        image_class = nib.Nifti2Image if is_nifti2 else nib.Nifti1Image
        header = image_class.header_class.from_fileobj(io.BytesIO(head))
        itemsize = header.get_data_dtype().itemsize
        check_fits_in_memory(path, header.get_data_shape(), itemsize + 1,
                             what="the image (its bytes, voxels plus a label map)")
        data = head + stream.read()
    return image_class.from_bytes(data)


def _read_nifti(path: Path, options: ReadOptions) -> Volume:
    """nibabel reads the header here and the voxels (lazily) in ``volume_from_nifti``, those
    of a ``.nii.gz`` from one ISA-L stream (``_read_gzip_nifti``); ``volume_index`` picks one
    volume of a 4D image. Compression is decided from the bytes."""
    compressed = _is_gzip(path)
    named_compressed = path.name.lower().endswith(".gz")
    try:
        if compressed == named_compressed:
            image = nib.load(path)
        else:
            logger.warning(
                "%s: the file is %s but its name ends in %s; read as %s NIfTI (rename it to "
                "end in %s)", path, "gzip-compressed" if compressed else "not compressed",
                ".nii.gz" if named_compressed else ".nii",
                "compressed" if compressed else "uncompressed",
                ".nii.gz" if compressed else ".nii",
            )
            image = _load_misnamed_nifti(path, compressed)
    except Exception as err:  # noqa: BLE001 - nibabel's header checks raise many kinds
        if isinstance(err, ValueError) and str(path) in str(err):  # the memory check
            raise
        raise ValueError(f"{path}: not a readable NIfTI file ({error_text(err)})") from err
    if not isinstance(image, nib.Nifti1Image):  # Nifti2Image is a Nifti1Image too
        raise ValueError(  # CIFTI-2 (.dconn/.dtseries.nii...): surface/grayordinate matrices
            f"{path}: a {type(image).__name__} file, not a NIfTI image volume; "
            "expected a 3D (or 4D) NIfTI-1/NIfTI-2 image"
        )
    slope, inter = image.header.get_slope_inter()
    scaled = slope not in (None, 1.0) or inter not in (None, 0.0)
    itemsize = 8 if scaled else image.get_data_dtype().itemsize  # scaling gives float64
    volume_index = options.volume_index
    check_fits_in_memory(path, image.shape[:3] if volume_index is not None else image.shape,
                         itemsize)
    if compressed and compressed == named_compressed:  # a misnamed file was read whole
        return _read_gzip_nifti(path, type(image), volume_index)
    return volume_from_nifti(image, source=path, volume_index=volume_index)


def _read_sitk(path: Path, options: ReadOptions = ReadOptions()) -> Volume:
    reader = sitk.ImageFileReader()
    with sitk_read_paths([path]) as (readable,):
        reader.SetFileName(readable)
        try:
            reader.ReadImageInformation()
            pixel = sitk.GetPixelIDValueAsString(reader.GetPixelIDValue())  # "16-bit signed..."
            if "complex" in pixel:
                raise ValueError(
                    f"{path}: complex-valued voxels ({pixel}, e.g. raw MR k-space or phase data); "
                    "expected real values: save the magnitude image instead"
                )
            bits = re.search(r"(\d+)-bit", pixel)
            itemsize = (int(bits.group(1)) // 8 if bits else 8) * reader.GetNumberOfComponents()
            check_fits_in_memory(path, reader.GetSize(), itemsize)
            image = reader.Execute()
        except RuntimeError as err:
            raise ValueError(f"{path}: SimpleITK cannot read it ({sitk_error_cause(err)})") from err
    return volume_from_sitk(image, source=path)


def _read_picture(path: Path, options: ReadOptions) -> Volume:
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


def _read_dicom_file(path: Path, options: ReadOptions) -> Volume:
    return read_dicom_file(path)


def _read_dicom_folder(folder: Path, options: ReadOptions) -> Volume:
    return read_dicom_series(folder, options.series_uid)


READERS: dict[str, VolumeReader] = {
    ".nii.gz": _read_nifti,
    ".nii": _read_nifti,
    ".nrrd": _read_sitk,
    ".nhdr": _read_sitk,
    ".mha": _read_sitk,
    ".mhd": _read_sitk,
    ".png": _read_picture,
    ".jpg": _read_picture,
    ".jpeg": _read_picture,
    ".dcm": _read_dicom_file,
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


def unreadable_reason(path: Path) -> str | None:
    """Why ``path`` (a file or a folder) cannot be opened for reading, e.g. ``"a symbolic
    link to scans/a.nii.gz, which does not exist"``; None when it can be opened."""
    try:
        is_folder = path.is_dir()
        os.stat(path)
    except FileNotFoundError:
        if path.is_symlink():
            return f"a symbolic link to {os.readlink(path)}, which does not exist"
        return "no such file or folder"
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "a symbolic link loop (following the links never reaches a file)"
        return f"cannot be read ({err.strerror or error_text(err)})"
    kind = "folder" if is_folder else "file"
    try:
        if is_folder:
            with os.scandir(path) as entries:
                next(entries, None)
        else:
            with open(path, "rb"):
                pass
    except PermissionError:
        return f"no permission to read this {kind}"
    except OSError as err:
        return f"this {kind} cannot be read ({err.strerror or error_text(err)})"
    return None


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
    reason = unreadable_reason(path)
    if reason is not None:
        raise UnreadableInputError(f"{path}: {reason}")
    if path.is_dir():
        reader: VolumeReader = _read_dicom_folder
    else:
        _, suffix = split_suffix(path)
        if suffix in READERS:
            reader = READERS[suffix]
        elif looks_like_dicom(path):  # DICOM exports often have no file ending
            reader = _read_dicom_file
        else:
            hint = UNSUPPORTED_HINTS.get(path.suffix.lower(), "")
            raise UnreadableInputError(
                f"{path}: unsupported file type{hint}; expected one of "
                f"{', '.join(IMAGE_SUFFIXES)} or a folder of DICOM files"
            )
    if path.is_file() and path.stat().st_size == 0:
        raise UnreadableInputError(f"{path}: the file is empty (0 bytes)")
    try:
        return reader(path, ReadOptions(series_uid, volume_index))
    except Sam2UNetError:  # already says its kind (too big for memory, an unusable option)
        raise
    except ValueError as err:
        message = str(err) if str(path) in str(err) else f"{path}: {error_text(err)}"
        raise UnreadableInputError(message) from err
    except MemoryError as err:
        available = available_memory()
        room = (f"{available[0] / GIB:.3g} GiB available, limited by {available[1]}"
                if available is not None else "the available memory is unknown")
        raise OutOfMemoryError(
            f"{path}: not enough memory to read it (an allocation failed: {error_text(err)}; "
            f"{room})"
        ) from err
    except Exception as err:  # noqa: BLE001 - corrupt bytes make parsers raise anything
        raise UnreadableInputError(f"{path}: corrupt or unreadable file ({error_text(err)})") from err
