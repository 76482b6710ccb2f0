"""Write label maps and probability maps with exactly the geometry of their :class:`Volume`.

Formats, chosen by file ending:
    * ``.nii.gz`` / ``.nii``: NIfTI-1 (nibabel), qform = sform = the volume's geometry;
      ``.nii.gz`` compressed with ISA-L (``isal.igzip``) at ``NIFTI_GZIP_LEVEL``.
    * ``.seg.nrrd``: a 3D Slicer segmentation (slicerio; one layer, label value per segment)
      whose segment names, colours and terminology come from the model's :class:`LabelInfo` list.
    * ``.nrrd`` / ``.mha``: plain label volumes (SimpleITK).
    * ``.dcm``: DICOM SEG (highdicom), only for volumes read from DICOM; it references
      the source slices; segments carry SNOMED CT codes (``sam2unet_core.terminology``).
    * ``.png``: 2D label images; a binary mask is stored as 0/255 (the polyp benchmarks'
      convention), multi-class maps as their label values.

Every file is first written under a temporary name in the target folder, checked (not empty;
SimpleITK's files are read back, since ITK does not always report a failed write), then
renamed, so an interrupted run or a full disk never leaves a half-written output under the
final name. Python writers (nibabel, slicerio, highdicom, Pillow) raise on a failed write.
"""

from __future__ import annotations

import errno
import json
import logging
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..metadata import LabelInfo
from .atomic import PARTIAL_PREFIX, atomic_write, remove_partials
from .convert import sitk_error_cause, volume_to_nifti, volume_to_sitk
from .errors import error_text
from .sitk_paths import sitk_read_paths, sitk_write_path
from .volume import Volume

__all__ = [
    "atomic_write",
    "remove_partials",
    "PARTIAL_PREFIX",
    "write_labels",
    "write_probabilities",
    "LABEL_FORMATS",
    "output_suffix",
    "dicom_seg_sources",
    "unreadable_output",
]

logger = logging.getLogger(__name__)

# ISA-L level 1 of 0-3: on a CT's label map 8x faster than zlib's level 1 (nibabel's) and
# about a third smaller; level 3 is 15x slower for a larger file (benchmarks/bench_io.py)
NIFTI_GZIP_LEVEL = 1
LABEL_FORMATS = ("nii.gz", "nii", "seg.nrrd", "nrrd", "mha", "dcm", "png")
SITK_SUFFIXES = (".nrrd", ".mha")  # written by SimpleITK, which may not report a failed write
MANUFACTURER = "sam2unet_core"
_TYPE2_PATIENT_STUDY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
    "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName",
)


def output_suffix(fmt: str) -> str:
    """File ending for a ``--format`` value: ``"seg.nrrd"`` -> ``".seg.nrrd"``."""
    if fmt not in LABEL_FORMATS:
        raise ValueError(f"output format {fmt!r} is not one of {LABEL_FORMATS}")
    return "." + fmt


def _suffix_of(path: Path) -> str:
    lower = path.name.lower()
    for fmt in sorted(LABEL_FORMATS, key=len, reverse=True):
        if lower.endswith("." + fmt):
            return "." + fmt
    raise ValueError(f"{path}: unsupported output ending; expected one of {LABEL_FORMATS}")


# --------------------------------------------------------------------------- formats
def _write_nifti(volume: Volume, path: Path) -> None:
    """NIfTI-1; a name ending in ``.gz`` gets a gzip stream from ISA-L (modification time 0,
    no file name in it, so the same volume always gives the same bytes)."""
    image = volume_to_nifti(volume)
    if not path.name.lower().endswith(".gz"):
        image.to_filename(str(path))
        return
    from isal import igzip

    with open(path, "wb") as file, igzip.IGzipFile(filename="", fileobj=file, mode="wb", mtime=0,
                                                    compresslevel=NIFTI_GZIP_LEVEL) as stream:
        image.to_stream(stream)


def _write_sitk(volume: Volume, path: Path) -> None:
    import SimpleITK as sitk

    image = volume_to_sitk(volume)
    with sitk_write_path(path) as writable:
        sitk.WriteImage(image, writable, useCompression=True)


def _read_back_sitk(volume: Volume, path: Path) -> None:
    """Read a file SimpleITK wrote and compare its voxels with ``volume``'s: ITK does not
    always report a failed write (a full disk can leave a 0-byte or truncated file)."""
    import SimpleITK as sitk

    try:
        with sitk_read_paths([path]) as (readable,):
            written = sitk.ReadImage(readable)
    except RuntimeError as err:
        raise OSError(errno.EIO, f"the written file does not read back (disk full?): "
                                 f"{sitk_error_cause(err)}") from err
    if not np.array_equal(sitk.GetArrayViewFromImage(written), volume.array_kji):
        raise OSError(errno.EIO, "the written file reads back with other voxels (disk full?)")


def _segment_extents(array_kji: np.ndarray, values: Sequence[int]) -> dict[int, str]:
    """Slicer extent strings ``"i0 i1 j0 j1 k0 k1"`` (inclusive) per label value."""
    from scipy import ndimage

    boxes = ndimage.find_objects(array_kji.astype(np.int64, copy=False), max_label=max(values))
    extents = {}
    for value in values:
        box = boxes[value - 1]
        if box is None:
            extents[value] = "0 -1 0 -1 0 -1"  # Slicer's empty extent
            continue
        k, j, i = box
        extents[value] = f"{i.start} {i.stop - 1} {j.start} {j.stop - 1} {k.start} {k.stop - 1}"
    return extents


def seg_nrrd_segmentation(volume: Volume, labels: Sequence[LabelInfo]) -> dict[str, Any]:
    """The segmentation that ``slicerio.write_segmentation`` writes as a Slicer ``.seg.nrrd``:
    one layer, label value per segment, named and coloured from ``labels``, each segment
    tagged with its standard terminology (``Segment<n>_Tags`` ``TerminologyEntry``).

    ``voxels`` is the ``(I, J, K)`` view of ``volume.array_kji`` (slicerio's default order),
    ``ijkToLPS`` the volume's 4x4 geometry.
    """
    from ..terminology import slicer_terminology_entry
    from .volume import affine_lps

    extents = _segment_extents(volume.array_kji, [label.value for label in labels]) if labels else {}
    segments = [
        {
            "id": f"Segment_{label.value}",
            "name": label.name,
            "nameAutoGenerated": False,
            "color": [round(c / 255, 6) for c in label.color],
            "colorAutoGenerated": False,
            "labelValue": label.value,
            "layer": 0,
            "extent": [int(v) for v in extents[label.value].split()],
            "terminology": slicer_terminology_entry(label),
        }
        for label in labels
    ]
    return {
        "voxels": volume.array_kji.transpose(2, 1, 0),
        "ijkToLPS": affine_lps(volume),
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
        "segments": segments,
    }


def _write_seg_nrrd(volume: Volume, path: Path, labels: Sequence[LabelInfo]) -> None:
    import slicerio

    slicerio.write_segmentation(str(path), seg_nrrd_segmentation(volume, labels))


def _write_png(volume: Volume, path: Path, labels: Sequence[LabelInfo]) -> None:
    from PIL import Image

    if volume.shape_kji[0] != 1:
        raise ValueError(f"{path}: PNG holds one slice, the label volume has {volume.shape_kji[0]}")
    array = volume.array_kji[0]
    if len(labels) <= 1:
        array = (array > 0).astype(np.uint8) * 255  # binary mask as 0/255
    Image.fromarray(array).save(path)


def _valid_type2(source: Any, keyword: str) -> bool:
    """False for a value highdicom refuses to copy into the SEG: a DA/TM that pydicom cannot
    parse (``PatientBirthDate`` ``"1900/0/0"``) or a PatientSex other than M, F, O (``"N/A"``),
    both seen in real exports. Such a value of a type 2 field is left empty, as anonymisers do."""
    from pydicom.datadict import dictionary_VR
    from pydicom.valuerep import DA, TM

    value = source.get(keyword)
    if not value:
        return True
    vr = dictionary_VR(keyword)
    try:
        if keyword == "PatientSex" and str(value) not in ("M", "F", "O"):
            raise ValueError("expected M, F or O")
        if vr in ("DA", "TM"):
            {"DA": DA, "TM": TM}[vr](str(value))
    except ValueError:
        logger.warning("%s: %s %r is not a valid DICOM %s; the SEG leaves it empty",
                       source.filename, keyword, str(value), vr)
        return False
    return True


# What a DICOM SEG takes from each source image: the UIDs it references or copies (type 1 in
# the SEG), the modality, and for single-frame sources the plane geometry of every frame.
_SEG_SOURCE_UIDS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID",
                    "FrameOfReferenceUID")
_SEG_SLICE_GEOMETRY = ("Rows", "Columns", "PixelSpacing", "ImageOrientationPatient",
                       "ImagePositionPatient")
_CODE_STRING = re.compile(r"[A-Z][A-Z0-9_ ]{0,15}")  # a CS value highdicom accepts
SEG_ALTERNATIVES = "write one of the formats that work without them: nii.gz, nii, nrrd, mha or seg.nrrd"


def _seg_source_problems(source: Any) -> list[str]:
    """The attributes of one source header that a DICOM SEG needs and that are empty,
    missing or invalid."""
    import pydicom.uid
    from pydicom.multival import MultiValue

    frames = int(source.get("NumberOfFrames", 1) or 1)
    needed = _SEG_SOURCE_UIDS + (_SEG_SLICE_GEOMETRY if frames == 1 else ())
    problems = [keyword for keyword in needed if not source.get(keyword)]
    if "SliceThickness" not in source and frames == 1:  # type 2: present, may be empty
        problems.append("SliceThickness")
    for keyword in ("PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient",
                    "SliceThickness"):
        value = source.get(keyword)
        try:
            [float(v) for v in (value if isinstance(value, (list, tuple, MultiValue)) else [value])
             if value not in (None, "")]
        except (TypeError, ValueError):
            problems.append(f"{keyword} ({str(value)!r} is not a number)")
    sop_class = str(source.get("SOPClassUID", "") or "")
    if sop_class and not pydicom.uid.UID(sop_class).name.endswith("Storage"):
        problems.append(f"SOPClassUID ({sop_class!r} is not a known DICOM storage class)")
    modality = str(source.get("Modality", "") or "")
    if not _CODE_STRING.fullmatch(modality):
        problems.append(f"Modality ({modality!r} is not a DICOM code string)" if modality
                        else "Modality")
    return problems


def dicom_seg_sources(volume: Volume) -> list[Any]:
    """The source image headers (pydicom datasets) a DICOM SEG of ``volume`` references, in k order.

    The one check of a DICOM SEG's sources; callers run it before predicting. Raises
    ``ValueError`` naming the input, the cause and the formats that work when the input
    cannot be the source of a DICOM SEG: not DICOM; attributes the SEG references or copies
    empty or missing in some files (anonymisers blank the SOP Class/Instance, Series and
    Study UIDs; the FrameOfReferenceUID places the SEG's frames); two files with the same
    SOPInstanceUID; or a legacy multi-frame image such as RT Dose or US cine (highdicom needs
    enhanced multi-frame geometry or single slices).
    """
    import pydicom

    if not volume.dicom_files:
        raise ValueError(
            f"{volume.source}: DICOM SEG needs a DICOM input (it references the source "
            f"slices) and this is not DICOM; {SEG_ALTERNATIVES}"
        )
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in volume.dicom_files]
    for file, source in zip(volume.dicom_files, sources):
        frames = int(source.get("NumberOfFrames", 1) or 1)
        if frames > 1 and "SharedFunctionalGroupsSequence" not in source:
            raise ValueError(
                f"{file}: a legacy multi-frame {source.get('Modality', '')} image ({frames} "
                f"frames without per-frame functional groups) cannot be the source of a "
                f"DICOM SEG; {SEG_ALTERNATIVES}"
            )
    for file, source in zip(volume.dicom_files, sources):
        try:  # pydicom decodes lazily: decode every element the SEG may copy, here
            for _ in source.iterall():
                pass
        except Exception as err:  # noqa: BLE001 - corrupt bytes make pydicom raise anything
            raise ValueError(
                f"{file}: corrupt DICOM header, which a DICOM SEG would copy "
                f"({error_text(err)}); {SEG_ALTERNATIVES}"
            ) from err
    missing: dict[str, list[Path]] = {}
    for file, source in zip(volume.dicom_files, sources):
        for problem in _seg_source_problems(source):
            missing.setdefault(problem, []).append(file)
    if missing:
        where = "; ".join(
            f"{problem} in {len(files)} of {len(sources)} files (e.g. {files[0].name})"
            for problem, files in missing.items()
        )
        raise ValueError(
            f"{volume.source}: DICOM SEG needs source attributes that are empty, missing or invalid "
            f"(an anonymised series?): {where}; {SEG_ALTERNATIVES}"
        )
    single_frames = [(f, s) for f, s in zip(volume.dicom_files, sources)
                     if int(s.get("NumberOfFrames", 1) or 1) == 1]
    for file, source in single_frames[1:]:  # highdicom compares the values exactly
        if list(source.ImageOrientationPatient) != list(single_frames[0][1].ImageOrientationPatient):
            raise ValueError(
                f"{volume.source}: {file.name} and {single_frames[0][0].name} differ in "
                f"ImageOrientationPatient ({list(source.ImageOrientationPatient)} vs "
                f"{list(single_frames[0][1].ImageOrientationPatient)}); a DICOM SEG needs one "
                f"shared orientation; {SEG_ALTERNATIVES}"
            )
    seen: dict[str, Path] = {}
    for file, source in zip(volume.dicom_files, sources):
        uid = str(source.SOPInstanceUID)
        if uid in seen:
            raise ValueError(
                f"{volume.source}: {seen[uid].name} and {file.name} have the same "
                f"SOPInstanceUID, so a DICOM SEG cannot tell them apart; {SEG_ALTERNATIVES}"
            )
        seen[uid] = file
    return sources


def _write_dicom_seg(volume: Volume, path: Path, labels: Sequence[LabelInfo]) -> None:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from ..terminology import label_codes

    sources = dicom_seg_sources(volume)
    for source in sources:  # anonymised files often drop these type 2 (may be empty) fields
        for keyword in _TYPE2_PATIENT_STUDY:
            if keyword not in source or not _valid_type2(source, keyword):
                setattr(source, keyword, "")
    algorithm = hd.AlgorithmIdentificationSequence(
        name="SAM2-UNet", family=codes.cid7162.ArtificialIntelligence, version="1"
    )
    descriptions = []
    for label in labels:
        category, type_, modifier = (
            None if code is None else hd.sr.CodedConcept(code.value, code.scheme, code.meaning[:64])
            for code in label_codes(label)
        )
        description = hd.seg.SegmentDescription(
            segment_number=label.value,
            segment_label=label.name[:64],
            segmented_property_category=category,
            segmented_property_type=type_,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*label.color),
        )
        if modifier is not None:
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [modifier]
        descriptions.append(description)
    array = volume.array_kji
    if array.dtype != np.uint8 and array.max() <= 255:
        array = array.astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=array,  # (frames = source slices in k order, rows, columns)
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=9000 + int(sources[0].get("SeriesNumber", 0) or 0) % 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name="SAM2-UNet",
        software_versions="1",
        device_serial_number="0",
        series_description="SAM2-UNet segmentation",
    )
    seg.save_as(path)


def _write_atomically(path: Path, write: Callable[[Path], None],
                      verify: Callable[[Path], None] | None = None) -> Path:
    """:func:`atomic_write` (``verify``: a read-back check), with whatever a format library
    raises (highdicom's ``KeyError('')``...) turned into a ``ValueError`` that names ``path``
    and is never empty; ``OSError`` (disk full, permissions) passes unchanged for the caller
    to report."""
    try:
        return atomic_write(path, write, verify)
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001 - the one boundary of the format libraries
        if isinstance(err, ValueError) and str(path) in str(err):
            raise
        raise ValueError(f"{path}: cannot write it ({error_text(err)})") from err


def write_labels(
    volume: Volume, path: str | Path, labels: Sequence[LabelInfo] = ()
) -> Path:
    """Write a label volume atomically; the format follows the ending of ``path``.

    Args:
        volume: integer labels ``(K, J, I)`` on the input's grid.
        path: output file; see the module docstring for the endings.
        labels: names and colours of label values 1..N (``ModelMetadata.labels``), used by
            ``.seg.nrrd`` and ``.dcm``; unnamed values get no segment.
    """
    path = Path(path)
    if volume.array_kji.ndim != 3 or volume.array_kji.dtype.kind not in "ui":
        raise ValueError(
            f"{path}: a label map must be an integer (K, J, I) array, got "
            f"{volume.array_kji.dtype} {volume.array_kji.shape}"
        )
    suffix = _suffix_of(path)
    if suffix in SITK_SUFFIXES:
        return _write_atomically(path, lambda tmp: _write_sitk(volume, tmp),
                                 lambda tmp: _read_back_sitk(volume, tmp))
    writers: dict[str, Callable[[Path], None]] = {
        ".nii.gz": lambda tmp: _write_nifti(volume, tmp),
        ".nii": lambda tmp: _write_nifti(volume, tmp),
        ".seg.nrrd": lambda tmp: _write_seg_nrrd(volume, tmp, labels),
        ".dcm": lambda tmp: _write_dicom_seg(volume, tmp, labels),
        ".png": lambda tmp: _write_png(volume, tmp, labels),
    }
    return _write_atomically(path, writers[suffix])


def unreadable_output(path: Path) -> str | None:
    """Why an existing output file cannot be trusted as finished (empty, or its header does
    not parse: what a full disk or an older version's failed write leaves); None when it
    reads. Cheap: headers only, so that resuming a large folder stays fast."""
    try:
        if path.stat().st_size == 0:
            return "the file is empty"
        name = path.name.lower()
        if name.endswith((".nii.gz", ".nii")):
            import nibabel as nib

            nib.load(path).header.get_data_shape()
        elif name.endswith(SITK_SUFFIXES):  # .seg.nrrd too
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            with sitk_read_paths([path]) as (readable,):
                reader.SetFileName(readable)
                reader.ReadImageInformation()
        elif name.endswith(".dcm"):
            import pydicom

            pydicom.dcmread(path, stop_before_pixels=True)
        elif name.endswith(".png"):
            from PIL import Image

            with Image.open(path) as picture:
                picture.verify()
        elif name.endswith(".json"):
            json.loads(path.read_text(encoding="utf-8"))
    except Exception as err:  # noqa: BLE001 - any failure to parse means "not finished"
        return error_text(err)
    return None


def write_probabilities(volume: Volume, path: str | Path) -> Path:
    """Write a float probability map atomically (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``).

    ``volume.array_kji`` is ``(K, J, I)`` for one foreground channel or ``(K, J, I, C)`` for C
    classes; NIfTI stores the latter as ``(I, J, K, C)``.
    """
    path = Path(path)
    suffix = _suffix_of(path)
    if suffix in (".nii.gz", ".nii"):
        return _write_atomically(path, lambda tmp: _write_nifti(volume, tmp))
    if suffix in SITK_SUFFIXES:
        return _write_atomically(path, lambda tmp: _write_sitk(volume, tmp),
                                 lambda tmp: _read_back_sitk(volume, tmp))
    raise ValueError(f"{path}: probability maps are written as .nii.gz, .nii, .nrrd or .mha")
