"""Medical image input/output: one :class:`Volume` type, readers and writers.

See :mod:`sam2unet_core.io.volume` for the axis-order (KJI arrays, IJK indices) and
coordinate (LPS inside, RAS in nibabel) conventions.

The names below are imported on first use, so that a module that needs one piece (the
atomic writer of ``sam2unet_core.checkpoint``, say) does not pay for every reader's library
(pydicom, SimpleITK, nibabel, Pillow).
"""

from __future__ import annotations

from ..lazy import lazy_names

# public name -> module that defines it (relative to this package)
_LAZY_NAMES = {
    "atomic_write": ".atomic",
    "remove_partials": ".atomic",
    "Case": ".cases",
    "find_cases": ".cases",
    "DicomSeries": ".dicom",
    "list_dicom_series": ".dicom",
    "read_dicom_series": ".dicom",
    "PLANES": ".orientation",
    "PlaneView": ".orientation",
    "plane_view": ".orientation",
    "IMAGE_SUFFIXES": ".readers",
    "read_volume": ".readers",
    "split_suffix": ".readers",
    "Volume": ".volume",
    "affine_lps": ".volume",
    "affine_ras": ".volume",
    "label_dtype": ".volume",
    "LABEL_FORMATS": ".writers",
    "output_suffix": ".writers",
    "write_labels": ".writers",
    "write_probabilities": ".writers",
}

__all__ = sorted(_LAZY_NAMES)
__getattr__, __dir__ = lazy_names(__name__, _LAZY_NAMES)
