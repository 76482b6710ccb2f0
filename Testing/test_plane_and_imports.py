"""The model's slice plane travels from training to prediction, and the light parts of the
package (io, metadata, reading our checkpoints' metadata, the Predictor) import no torch."""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from train_data import write_msd_dataset

from sam2unet_core.cli.predict import main
from sam2unet_core.metadata import (
    FORMAT_VERSION,
    CheckpointError,
    ModelMetadata,
    read_safetensors_metadata,
)

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "monai", "sam2")


def imported_heavy_modules(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; which of HEAVY ended up in ``sys.modules``."""
    probe = f"{code}\nimport sys, json\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, check=True).stdout
    return json.loads(out.splitlines()[-1])


@pytest.mark.parametrize("code", [
    "import sam2unet_core",
    "import sam2unet_core.io",
    "import sam2unet_core.metadata",
    "from sam2unet_core.inference.engine import Predictor, Prediction",
    "from sam2unet_core.inference.batch import PredictOptions, predict_from_files",
])
def test_light_imports_load_no_torch(code: str) -> None:
    assert imported_heavy_modules(code) == []


def test_reading_our_metadata_loads_no_torch_and_top_level_names_still_work(tiny_checkpoint: Path) -> None:
    assert imported_heavy_modules(
        f"from sam2unet_core.metadata import read_safetensors_metadata\n"
        f"assert read_safetensors_metadata({str(tiny_checkpoint)!r}).architecture.backbone == 'hiera_t'"
    ) == []
    assert "torch" in imported_heavy_modules("from sam2unet_core import load_model")


def test_safetensors_header_errors_name_the_file(tmp_path: Path) -> None:
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="short.safetensors.*8-byte"):
        read_safetensors_metadata(short)
    bad_json = tmp_path / "bad.safetensors"
    bad_json.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(CheckpointError, match="bad JSON header"):
        read_safetensors_metadata(bad_json)
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(struct.pack("<Q", 500) + b"{}")
    with pytest.raises(CheckpointError, match="truncated"):
        read_safetensors_metadata(truncated)


def test_version_1_metadata_reads_as_axial_and_the_plane_is_checked() -> None:
    old = ModelMetadata().to_dict()
    del old["plane"]
    old["format_version"] = 1
    assert ModelMetadata.from_dict(old).plane == "axial"
    assert ModelMetadata().to_dict()["format_version"] == 2  # one plane: a version-2 file
    assert ModelMetadata(plane="coronal", planes=["coronal", "axial"]).to_dict()["format_version"] \
        == FORMAT_VERSION == 3
    with pytest.raises(ValueError, match="plane 'oblique'"):
        ModelMetadata(plane="oblique").validate()


def test_a_model_trained_on_coronal_slices_predicts_coronal_slices(
    tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    """Train one step on coronal slices, predict without --axis: the volume is cut along
    its coronal plane (40 slices of the (10, 40, 36) KJI volume, 10 axial ones otherwise)."""
    from sam2unet_core.train.config import load_config
    from sam2unet_core.train.trainer import train

    root = write_msd_dataset(tmp_path / "Dataset003", 2, classes=2)
    config = load_config(None, [
        f"data.root={root}", "data.kind=volume", "data.plane=coronal", "model.backbone=hiera_t",
        "data.input_size=32", "data.num_workers=0", "optim.batch_size=2", "optim.epochs=1",
        "data.samples_per_epoch=2", "data.mean=[]", "data.std=[]", "data.val_fraction=0.5",
        "data.intensity={kind: zscore}", "run.resume_every_minutes=0", f"run.output={tmp_path / 'run'}",
    ])
    model = train(config).output / "last.safetensors"
    assert read_safetensors_metadata(model).plane == "coronal"

    argv = ["-i", str(root / "imagesTr" / "case_000_0000.nii.gz"), "-m", str(model),
            "--device", "cpu", "--progress", "jsonl"]
    assert main(argv + ["-o", str(tmp_path / "default")]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["slices"] for e in events if e["event"] == "case_start"] == [40]
    summary = json.loads((tmp_path / "default" / "predict_summary.json").read_text())
    assert summary["plane"] == "coronal"

    with caplog.at_level(logging.WARNING):  # an explicit --axis wins, with a warning
        assert main(argv + ["-o", str(tmp_path / "axial"), "--axis", "axial"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["slices"] for e in events if e["event"] == "case_start"] == [10]
    assert "trained on coronal slices" in caplog.text
