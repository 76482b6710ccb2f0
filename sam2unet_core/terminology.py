"""Standard terminology for segment labels: SNOMED CT codes as DICOM SEG and 3D Slicer use them.

A segment is described by a *category* (DICOM CID 7150 "Segmentation Property Categories"),
a *type* (CID 7151 "Segmentation Property Types") and an optional type *modifier* (here the
laterality, CID 244). :data:`STANDARD_TERMS` maps common label names (abdominal organs, brain
tissues, polyp, tumour, lesion, ...) to those codes; :func:`standard_codes` looks a name up,
:func:`label_codes` gives every label its codes: its own, else the table's, else a clearly
private code (scheme :data:`PRIVATE_SCHEME`, so no viewer mistakes it for a standard concept).

No imports beyond the standard library: the Slicer panel uses this module.
"""

from __future__ import annotations

import re

from .metadata import Code, LabelInfo

__all__ = [
    "PRIVATE_SCHEME",
    "STANDARD_TERMS",
    "SLICER_CONTEXT",
    "SLICER_ANATOMIC_CONTEXT",
    "standard_codes",
    "label_codes",
    "slicer_terminology_entry",
    "slicer_terminology_string",
    "codes_from_slicer_terminology",
]

PRIVATE_SCHEME = "99SAM2UNET"  # DICOM private coding schemes start with "99"
SLICER_CONTEXT = "Segmentation category and type - DICOM master list"
SLICER_ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"

ANATOMICAL_STRUCTURE = Code("SCT", "123037004", "Anatomical Structure")
TISSUE = Code("SCT", "85756007", "Tissue")
ALTERED_STRUCTURE = Code("SCT", "49755003", "Morphologically Altered Structure")
BODY_SUBSTANCE = Code("SCT", "91720002", "Body Substance")
RIGHT = Code("SCT", "24028007", "Right")
LEFT = Code("SCT", "7771000", "Left")

_ORGANS = {  # type code value, meaning; category Anatomical Structure
    "liver": ("10200004", "Liver"),
    "spleen": ("78961009", "Spleen"),
    "kidney": ("64033007", "Kidney"),
    "pancreas": ("15776009", "Pancreas"),
    "stomach": ("69695003", "Stomach"),
    "gallbladder": ("28231008", "Gallbladder"),
    "aorta": ("15825003", "Aorta"),
    "inferior vena cava": ("64131007", "Inferior vena cava"),
    "portal vein": ("32764006", "Portal vein"),
    "bladder": ("89837001", "Bladder"),
    "urinary bladder": ("89837001", "Bladder"),
    "lung": ("39607008", "Lung"),
    "heart": ("80891009", "Heart"),
    "brain": ("12738006", "Brain"),
    "esophagus": ("32849002", "Esophagus"),
    "oesophagus": ("32849002", "Esophagus"),
    "adrenal gland": ("23451007", "Adrenal gland"),
    "duodenum": ("38848004", "Duodenum"),
    "colon": ("71854001", "Colon"),
    "small intestine": ("30315005", "Small intestine"),
    "rectum": ("34402009", "Rectum"),
    "prostate": ("41216001", "Prostate"),
    "uterus": ("35039007", "Uterus"),
    "trachea": ("44567001", "Trachea"),
    "thyroid": ("69748006", "Thyroid"),
    "hippocampus": ("5366008", "Hippocampus"),
    "thalamus": ("42695009", "Thalamus"),
    "cerebellum": ("113305005", "Cerebellum"),
    "lateral ventricle": ("66720007", "Lateral Ventricle"),
    "femur": ("71341001", "Femur"),
    "vertebra": ("51282000", "Vertebra"),
}
_TISSUES = {  # category Tissue
    "grey matter": ("389081007", "Gray Matter"),
    "gray matter": ("389081007", "Gray Matter"),
    "white matter": ("389080008", "White Matter"),
    "bone": ("272673000", "Bone"),
    "skin": ("39937001", "Skin"),
    "muscle": ("71616004", "Muscle"),
    "fat": ("256674009", "Fat"),
}
_ALTERED = {  # category Morphologically Altered Structure
    "polyp": ("41329004", "Polyp"),
    "tumour": ("108369006", "Tumor"),
    "tumor": ("108369006", "Tumor"),
    "neoplasm": ("108369006", "Neoplasm"),
    "lesion": ("52988006", "Lesion"),
    "mass": ("4147007", "Mass"),
    "cyst": ("367643001", "Cyst"),
    "nodule": ("27925004", "Nodule"),
    "edema": ("79654002", "Edema"),
    "oedema": ("79654002", "Edema"),
    "necrosis": ("6574001", "Necrosis"),
}
_SUBSTANCES = {  # category Body Substance
    "csf": ("65216001", "Cerebrospinal Fluid"),
    "cerebrospinal fluid": ("65216001", "Cerebrospinal Fluid"),
}

# Normalised name -> (category, type, modifier or None).
STANDARD_TERMS: dict[str, tuple[Code, Code, Code | None]] = {
    name: (category, Code("SCT", value, meaning), None)
    for category, table in (
        (ANATOMICAL_STRUCTURE, _ORGANS), (TISSUE, _TISSUES), (ALTERED_STRUCTURE, _ALTERED), (BODY_SUBSTANCE, _SUBSTANCES)
    )
    for name, (value, meaning) in table.items()
}
_PAIRED = ("kidney", "lung", "adrenal gland", "femur", "hippocampus", "thalamus", "lateral ventricle")
for _organ in _PAIRED:
    _category, _type, _ = STANDARD_TERMS[_organ]
    for _side, _modifier in (("right", RIGHT), ("left", LEFT)):
        STANDARD_TERMS[f"{_side} {_organ}"] = (_category, _type, _modifier)
        STANDARD_TERMS[f"{_organ} {_side}"] = (_category, _type, _modifier)


def _normalise(name: str) -> str:
    """``"Left_Kidney"``, ``"kidney-left"``, ``" Grey  Matter "`` -> ``"left kidney"`` etc."""
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def standard_codes(name: str) -> tuple[Code, Code, Code | None] | None:
    """(category, type, modifier) of a label name found in :data:`STANDARD_TERMS`
    (case, spaces, ``_`` and ``-`` ignored; a plural ``s`` too), else None."""
    key = _normalise(name)
    found = STANDARD_TERMS.get(key)
    if found is None and key.endswith("s"):
        found = STANDARD_TERMS.get(key[:-1])
    return found


def label_codes(label: LabelInfo) -> tuple[Code, Code, Code | None]:
    """The (category, type, modifier) to write for ``label``: its own codes, else the table's,
    else category Tissue with the private type ``99SAM2UNET L<value>`` meaning the name."""
    if label.category is not None and label.type is not None:
        return label.category, label.type, label.modifier
    found = standard_codes(label.name)
    if found is not None:
        return found
    return TISSUE, Code(PRIVATE_SCHEME, f"L{label.value}", label.name[:64] or f"label {label.value}"), None


def slicer_terminology_entry(label: LabelInfo) -> dict[str, object]:
    """The label's terminology as slicerio writes it (the ``TerminologyEntry`` segment tag)."""
    category, type_, modifier = label_codes(label)
    entry: dict[str, object] = {
        "contextName": SLICER_CONTEXT,
        "category": category.to_list(),
        "type": type_.to_list(),
        "anatomicContextName": SLICER_ANATOMIC_CONTEXT,
    }
    if modifier is not None:
        entry["typeModifier"] = modifier.to_list()
    return entry


def slicer_terminology_string(label: LabelInfo) -> str:
    """The label's ``TerminologyEntry`` segment tag as 3D Slicer stores it:
    ``context~category~type~modifier~anatomicContext~region~regionModifier``, each code
    ``scheme^value^meaning`` (empty ``^^`` when absent)."""
    entry = slicer_terminology_entry(label)
    empty = ["", "", ""]
    return "~".join([
        str(entry["contextName"]),
        "^".join(entry["category"]),  # type: ignore[arg-type]
        "^".join(entry["type"]),  # type: ignore[arg-type]
        "^".join(entry.get("typeModifier", empty)),  # type: ignore[arg-type]
        str(entry["anatomicContextName"]),
        "^".join(empty),
        "^".join(empty),
    ])


def codes_from_slicer_terminology(text: str) -> tuple[Code, Code, Code | None] | None:
    """(category, type, modifier) of a ``TerminologyEntry`` segment tag (the format of
    :func:`slicer_terminology_string`), or None when the tag says nothing specific: empty or
    unreadable, Slicer's default for a new segment (category and type "Tissue"), or a
    private code of ours (:data:`PRIVATE_SCHEME`, made from a label's name and value)."""
    fields = text.split("~")
    if len(fields) < 4:
        return None

    def code(field: str) -> Code | None:
        parts = field.split("^")
        return Code(*parts) if len(parts) == 3 and all(parts) else None

    category, type_, modifier = code(fields[1]), code(fields[2]), code(fields[3])
    if category is None or type_ is None or type_.scheme == PRIVATE_SCHEME:
        return None
    if category.value == TISSUE.value and type_.value == TISSUE.value:
        return None
    return category, type_, modifier
