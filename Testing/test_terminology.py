"""Standard terminology: the SNOMED CT table, the metadata round trip, the training config
field, DICOM SEG (read back with highdicom, checked by dciodvfy) and ``.seg.nrrd`` (slicerio)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import slicerio
from pydicom.data import get_testdata_file
from pydicom.sr._concepts_dict import concepts as CONCEPTS

from sam2unet_core.io import read_volume, write_labels
from sam2unet_core.io.volume import Volume
from sam2unet_core.metadata import Architecture, Code, LabelInfo, ModelMetadata, default_labels
from sam2unet_core.terminology import (
    PRIVATE_SCHEME,
    STANDARD_TERMS,
    codes_from_slicer_terminology,
    label_codes,
    slicer_terminology_entry,
    slicer_terminology_string,
    standard_codes,
)
from sam2unet_core.train.config import TrainConfig, load_config

CT_SERIES = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" / "98892001" / "CT5N"
LIVER = Code("SCT", "10200004", "Liver")
ANATOMY = Code("SCT", "123037004", "Anatomical Structure")


def test_table_codes_agree_with_pydicoms_snomed_dictionary() -> None:
    """Every SNOMED CT value the table uses that pydicom knows has pydicom's meaning (case aside)."""
    known: dict[str, set[str]] = {}
    for entry in CONCEPTS["SCT"].values():
        for value, (meaning, _cids) in entry.items():
            known.setdefault(value, set()).add(meaning.lower())
    checked = 0
    for name, terms in STANDARD_TERMS.items():
        for code in terms:
            if code is None or code.value not in known or code.value in ("123037004", "49755003"):
                continue  # CID 7150 category meanings differ from the concept's full name
            assert code.meaning.lower() in known[code.value], (name, code)
            checked += 1
    assert checked > 40


def test_names_find_their_codes_and_unknown_names_stay_private() -> None:
    assert standard_codes("Liver") == (ANATOMY, LIVER, None)
    category, kind, modifier = standard_codes("left_kidney")
    assert kind.meaning == "Kidney" and modifier == Code("SCT", "7771000", "Left")
    assert standard_codes("Kidney-Right")[2] == Code("SCT", "24028007", "Right")
    assert standard_codes("grey matter")[1].value == "389081007"
    assert standard_codes("White Matter")[1].value == "389080008"
    assert standard_codes("polyps")[1] == Code("SCT", "41329004", "Polyp")
    assert standard_codes("tumour")[0].meaning == "Morphologically Altered Structure"
    assert standard_codes("label_3") is None and standard_codes("blob") is None
    category, kind, modifier = label_codes(LabelInfo(3, "blob", (1, 2, 3)))
    assert category.meaning == "Tissue" and kind == Code(PRIVATE_SCHEME, "L3", "blob") and modifier is None
    own = LabelInfo(1, "hepar", (1, 2, 3), category=ANATOMY, type=LIVER)
    assert label_codes(own) == (ANATOMY, LIVER, None)


def test_metadata_round_trips_codes_and_old_files_still_load() -> None:
    kidney = {"category": ANATOMY.to_list(), "type": ["SCT", "64033007", "Kidney"], "modifier": ["SCT", "24028007", "Right"]}
    labels = default_labels(4, ["liver", "right kidney", "blob"], {"right kidney": kidney})
    assert labels[1].modifier.meaning == "Right" and labels[0].type is None and labels[2].type is None
    labels[0] = LabelInfo(1, "liver", (1, 2, 3), category=ANATOMY, type=LIVER)
    metadata = ModelMetadata(architecture=Architecture(num_classes=4), labels=labels)
    data = json.loads(metadata.to_json())
    assert data["labels"][0]["type"] == ["SCT", "10200004", "Liver"]
    assert data["labels"][1]["modifier"] == ["SCT", "24028007", "Right"]
    assert "type" not in data["labels"][2]  # no code stored for a label without one
    assert ModelMetadata.from_json(metadata.to_json()) == metadata
    for label in data["labels"]:  # a file written before the coded fields existed
        for key in ("category", "type", "modifier"):
            label.pop(key, None)
    old = ModelMetadata.from_dict(data)
    assert [label.name for label in old.labels] == ["liver", "right kidney", "blob"]
    assert old.labels[0].type is None and label_codes(old.labels[0])[1] == LIVER  # filled from the name when written
    assert label_codes(old.labels[1])[2] == Code("SCT", "24028007", "Right")
    data["labels"][0]["type"] = ["SCT", "10200004"]
    with pytest.raises(ValueError, match=r"label 'liver' type must be \[scheme, value, meaning\]"):
        ModelMetadata.from_dict(data)


def test_training_config_label_terms_reach_the_labels(tmp_path: Path) -> None:
    terms = {"hepar": {"category": ANATOMY.to_list(), "type": LIVER.to_list()}}
    config_path = tmp_path / "config.yaml"
    config_path.write_text(json.dumps({"data": {"root": "x"}, "model": {"label_terms": terms}}))
    config = load_config(config_path)
    assert isinstance(config, TrainConfig) and config.model.label_terms == terms
    labels = default_labels(3, ["hepar", "spleen"], config.model.label_terms)
    assert labels[0].type == LIVER and labels[1].type is None and label_codes(labels[1])[1].meaning == "Spleen"
    with pytest.raises(ValueError, match=r"label_terms name labels that do not exist: \['kidney'\]"):
        default_labels(2, ["liver"], {"kidney": terms["hepar"]})
    with pytest.raises(ValueError, match="needs category and type"):
        default_labels(2, ["liver"], {"liver": {"type": LIVER.to_list()}})


def _ct_seg(tmp_path: Path) -> tuple[Path, np.ndarray, Volume]:
    volume = read_volume(CT_SERIES)
    array = np.zeros(volume.shape_kji, np.uint8)
    array[1:4, 40:80, 50:90] = 1
    array[2, 100:110, 100:120] = 2
    array[3, 10:20, 10:20] = 3
    labels = default_labels(4, ["liver", "left kidney", "blob"])
    return write_labels(volume.with_array(array), tmp_path / "ct.dcm", labels), array, volume


def test_dicom_seg_carries_the_codes_and_reads_back_with_highdicom(tmp_path: Path) -> None:
    path, array, volume = _ct_seg(tmp_path)
    seg = hd.seg.segread(path)
    liver = seg.get_segment_description(1)
    assert liver.segment_label == "liver"
    assert (liver.segmented_property_category.value, liver.segmented_property_category.scheme_designator) == ("123037004", "SCT")
    assert (liver.segmented_property_type.value, liver.segmented_property_type.meaning) == ("10200004", "Liver")
    kidney = seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0]
    assert kidney.CodeValue == "64033007"
    assert kidney.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "7771000"
    blob = seg.get_segment_description(3)
    assert blob.segmented_property_type.scheme_designator == PRIVATE_SCHEME
    uids = [str(pydicom.dcmread(f).SOPInstanceUID) for f in volume.dicom_files]
    np.testing.assert_array_equal(seg.get_pixels_by_source_instance(uids, combine_segments=True), array)


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian package dicom3tools) is not installed")
def test_dicom_seg_passes_dciodvfy_without_errors(tmp_path: Path) -> None:
    path, _, _ = _ct_seg(tmp_path)
    report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    text = report.stdout + report.stderr
    errors = [line for line in text.splitlines() if line.startswith("Error")]
    assert "Segmentation" in text  # it did recognise the IOD
    assert errors == [], text


def test_seg_nrrd_written_with_slicerio_carries_terminology_and_geometry(tmp_path: Path) -> None:
    direction = sitk.VersorTransform((1.0, 2.0, 0.5), 0.4).GetMatrix()
    volume = Volume(np.zeros((4, 5, 6), np.uint8), spacing_ijk=(0.7, 0.8, 2.0), origin_lps=(3.0, -4.0, 5.0),
                    direction_lps=np.array(direction).reshape(3, 3))
    volume.array_kji[1:3, 2:4, 0:5] = 1
    labels = default_labels(3, ["liver", "blob"])
    path = write_labels(volume, tmp_path / "s.seg.nrrd", labels)
    segmentation = slicerio.read_segmentation(str(path))
    liver, blob = segmentation["segments"]
    assert liver["name"] == "liver" and liver["labelValue"] == 1 and liver["id"] == "Segment_1"
    assert liver["terminology"]["type"] == ["SCT", "10200004", "Liver"]
    assert liver["terminology"]["category"] == ["SCT", "123037004", "Anatomical Structure"]
    assert blob["terminology"]["type"] == [PRIVATE_SCHEME, "L2", "blob"]
    assert liver["terminology"] == {**slicer_terminology_entry(labels[0])}
    image = sitk.ReadImage(str(path))  # the geometry, read by an independent reader
    np.testing.assert_allclose(image.GetDirection(), volume.direction_lps.ravel(), atol=1e-6)
    np.testing.assert_allclose(image.GetSpacing(), volume.spacing_ijk, atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), volume.origin_lps, atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), volume.array_kji)
    tags = image.GetMetaData("Segment0_Tags")
    assert "TerminologyEntry:Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure~SCT^10200004^Liver" in tags


def test_slicer_tag_string_is_what_slicerio_writes_and_reads() -> None:
    for label in default_labels(4, ["liver", "left kidney", "blob"]):
        text = slicer_terminology_string(label)
        assert text == slicerio.segmentation.terminology_entry_to_string(slicer_terminology_entry(label))
        assert slicerio.segmentation.terminology_entry_from_string(text)["type"] == label_codes(label)[1].to_list()


def test_slicer_tag_reads_back_to_its_codes_and_slicers_default_says_nothing() -> None:
    for label in default_labels(4, ["grey matter", "left kidney", "polyp"]):
        assert codes_from_slicer_terminology(slicer_terminology_string(label)) == label_codes(label)
    default = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^85756007^Tissue~"
               "SCT^85756007^Tissue~^^~Anatomic codes - DICOM master list~^^~^^")  # a new segment in Slicer
    private = slicer_terminology_string(default_labels(2, ["blob"])[0])
    assert [codes_from_slicer_terminology(text) for text in (default, private, "", "no tilde")] == [None] * 4
