"""Medical image input/output: one :class:`Volume` type, readers and writers.

See :mod:`sam2unet_core.io.volume` for the axis-order (KJI arrays, IJK indices) and
coordinate (LPS inside, RAS in nibabel) conventions.
"""

from .atomic import atomic_write, remove_partials
from .cases import Case, find_cases
from .dicom import DicomSeries, list_dicom_series, read_dicom_series
from .orientation import PLANES, PlaneView, plane_view
from .readers import IMAGE_SUFFIXES, read_volume, split_suffix
from .volume import Volume, affine_lps, affine_ras, label_dtype
from .writers import LABEL_FORMATS, output_suffix, write_labels, write_probabilities

__all__ = [
    "Volume",
    "Case",
    "PLANES",
    "PlaneView",
    "find_cases",
    "plane_view",
    "DicomSeries",
    "IMAGE_SUFFIXES",
    "LABEL_FORMATS",
    "affine_lps",
    "affine_ras",
    "atomic_write",
    "label_dtype",
    "list_dicom_series",
    "output_suffix",
    "read_dicom_series",
    "read_volume",
    "remove_partials",
    "split_suffix",
    "write_labels",
    "write_probabilities",
]
