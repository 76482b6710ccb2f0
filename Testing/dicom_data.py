"""Write small CT series with pydicom for the DICOM tests (shared by several test files)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid


def write_ct_series(
    folder: Path,
    pixels_kji: np.ndarray,
    positions_lps: Sequence[Sequence[float]],
    row: Sequence[float] = (1.0, 0.0, 0.0),
    column: Sequence[float] = (0.0, 1.0, 0.0),
    spacing_ij: tuple[float, float] = (0.9, 0.9),
    rescale_intercept: float = 0.0,
    file_name: Callable[[int], str] = lambda k: f"slice{k:03d}.dcm",
    tags: dict[str, object] | None = None,
) -> str:
    """One file per slice ``pixels_kji[k]`` (uint16 or int16) at ``positions_lps[k]``;
    ``row``/``column`` are the ImageOrientationPatient direction cosines, ``spacing_ij``
    the spacing along a row (i) and down a column (j). ``tags`` override any keyword.
    Returns the SeriesInstanceUID."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid, study_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    signed = int(pixels_kji.dtype.kind == "i")
    for k, position in enumerate(positions_lps):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = pydicom.uid.CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientName, ds.PatientID = "CT", "Test^Series", "42"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = 3, k + 1, "test series"
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row, *column)]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.PixelSpacing = [spacing_ij[1], spacing_ij[0]]  # row spacing (j), column spacing (i)
        ds.SliceThickness = 1.0
        ds.Rows, ds.Columns = pixels_kji.shape[1:3]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, signed
        ds.RescaleIntercept, ds.RescaleSlope = rescale_intercept, 1
        for keyword, value in (tags or {}).items():
            setattr(ds, keyword, value)
        ds.PixelData = np.ascontiguousarray(pixels_kji[k]).tobytes()
        ds.save_as(folder / file_name(k), enforce_file_format=True)
    return series_uid
