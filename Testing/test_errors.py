"""Typed library errors (``sam2unet_core.errors``): each raise site says its kind, field and
value, stays a ``ValueError`` for older callers, and the CLI words it by field alone."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sam2unet_core.cli.progress import flag_words
from sam2unet_core.errors import (OptionError, OutOfMemoryError, UnreadableInputError, UnsupportedModelError,
                                  error_fields)
from sam2unet_core.inference.batch import CaseOutputs, PredictOptions
from sam2unet_core.io.cases import Case
from sam2unet_core.io.readers import read_volume
from sam2unet_core.io.volume import check_fits_in_memory
from sam2unet_core.metadata import CheckpointError, UntrainedModelError, read_metadata


@pytest.mark.parametrize("options, field, value", [
    (PredictOptions(axis="oblique"), "axis", "oblique"),
    (PredictOptions(planes=("axial", "axial")), "planes", ["axial", "axial"]),
    (PredictOptions(output_format="jpeg"), "output_format", "jpeg"),
    (PredictOptions(num_parts=2, part_id=2), "part_id", 2),
    (PredictOptions(slice_range=(4, 2)), "slice_range", [4, 2]),
    (PredictOptions(postprocess=("smooth",)), "postprocess", ["smooth"]),
])
def test_option_errors_name_their_field_and_value(options: PredictOptions, field: str, value: object) -> None:
    with pytest.raises(OptionError) as info:
        options.validate()
    assert isinstance(info.value, ValueError)
    assert (info.value.kind, info.value.field, info.value.value) == ("option", field, value)
    assert "--" not in str(info.value)  # the library names no CLI flag


def test_unreadable_and_oversized_inputs_say_their_kind(tmp_path: Path) -> None:
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a NIfTI file")
    with pytest.raises(UnreadableInputError, match="broken.nii.gz") as info:
        read_volume(broken)
    assert error_fields(info.value) == {"kind": "unreadable_input"}
    four_d = tmp_path / "fourd.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3, 2), np.float32), np.eye(4)), four_d)
    with pytest.raises(OptionError) as info:
        read_volume(four_d)
    assert (info.value.field, info.value.value) == ("volume_index", None)
    with pytest.raises(OutOfMemoryError) as info:
        check_fits_in_memory("big.nii.gz", (10**6, 10**6, 10**6), 4, advice="segment without probabilities",
                             field="probabilities", value=False)
    assert isinstance(info.value, ValueError) and isinstance(info.value, MemoryError)
    assert error_fields(info.value) == {"kind": "out_of_memory", "field": "probabilities", "value": False}


def test_unusable_models_are_unsupported_model_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(b"garbage")
    with pytest.raises(CheckpointError) as info:
        read_metadata(garbage)
    assert isinstance(info.value, UnsupportedModelError) and info.value.kind == "unsupported_model"
    assert issubclass(UntrainedModelError, UnsupportedModelError) and issubclass(UntrainedModelError, ValueError)


@pytest.mark.parametrize("kind, field, value, worded", [
    ("option", "slice_range", [4, 2], "--slice-range: MESSAGE"),
    ("option", "output_format", "dcm", "--format: MESSAGE"),
    ("option", "output_dir", "/x", "MESSAGE"),  # no flag of its own: left as it is
    ("out_of_memory", "batch_size", 4, "MESSAGE (--batch-size 4)"),
    ("out_of_memory", "probabilities", False, "MESSAGE (without --save-probabilities)"),
    ("out_of_memory", "axis", None, "MESSAGE (--axis)"),
    ("out_of_memory", None, None, "MESSAGE"),
    (None, None, None, "MESSAGE"),
])
def test_the_cli_words_errors_by_their_field(kind, field, value, worded: str) -> None:
    assert flag_words("MESSAGE", kind, field, value) == worded


def test_case_outputs_are_named_and_know_their_format(tmp_path: Path) -> None:
    options = PredictOptions(save_probabilities=True, statistics=True, qc_png=True)
    volume = CaseOutputs.plan(Case("ct", tmp_path / "ct_0000.nii.gz"), tmp_path, options)
    assert (volume.labels.name, volume.label_format) == ("ct.nii.gz", "nii.gz")
    assert [p.relative_to(tmp_path).as_posix() for p in volume.paths] == [
        "ct.nii.gz", "probabilities/ct.nii.gz", "ct.statistics.json", "ct.statistics.csv", "ct.qc.png"]
    frame = CaseOutputs.plan(Case("f", tmp_path / "f.png"), tmp_path, options)
    assert frame.label_format == "png" and frame.statistics_json is None and frame.qc_png is None
    seg = CaseOutputs.plan(Case("ct", tmp_path / "ct"), tmp_path, PredictOptions(output_format="dcm"))
    assert (seg.labels.name, seg.label_format, seg.paths) == ("ct.dcm", "dcm", [seg.labels])
