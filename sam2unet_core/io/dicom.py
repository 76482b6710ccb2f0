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

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from .convert import volume_from_sitk
from .volume import Volume

__all__ = [
    "DicomSeries", "list_dicom_series", "select_dicom_series", "read_dicom_series",
    "read_dicom_file",
]

logger = logging.getLogger(__name__)

_HEADER_TAGS = [
    "SeriesInstanceUID", "SeriesDescription", "SeriesNumber", "Modality", "Rows", "Columns",
    "ImagePositionPatient", "ImageOrientationPatient", "NumberOfFrames", "SOPClassUID",
]
ORIENTATION_TOLERANCE = 1e-4  # max difference between direction cosines of one series
SPACING_TOLERANCE = 0.01  # max relative deviation of slice gaps from their median


@dataclass
class DicomSeries:
    """One series found in a folder: its UID, description and image files (unsorted)."""

    uid: str
    description: str
    modality: str
    number: int | None
    files: list[Path] = field(default_factory=list)
    headers: list[pydicom.Dataset] = field(default_factory=list, repr=False)  # one per file

    def summary(self) -> str:
        return (
            f"{self.uid} (#{self.number}, {self.modality}, '{self.description}', "
            f"{len(self.files)} files)"
        )


def _read_header(path: Path) -> pydicom.Dataset | None:
    """The header of an image file, or None for files that are not DICOM images."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except (InvalidDicomError, OSError, ValueError, TypeError, AttributeError):
        return None
    if "SeriesInstanceUID" not in ds or "Rows" not in ds:
        return None  # DICOMDIR, structured reports, RT structures: no image pixels
    return ds


def list_dicom_series(folder: Path) -> list[DicomSeries]:
    """All image series under ``folder`` (searched recursively), largest first."""
    folder = Path(folder)
    series: dict[str, DicomSeries] = {}
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            path = Path(root) / name
            ds = _read_header(path)
            if ds is None:
                continue
            uid = str(ds.SeriesInstanceUID)
            if uid not in series:
                number = ds.get("SeriesNumber")
                series[uid] = DicomSeries(
                    uid=uid,
                    description=str(ds.get("SeriesDescription", "")),
                    modality=str(ds.get("Modality", "")),
                    number=int(number) if number not in (None, "") else None,
                )
            series[uid].files.append(path)
            series[uid].headers.append(ds)
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
    raise ValueError(
        f"{folder}: no series with SeriesInstanceUID {series_uid}; found: "
        + "; ".join(s.summary() for s in found)
    )


def _sorted_slices(series: DicomSeries, folder: Path) -> tuple[list[Path], float | None]:
    """Slice files sorted along the normal, and the slice gap in mm (None for one slice).

    Raises ValueError when the files do not form one regular grid.
    """
    headers = series.headers
    where = f"{folder}, series {series.uid}"
    frames = [int(ds.get("NumberOfFrames", 1) or 1) for ds in headers]
    if max(frames) > 1:
        if len(headers) == 1:
            return list(series.files), None  # one multi-frame file: GDCM reads its geometry
        raise ValueError(f"{where}: mixes {len(headers)} files with multi-frame images")
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in headers}
    if len(sizes) > 1:
        raise ValueError(f"{where}: slices have different sizes {sorted(sizes)}")
    if any("ImageOrientationPatient" not in ds or "ImagePositionPatient" not in ds
           for ds in headers):
        if len(headers) == 1:
            return list(series.files), None
        raise ValueError(f"{where}: slices lack ImagePositionPatient/ImageOrientationPatient")
    orientations = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in headers])
    if np.abs(orientations - orientations[0]).max() > ORIENTATION_TOLERANCE:
        raise ValueError(
            f"{where}: slices have different orientations (a localizer or a mixed series); "
            "pick another series"
        )
    normal = np.cross(orientations[0, :3], orientations[0, 3:])
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in headers])
    along_normal = positions @ normal
    order = np.argsort(along_normal, kind="stable")
    files = [series.files[i] for i in order]
    if len(files) == 1:
        return files, None
    gaps = np.diff(along_normal[order])
    if np.any(gaps < 1e-3):
        raise ValueError(
            f"{where}: several slices share one position (multiple echoes, phases or "
            "acquisitions in one series); split the series first"
        )
    median_gap = float(np.median(gaps))
    if np.abs(gaps - median_gap).max() > SPACING_TOLERANCE * median_gap:
        raise ValueError(
            f"{where}: slice gaps are uneven ({gaps.min():.3f} to {gaps.max():.3f} mm), "
            "so the slices do not form one regular volume"
        )
    return files, median_gap


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


def read_dicom_file(path: Path) -> Volume:
    """Read one DICOM file (a single slice or a multi-frame image) as a Volume."""
    path = Path(path)
    ds = _read_header(path)
    if ds is None:
        raise ValueError(f"{path}: not a DICOM image file")
    number = ds.get("SeriesNumber")
    series = DicomSeries(
        uid=str(ds.SeriesInstanceUID),
        description=str(ds.get("SeriesDescription", "")),
        modality=str(ds.get("Modality", "")),
        number=int(number) if number not in (None, "") else None,
        files=[path],
        headers=[ds],
    )
    return _read_series(series, path)


def _read_series(series: DicomSeries, where: Path) -> Volume:
    files, gap = _sorted_slices(series, where)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise ValueError(f"{where}: could not decode series {series.uid}: {err}") from err
    volume = volume_from_sitk(image, source=where)
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
