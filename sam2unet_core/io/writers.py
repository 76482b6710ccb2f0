"""Write label maps and probability maps with exactly the geometry of their :class:`Volume`.

Formats, chosen by file ending:
    * ``.nii.gz`` / ``.nii``: NIfTI-1 (nibabel), qform = sform = the volume's geometry.
    * ``.seg.nrrd``: a 3D Slicer segmentation (one layer, label value per segment) whose
      segment names and colours come from the model's :class:`LabelInfo` list.
    * ``.nrrd`` / ``.mha``: plain label volumes (SimpleITK).
    * ``.dcm``: DICOM SEG (highdicom), only for volumes read from DICOM; it references
      the source slices.
    * ``.png``: 2D label images; a binary mask is stored as 0/255 (the polyp benchmarks'
      convention), multi-class maps as their label values.

Every file is first written under a temporary name in the target folder, then renamed, so
an interrupted run never leaves a half-written output under the final name.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..metadata import LabelInfo
from .convert import volume_to_nifti, volume_to_sitk
from .errors import error_text
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
]

logger = logging.getLogger(__name__)

LABEL_FORMATS = ("nii.gz", "nii", "seg.nrrd", "nrrd", "mha", "dcm", "png")
MANUFACTURER = "sam2unet_core"
PARTIAL_PREFIX = ".partial-"  # temporary files of atomic_write start with this
_PARTIAL_NAME = re.compile(re.escape(PARTIAL_PREFIX) + r"\d+-(?P<name>.+)")  # pid, then name
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


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(temporary_path)`` and rename the result to ``path``.

    The temporary file ``.partial-<pid>-<name>`` sits next to ``path`` and ends like it
    (writers pick the format from the ending); it is removed if ``write`` fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{PARTIAL_PREFIX}{os.getpid()}-{path.name}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path


def remove_partials(paths: Iterable[Path]) -> list[Path]:
    """Delete the temporary files that :func:`atomic_write` calls of any process left for
    these output paths (``.partial-<pid>-<name>``: half-written outputs of a killed run);
    returns them. Call it only for outputs that no other running process is writing."""
    wanted: dict[Path, set[str]] = {}
    for path in paths:
        wanted.setdefault(Path(path).parent, set()).add(Path(path).name)
    removed = []
    for folder, names in wanted.items():
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            match = _PARTIAL_NAME.fullmatch(entry.name)
            if match and match.group("name") in names:
                entry.unlink(missing_ok=True)
                logger.info("removed %s, left by an interrupted run", entry)
                removed.append(entry)
    return removed


# --------------------------------------------------------------------------- formats
def _write_nifti(volume: Volume, path: Path) -> None:
    volume_to_nifti(volume).to_filename(str(path))


def _write_sitk(volume: Volume, path: Path, metadata: dict[str, str] | None = None) -> None:
    import SimpleITK as sitk

    image = volume_to_sitk(volume)
    for key, value in (metadata or {}).items():
        image.SetMetaData(key, value)
    sitk.WriteImage(image, str(path), useCompression=True)


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


def seg_nrrd_metadata(array_kji: np.ndarray, labels: Sequence[LabelInfo]) -> dict[str, str]:
    """The key/value fields that make a NRRD label volume a Slicer segmentation."""
    fields = {
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
        "Segmentation_ConversionParameters": "",
    }
    extents = _segment_extents(array_kji, [label.value for label in labels]) if labels else {}
    for index, label in enumerate(labels):
        prefix = f"Segment{index}_"
        fields[prefix + "ID"] = f"Segment_{label.value}"
        fields[prefix + "Name"] = label.name
        fields[prefix + "NameAutoGenerated"] = "0"
        fields[prefix + "Color"] = " ".join(f"{c / 255:.6g}" for c in label.color)
        fields[prefix + "ColorAutoGenerated"] = "0"
        fields[prefix + "LabelValue"] = str(label.value)
        fields[prefix + "Layer"] = "0"
        fields[prefix + "Extent"] = extents[label.value]
        fields[prefix + "Tags"] = "|"
    return fields


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
SEG_ALTERNATIVES = "the formats that work without them: --format nii.gz, nii, nrrd, mha or seg.nrrd"


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

    sources = dicom_seg_sources(volume)
    for source in sources:  # anonymised files often drop these type 2 (may be empty) fields
        for keyword in _TYPE2_PATIENT_STUDY:
            if keyword not in source or not _valid_type2(source, keyword):
                setattr(source, keyword, "")
    algorithm = hd.AlgorithmIdentificationSequence(
        name="SAM2-UNet", family=codes.cid7162.ArtificialIntelligence, version="1"
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=label.value,
            segment_label=label.name[:64],
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=hd.sr.CodedConcept(
                value=f"L{label.value}", scheme_designator="99SAM2UNET", meaning=label.name[:64]
            ),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*label.color),
        )
        for label in labels
    ]
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


def _write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """:func:`atomic_write`, with whatever a format library raises (highdicom's
    ``KeyError('')``...) turned into a ``ValueError`` that names ``path`` and is never empty;
    ``OSError`` (disk full, permissions) passes unchanged for the caller to report."""
    try:
        return atomic_write(path, write)
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
    writers: dict[str, Callable[[Path], None]] = {
        ".nii.gz": lambda tmp: _write_nifti(volume, tmp),
        ".nii": lambda tmp: _write_nifti(volume, tmp),
        ".seg.nrrd": lambda tmp: _write_sitk(
            volume, tmp, seg_nrrd_metadata(volume.array_kji, labels)
        ),
        ".nrrd": lambda tmp: _write_sitk(volume, tmp),
        ".mha": lambda tmp: _write_sitk(volume, tmp),
        ".dcm": lambda tmp: _write_dicom_seg(volume, tmp, labels),
        ".png": lambda tmp: _write_png(volume, tmp, labels),
    }
    return _write_atomically(path, writers[suffix])


def write_probabilities(volume: Volume, path: str | Path) -> Path:
    """Write a float probability map atomically (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``).

    ``volume.array_kji`` is ``(K, J, I)`` for one foreground channel or ``(K, J, I, C)`` for C
    classes; NIfTI stores the latter as ``(I, J, K, C)``.
    """
    path = Path(path)
    suffix = _suffix_of(path)
    if suffix in (".nii.gz", ".nii"):
        return _write_atomically(path, lambda tmp: _write_nifti(volume, tmp))
    if suffix in (".nrrd", ".mha"):
        return _write_atomically(path, lambda tmp: _write_sitk(volume, tmp))
    raise ValueError(f"{path}: probability maps are written as .nii.gz, .nii, .nrrd or .mha")
