"""DICOM series: list the series in a folder, pick one, read it as a :class:`Volume`.

pydicom reads the headers (fast, ``stop_before_pixels``) to group files by
SeriesInstanceUID, sort slices along the slice normal and check that they form one regular
grid; SimpleITK (GDCM) then decodes the pixels in that order, applying rescale slope and
intercept (CT values in HU). The volume's k axis follows the slice normal
``row x column`` of ImageOrientationPatient, so ``direction_lps`` is right-handed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from ..errors import OptionError
from .convert import sitk_error_cause, volume_from_sitk
from .sitk_paths import sitk_read_paths
from .volume import Volume, check_fits_in_memory

__all__ = [
    "DicomSeries", "SliceHeader", "list_dicom_series", "select_dicom_series", "read_dicom_series",
    "read_dicom_file", "looks_like_dicom",
]

logger = logging.getLogger(__name__)

_HEADER_TAGS = [
    "SeriesInstanceUID", "SeriesDescription", "SeriesNumber", "Modality", "Rows", "Columns",
    "ImagePositionPatient", "ImageOrientationPatient", "NumberOfFrames", "SOPClassUID",
    "ImageType", "SamplesPerPixel", "BitsAllocated", "RescaleSlope", "RescaleIntercept",
]
ORIENTATION_TOLERANCE = 1e-4  # max difference between direction cosines of one series
SPACING_TOLERANCE = 0.01  # max relative deviation of slice gaps from their median
MAX_TILT_DEGREES = 0.05  # max angle between the slice normal and the slice-to-slice step
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
NON_IMAGE_SOP_CLASSES = {  # objects with Rows/Columns that are not images to segment
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage (DICOM SEG)
    "1.2.840.10008.5.1.4.1.1.66.7",  # Label Map Segmentation Storage
}


@dataclass(frozen=True)
class SliceHeader:
    """The header fields of one DICOM image file that series reading needs, parsed once.

    ``orientation``: ImageOrientationPatient (row then column direction cosines, LPS);
    ``position``: ImagePositionPatient (mm, LPS); both None when the file lacks them.
    """

    uid: str
    description: str
    modality: str
    number: int | None
    rows: int
    columns: int
    frames: int
    orientation: tuple[float, ...] | None
    position: tuple[float, ...] | None
    mosaic: bool = False  # Siemens MOSAIC: many slices tiled into one image
    wide_colour_rle: bool = False  # RLE colour with 16/32-bit samples (GDCM decodes it wrongly)
    rescale: tuple[float, float] = (1.0, 0.0)  # RescaleSlope, RescaleIntercept (stored -> HU)


@dataclass
class DicomSeries:
    """One series found in a folder: its UID, description and image files (unsorted)."""

    uid: str
    description: str
    modality: str
    number: int | None
    files: list[Path] = field(default_factory=list)
    headers: list[SliceHeader] = field(default_factory=list, repr=False)  # one per file

    def summary(self) -> str:
        return (
            f"{self.uid} (#{self.number}, {self.modality}, '{self.description}', "
            f"{len(self.files)} files)"
        )


def looks_like_dicom(path: Path) -> bool:
    """True for files ending in ``.dcm`` or carrying ``DICM`` after the 128-byte preamble
    (scanner exports often have no file ending at all)."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _numbers(ds: pydicom.Dataset, keyword: str, count: int) -> tuple[float, ...] | None:
    """``count`` finite numbers of a multi-valued element; None when it is absent."""
    if keyword not in ds:
        return None
    values = tuple(float(v) for v in ds[keyword].value)
    if len(values) != count or not all(np.isfinite(values)):
        raise ValueError(f"{keyword} must hold {count} finite numbers, got {values}")
    return values


def _parse_header(ds: pydicom.Dataset) -> SliceHeader:
    """Convert (and so decode) every field series reading uses; raises on bad values."""
    number = ds.get("SeriesNumber")
    header = SliceHeader(
        uid=str(ds.SeriesInstanceUID),
        description=str(ds.get("SeriesDescription", "")),
        modality=str(ds.get("Modality", "")),
        number=int(number) if number not in (None, "") else None,
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        frames=int(ds.get("NumberOfFrames", 1) or 1),
        orientation=_numbers(ds, "ImageOrientationPatient", 6),
        position=_numbers(ds, "ImagePositionPatient", 3),
        mosaic="MOSAIC" in str(ds.get("ImageType", "")).upper(),  # one value or a list
        wide_colour_rle=(
            str(ds.get("file_meta", {}).get("TransferSyntaxUID", "")) == RLE_LOSSLESS
            and int(ds.get("SamplesPerPixel", 1) or 1) > 1
            and int(ds.get("BitsAllocated", 8) or 8) > 8
        ),
        rescale=(float(ds.get("RescaleSlope", 1.0) or 1.0),
                 float(ds.get("RescaleIntercept", 0.0) or 0.0)),
    )
    if min(header.rows, header.columns, header.frames) < 1:
        raise ValueError(f"image size {header.rows} x {header.columns} x {header.frames} frames")
    return header


def _read_header(path: Path) -> SliceHeader | None:
    """The parsed header of an image file; None for files that are not DICOM or hold no
    image (DICOMDIR, structured reports, presentation states, RT structures).

    This is where untrusted header bytes are parsed (pydicom decodes values lazily, so
    every field is converted here): any failure is a ``ValueError`` naming the file.
    """
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except InvalidDicomError:
        return None
    except Exception as err:  # noqa: BLE001 - corrupt bytes make pydicom raise anything
        raise ValueError(f"{path}: corrupt DICOM file ({type(err).__name__}: {err})") from err
    if "SeriesInstanceUID" not in ds or "Rows" not in ds:
        return None
    if str(ds.get("SOPClassUID", "")) in NON_IMAGE_SOP_CLASSES:
        return None
    try:
        return _parse_header(ds)
    except Exception as err:  # noqa: BLE001
        raise ValueError(
            f"{path}: corrupt DICOM header ({type(err).__name__}: {err})"
        ) from err


def list_dicom_series(folder: Path) -> list[DicomSeries]:
    """All image series under ``folder`` (searched recursively), largest first.

    Files that are not DICOM images are left out; corrupt DICOM files too, with a warning.
    """
    folder = Path(folder)
    series: dict[str, DicomSeries] = {}
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            path = Path(root) / name
            try:
                header = _read_header(path)
            except ValueError as err:  # a missing slice then shows as an uneven gap
                logger.warning("skipping %s", err)
                continue
            if header is None:
                continue
            if header.uid not in series:
                series[header.uid] = DicomSeries(
                    header.uid, header.description, header.modality, header.number
                )
            series[header.uid].files.append(path)
            series[header.uid].headers.append(header)
    return sorted(series.values(), key=lambda s: (-len(s.files), s.uid))


def select_dicom_series(
    folder: Path, series_uid: str | None = None, found: list[DicomSeries] | None = None
) -> DicomSeries:
    """The series with ``series_uid``, or the one with most files when it is None.

    ``found`` is the result of :func:`list_dicom_series` when the caller already has it.
    """
    found = list_dicom_series(folder) if found is None else found
    if not found:
        raise ValueError(f"{folder}: no DICOM image files found (searched sub-folders too)")
    if series_uid is None:
        chosen = found[0]
        if len(found) > 1:
            logger.info(
                "%s holds %d series; using the largest, %s. Others: %s",
                folder, len(found), chosen.summary(), "; ".join(s.summary() for s in found[1:]),
            )
        return chosen
    for candidate in found:
        if candidate.uid == series_uid:
            return candidate
    raise OptionError(
        f"{folder}: no series with SeriesInstanceUID {series_uid}; found: "
        + "; ".join(s.summary() for s in found),
        "series_uid", series_uid,
    )


def _sorted_slices(series: DicomSeries, folder: Path) -> tuple[list[Path], float | None]:
    """Slice files sorted along the normal, and the slice gap in mm (None for one slice).

    Raises ValueError when the files do not form one regular grid.
    """
    headers = series.headers
    where = f"{folder}, series {series.uid}"
    if any(h.wide_colour_rle for h in headers):
        raise ValueError(
            f"{where}: RLE-compressed colour with 16- or 32-bit samples, which GDCM decodes "
            "into wrong colours; decompress it first (gdcmconv --raw, or dcmdrle)"
        )
    if any(h.mosaic for h in headers):
        raise ValueError(
            f"{where}: Siemens MOSAIC images (the slices of a volume tiled into one image, "
            "whose position is not theirs); convert the series to NIfTI with dcm2niix first"
        )
    if max(h.frames for h in headers) > 1:
        if len(headers) == 1:
            return list(series.files), None  # one multi-frame file: see _read_multiframe
        raise ValueError(f"{where}: mixes {len(headers)} files with multi-frame images")
    sizes = {(h.rows, h.columns) for h in headers}
    if len(sizes) > 1:
        raise ValueError(f"{where}: slices have different sizes {sorted(sizes)}")
    if any(h.orientation is None or h.position is None for h in headers):
        if len(headers) == 1:
            return list(series.files), None
        raise ValueError(f"{where}: slices lack ImagePositionPatient/ImageOrientationPatient")
    order, gap = stack_order(np.array([h.orientation for h in headers]),
                             np.array([h.position for h in headers]), where, "slices")
    return [series.files[i] for i in order], gap


def stack_order(orientations: np.ndarray, positions: np.ndarray, where: str,
                parts: str = "slices") -> tuple[np.ndarray, float | None]:
    """The order of 2D images (the slices of a series, the frames of a multi-frame file)
    along their normal, and their gap in mm (None for one image): the one check that they
    form one regular volume.

    Args:
        orientations: ``(N, 6)`` ImageOrientationPatient (row, then column cosines, LPS).
        positions: ``(N, 3)`` ImagePositionPatient (mm, LPS).
        where: names the input in messages; ``parts``: "slices" or "frames".

    Raises ``ValueError`` for different orientations, several images at one position (two
    echoes or phases: several stacks), uneven gaps (missing images) or a gantry tilt.
    """
    if np.abs(orientations - orientations[0]).max() > ORIENTATION_TOLERANCE:
        raise ValueError(
            f"{where}: {parts} have different orientations (a localizer or a mixed series); "
            "pick another series"
        )
    normal = np.cross(orientations[0, :3], orientations[0, 3:])
    along_normal = positions @ normal
    order = np.argsort(along_normal, kind="stable")
    if len(order) == 1:
        return order, None
    gaps = np.diff(along_normal[order])
    if np.any(gaps < 1e-3):
        stacks = len(order) / len(np.unique(np.round(along_normal, 3)))
        raise ValueError(
            f"{where}: several {parts} share one position ({len(order)} {parts} at "
            f"{len(np.unique(np.round(along_normal, 3)))} positions, about {stacks:.3g} stacks: "
            "multiple echoes, phases or acquisitions); split them into one series per stack first"
        )
    median_gap = float(np.median(gaps))
    if np.abs(gaps - median_gap).max() > SPACING_TOLERANCE * median_gap:
        raise ValueError(
            f"{where}: {parts[:-1]} gaps are uneven ({gaps.min():.3f} to {gaps.max():.3f} mm), "
            f"so the {parts} do not form one regular volume (missing {parts}?)"
        )
    steps = np.diff(positions[order], axis=0)
    sideways = np.linalg.norm(steps - np.outer(steps @ normal, normal), axis=1)
    tilt = float(np.degrees(np.arctan2(sideways.max(), median_gap)))
    if tilt > MAX_TILT_DEGREES:
        raise ValueError(
            f"{where}: {parts} are stacked at {tilt:.2f} degrees from their normal (gantry "
            "tilt), so the voxels do not form a rectangular grid; resample the series "
            "first (e.g. dcm2niix, or Slicer's acquisition geometry regularization)"
        )
    return order, median_gap


def read_dicom_series(folder: Path, series_uid: str | None = None) -> Volume:
    """Read one series of ``folder`` (see :func:`select_dicom_series`) as a Volume.

    ``volume.dicom_files`` lists the slice files in k order; ``volume.meta`` holds
    ``series_uid``, ``series_description``, ``modality`` and ``series_in_folder``.
    """
    folder = Path(folder)
    found = list_dicom_series(folder)
    series = select_dicom_series(folder, series_uid, found)
    volume = _read_series(series, folder)
    volume.meta["series_in_folder"] = len(found)
    return volume


def _describe(path: Path) -> str:
    """What a DICOM file that is no image to segment holds, for error messages."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=[
            "SOPClassUID", "Modality", "SeriesInstanceUID", "Rows"])
    except Exception:  # noqa: BLE001 - only a description; the caller raises anyway
        return "no readable DICOM header"
    if "Rows" in ds and "SeriesInstanceUID" not in ds:
        return "an image without the SeriesInstanceUID that places it in a series"
    sop_class = ds.get("SOPClassUID") or ds.get("file_meta", {}).get("MediaStorageSOPClassUID")
    if sop_class:
        sop = pydicom.uid.UID(str(sop_class))
        pixels = " without image pixels (no Rows)" if "Rows" not in ds else ""
        return f"a {sop.name} object{pixels}, modality {ds.get('Modality') or 'unknown'}"
    return "no SOPClassUID and no image size (Rows)"


def read_dicom_file(path: Path) -> Volume:
    """Read one DICOM file (a single slice or a multi-frame image) as a Volume."""
    path = Path(path)
    header = _read_header(path)
    if header is None:
        raise ValueError(f"{path}: not a DICOM image to segment ({_describe(path)})")
    series = DicomSeries(header.uid, header.description, header.modality, header.number,
                         files=[path], headers=[header])
    return _read_series(series, path)


def _transfer_syntax(path: Path) -> str:
    """The name of the file's transfer syntax (how its pixels are encoded), for messages."""
    try:
        meta = pydicom.dcmread(path, stop_before_pixels=True, force=True).file_meta
        return str(pydicom.uid.UID(str(meta.TransferSyntaxUID)).name)
    except Exception:  # noqa: BLE001 - only a description; the caller raises anyway
        return "(unknown transfer syntax)"


def _decode(files: list[Path], where: Path, series_uid: str, one_file: bool = False) -> sitk.Image:
    """GDCM decodes the pixels of ``files`` (in this order; rescale slope and intercept
    applied). ``one_file``: a multi-frame file, which the series reader would stack as 4D."""
    try:
        with sitk_read_paths(files) as readable:
            if one_file:
                reader: sitk.ImageReaderBase = sitk.ImageFileReader()
                reader.SetFileName(readable[0])
            else:
                reader = sitk.ImageSeriesReader()
                reader.SetFileNames(readable)
            return reader.Execute()
    except RuntimeError as err:
        raise ValueError(
            f"{where}: could not decode the {_transfer_syntax(files[0])} pixel data of series "
            f"{series_uid} with GDCM ({sitk_error_cause(err)})"
        ) from err


def _read_slices_rescaled_one_by_one(series: DicomSeries, files: list[Path], gap: float | None,
                                     where: Path) -> Volume:
    """A series whose slices differ in RescaleSlope/RescaleIntercept. GDCM gives a whole
    series the pixel type its first slice needs (uint16 for an unsigned first slice with
    intercept 0, so -1355 HU of another slice wraps to 64181): each slice is decoded alone,
    with its own rescale, and the slices are stacked as int32 (integer slopes and
    intercepts) or float32, which hold every slice's values."""
    slices = [_decode([file], where, series.uid) for file in files]
    integral = all(float(value).is_integer() for h in series.headers for value in h.rescale)
    array = np.concatenate([sitk.GetArrayViewFromImage(image).reshape(-1, *image.GetSize()[1::-1])
                            for image in slices]).astype(np.int32 if integral else np.float32)
    stacked = sitk.GetImageFromArray(array)
    first = slices[0]
    stacked.SetOrigin(first.GetOrigin())
    stacked.SetDirection(first.GetDirection())
    stacked.SetSpacing([*first.GetSpacing()[:2], gap if gap is not None else first.GetSpacing()[2]])
    logger.info("%s: slices differ in rescale slope/intercept; each was rescaled on its own (%s)",
                where, array.dtype)
    return volume_from_sitk(stacked, source=where)


def _enhanced_frame_geometry(ds: pydicom.Dataset, path: Path) -> tuple[np.ndarray, ...]:
    """``(orientations (F, 6), positions (F, 3), pixel spacings (F, 2) row then column,
    rescales (F, 2) slope then intercept)`` of the frames of an enhanced multi-frame image,
    from its per-frame functional groups, or the shared ones where a frame has none."""
    shared = ds.SharedFunctionalGroupsSequence[0] if ds.get("SharedFunctionalGroupsSequence") else None
    frames = ds.PerFrameFunctionalGroupsSequence

    def group(frame: pydicom.Dataset, name: str, keyword: str, default: Any = None) -> Any:
        for source in (frame, shared):
            if source is not None and source.get(name) and keyword in source.get(name)[0]:
                return source.get(name)[0].get(keyword)
        if default is not None:
            return default
        raise ValueError(
            f"{path}: an enhanced multi-frame image without {keyword} ({name}) for its frames, "
            "so its frames cannot be placed in space"
        )

    orientations, positions, spacings, rescales = [], [], [], []
    for frame in frames:
        orientations.append([float(v) for v in group(frame, "PlaneOrientationSequence", "ImageOrientationPatient")])
        positions.append([float(v) for v in group(frame, "PlanePositionSequence", "ImagePositionPatient")])
        spacings.append([float(v) for v in group(frame, "PixelMeasuresSequence", "PixelSpacing")])
        rescales.append([float(group(frame, "PixelValueTransformationSequence", "RescaleSlope", 1.0)),
                         float(group(frame, "PixelValueTransformationSequence", "RescaleIntercept", 0.0))])
    arrays = tuple(np.array(values, dtype=float) for values in (orientations, positions, spacings, rescales))
    if any(a.shape != (len(frames), width) or not np.all(np.isfinite(a))
           for a, width in zip(arrays, (6, 3, 2, 2))):
        raise ValueError(f"{path}: the frames' plane orientation, position, pixel spacing or "
                         "rescale values are not all finite numbers of the right count")
    return arrays


def _read_multiframe(path: Path, series: DicomSeries, where: Path) -> Volume:
    """One multi-frame file. An enhanced image (per-frame functional groups: Enhanced CT/MR,
    Legacy Converted) is placed as a series is: its frames sorted along their normal by the
    positions of their functional groups, spacing and orientation from the shared or
    per-frame groups, and the same checks (one orientation, one frame per position, even
    gaps, no tilt). A legacy multi-frame image (RT Dose, US cine) keeps GDCM's geometry."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    if not ds.get("PerFrameFunctionalGroupsSequence"):
        return volume_from_sitk(_decode([path], where, series.uid, one_file=True), source=where)
    orientations, positions, spacings, rescales = _enhanced_frame_geometry(ds, path)
    if len(orientations) != series.headers[0].frames:
        raise ValueError(f"{path}: {len(orientations)} per-frame functional groups for "
                         f"{series.headers[0].frames} frames (NumberOfFrames)")
    order, gap = stack_order(orientations, positions, f"{path}", "frames")
    if np.abs(spacings - spacings[0]).max() > SPACING_TOLERANCE * spacings[0].min():
        raise ValueError(f"{path}: frames have different pixel spacings, so they do not form "
                         "one regular volume")
    if np.abs(rescales - rescales[0]).max() > 0:
        raise ValueError(f"{path}: frames have different rescale slopes/intercepts, which "
                         "GDCM does not apply frame by frame; convert the file to NIfTI first "
                         "(e.g. dcm2niix)")
    image = _decode([path], where, series.uid, one_file=True)
    array = sitk.GetArrayFromImage(image)
    if array.shape[0] != len(order):
        raise ValueError(f"{path}: {array.shape[0]} frames decoded, {len(order)} described")
    row, column = orientations[0, :3], orientations[0, 3:]
    direction = np.stack([row, column, np.cross(row, column)], axis=1)
    spacing = [spacings[0][1], spacings[0][0], gap if gap is not None else 1.0]  # i, j, k
    return Volume(array[order], np.array(spacing), positions[order[0]].copy(), direction,
                  source=where)


def _read_series(series: DicomSeries, where: Path) -> Volume:
    files, gap = _sorted_slices(series, where)
    first = series.headers[0]
    check_fits_in_memory(where, (len(files) * first.frames, first.rows, first.columns), 4)
    if first.frames > 1:
        volume = _read_multiframe(files[0], series, where)
    elif len({header.rescale for header in series.headers}) > 1:
        volume = _read_slices_rescaled_one_by_one(series, files, gap, where)
    else:
        volume = volume_from_sitk(_decode(files, where, series.uid), source=where)
        if gap is not None and not np.isclose(volume.spacing_ijk[2], gap, rtol=SPACING_TOLERANCE):
            logger.warning("%s: slice spacing %.4f mm from positions replaces %.4f mm",
                           where, gap, volume.spacing_ijk[2])
            volume.spacing_ijk[2] = gap
    volume.dicom_files = tuple(files)
    volume.meta.update(
        series_uid=series.uid,
        series_description=series.description,
        modality=series.modality,
        series_in_folder=1,
    )
    return volume
