"""Conversions between :class:`Volume` and the image objects of SimpleITK and nibabel.

SimpleITK already uses our conventions (KJI arrays, LPS geometry). nibabel indexes arrays
``[i, j, k]`` and maps indices to RAS; the conversion transposes the array and flips the
affine's x and y rows, here and nowhere else.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from ..errors import OptionError
from .volume import Volume, affine_ras, geometry_from_affine_ras

__all__ = [
    "volume_from_sitk", "volume_to_sitk", "volume_from_nifti", "volume_to_nifti",
    "NIFTI_TRANSFORMS", "NIFTI_UNITS", "NIFTI_MM_PER_UNIT", "nifti_mm_per_unit", "sitk_error_cause",
]

NIFTI_TRANSFORMS = "nifti_transforms"  # Volume.meta key: the input's qform/sform and codes
NIFTI_UNITS = "nifti_spatial_unit"  # Volume.meta key: the input's spatial unit, as nibabel names it
# mm per unit of the NIfTI spatial unit code (xyzt_units & 7), as ITK (and so Slicer) reads it:
# metre and micron are converted, mm and every other code (0 = unknown) are taken as mm.
NIFTI_MM_PER_UNIT = {1: 1000.0, 2: 1.0, 3: 0.001}
_NIFTI_UNIT_NAMES = {0: "unknown", 1: "meter", 2: "mm", 3: "micron"}


def sitk_error_cause(err: RuntimeError) -> str:
    """The last line of a SimpleITK exception (ITK puts the cause there), for messages."""
    text = str(err).strip()
    return text.splitlines()[-1] if text else "unknown error"


def volume_from_sitk(image: sitk.Image, source: Path | None = None) -> Volume:
    """SimpleITK 2D or 3D image (scalar or vector pixels) -> :class:`Volume`.

    2D images become one-slice volumes (K == 1, spacing 1 mm along k, direction embedded).
    """
    dim = image.GetDimension()
    if dim not in (2, 3):
        raise ValueError(f"{source}: expected a 2D or 3D image, got {dim} dimensions")
    array = sitk.GetArrayFromImage(image)  # (K, J, I) or (J, I) [+ C]
    components = image.GetNumberOfComponentsPerPixel()
    spacing = np.ones(3)
    origin = np.zeros(3)
    direction = np.eye(3)
    spacing[:dim] = image.GetSpacing()
    origin[:dim] = image.GetOrigin()
    direction[:dim, :dim] = np.asarray(image.GetDirection()).reshape(dim, dim)
    if dim == 2:
        array = array[np.newaxis]  # (J, I[, C]) -> (1, J, I[, C])
    if components == 1 and array.ndim == 4:
        array = array[..., 0]
    return Volume(array, spacing, origin, direction, source=source)


def volume_to_sitk(volume: Volume) -> sitk.Image:
    """:class:`Volume` -> 3D SimpleITK image with the same geometry."""
    is_vector = volume.array_kji.ndim == 4
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array_kji), isVector=is_vector)
    image.SetSpacing(volume.spacing_ijk.tolist())
    image.SetOrigin(volume.origin_lps.tolist())
    image.SetDirection(volume.direction_lps.ravel().tolist())
    return image


def nifti_mm_per_unit(header: nib.Nifti1Header) -> tuple[float, str]:
    """``(mm per unit, unit name)`` of a NIfTI header's spatial unit (``xyzt_units``)."""
    code = int(header["xyzt_units"]) & 0x07
    return NIFTI_MM_PER_UNIT.get(code, 1.0), _NIFTI_UNIT_NAMES.get(code, f"code {code}")


def volume_from_nifti(
    image: nib.spatialimages.SpatialImage,
    source: Path | None = None,
    volume_index: int | None = None,
) -> Volume:
    """nibabel image -> :class:`Volume`.

    Accepts 2D, 3D and 4D arrays whose 4th axis has length 1; of a real 4D image (time
    series, echoes) ``volume_index`` picks one 3D volume (only its voxels are read). The
    data array is
    ``[i, j, k]``; it is transposed (a view, no copy) to ``[k, j, i]``. Scaling
    (scl_slope/scl_inter) is applied by nibabel. RGB voxels (NIfTI RGB24/RGBA32) become a
    ``(K, J, I, 3)`` colour volume.

    The geometry is converted to mm from the header's spatial unit (``xyzt_units``: metre
    x1000, micron x0.001, mm and unknown x1), as ITK/SimpleITK and so Slicer read it; nibabel's
    affine is in the file's own unit.
    """
    shape = image.shape
    if volume_index is not None and len(shape) == 4 and shape[3] > 1:
        if not 0 <= volume_index < shape[3]:
            raise OptionError(f"{source}: volume index {volume_index} is outside the "
                              f"{shape[3]} volumes of this 4D image (0 to {shape[3] - 1})",
                              "volume_index", volume_index)
        data = np.asanyarray(image.dataobj[..., volume_index])
    else:
        data = np.asanyarray(image.dataobj)
    if data.ndim == 2:
        data = data[:, :, np.newaxis]
    if data.ndim > 3:
        extra = data.shape[3:]
        if int(np.prod(extra)) != 1:
            raise OptionError(
                f"{source}: expected a 3D volume, got shape {data.shape} "
                f"({int(np.prod(extra))} volumes/channels); choose one by its volume index "
                "(4D images) or split it into 3D files first",
                "volume_index", volume_index,
            )
        data = data.reshape(data.shape[:3])
    if data.ndim != 3:
        raise ValueError(f"{source}: expected a 3D volume, got shape {data.shape}")
    header = image.header
    mm_per_unit, unit = nifti_mm_per_unit(header) if hasattr(header, "get_qform") else (1.0, "mm")
    to_mm = np.diag([mm_per_unit] * 3 + [1.0])
    spacing, origin, direction = geometry_from_affine_ras(to_mm @ image.affine)
    array_kji = data.transpose(2, 1, 0)
    if array_kji.dtype.names is not None:  # RGB24/RGBA32 -> (K, J, I, 3), alpha dropped
        array_kji = np.stack([array_kji[channel] for channel in "RGB"], axis=-1)
    volume = Volume(array_kji, spacing, origin, direction, source=source)
    if hasattr(header, "get_qform"):  # NIfTI-1/2: keep both transforms and the unit for the writer
        qform, qform_code = header.get_qform(coded=True)
        sform, sform_code = header.get_sform(coded=True)
        volume.meta[NIFTI_UNITS] = unit
        volume.meta[NIFTI_TRANSFORMS] = {
            "affine": to_mm @ image.affine, "mm_per_unit": mm_per_unit,  # the grid, in mm
            "qform": qform, "qform_code": int(qform_code),  # as stored, in the file's unit
            "sform": sform, "sform_code": int(sform_code),
        }
    return volume


def volume_to_nifti(volume: Volume) -> nib.Nifti1Image:
    """:class:`Volume` -> NIfTI-1 image. A ``(K, J, I, C)`` array is written as
    ``(I, J, K, C)``.

    A volume read from NIfTI, on its input's grid, gets its input's qform and sform back as
    stored, codes and spatial unit (``xyzt_units``: metre, mm, micron or unknown) included,
    so every tool (nibabel, ITK/Slicer, FSL), whichever transform it trusts and whether or
    not it converts the unit, places the output exactly on the input. Other volumes get both
    transforms set to their geometry in mm with code 1.
    """
    array = volume.array_kji
    axes = (2, 1, 0) if array.ndim == 3 else (2, 1, 0, 3)
    # the (I, J, K) view of a C-ordered array is Fortran-ordered, NIfTI's own order: nibabel
    # writes it as it is (a C-ordered copy would cost two transposing passes over the voxels)
    array = array.transpose(axes)
    affine = affine_ras(volume)  # mm
    source = volume.meta.get(NIFTI_TRANSFORMS)
    unit = volume.meta.get(NIFTI_UNITS)
    on_input_grid = source is not None and np.allclose(source["affine"], affine, atol=1e-5)
    if on_input_grid and unit in _NIFTI_UNIT_NAMES.values():
        to_unit = np.diag([1.0 / source["mm_per_unit"]] * 3 + [1.0])
        image = nib.Nifti1Image(array, to_unit @ affine)  # pixdim in the input's unit
        image.set_qform(source["qform"], code=source["qform_code"])
        image.set_sform(source["sform"], code=source["sform_code"])
        image.header.set_xyzt_units(unit, "sec")
    else:
        image = nib.Nifti1Image(array, affine)
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        image.header.set_xyzt_units("mm", "sec")
    return image
