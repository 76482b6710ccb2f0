"""``make demo`` end to end, shrunk (4 mm volumes, 64 px, one short epoch): the dataset is
real NIfTI from nilearn's template, the Dice it reports equals our own count, and the
label maps and overlays exist."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from sam2unet_core import read_metadata
from sam2unet_core.train.config import load_config

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "training" / "demo.py"
# the script, imported by its path (not as a package named training)
_spec = importlib.util.spec_from_file_location("sam2unet_demo_script", DEMO)
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)
DEFAULT_CONFIG, main = demo.DEFAULT_CONFIG, demo.main


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reports_true_dice(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    rc = main(["--out", str(out), "--device", "cpu", "--train-cases", "2", "--test-cases", "1",
               "--resolution-mm", "4", "optim.epochs=1", "data.samples_per_epoch=8", "data.input_size=64", "augment.crop_size=32",
               "augment.train_size=56", "optim.batch_size=4", "data.val_fraction=0.5"])
    assert rc == 0
    data = out / "Dataset001_MNIBrain"
    assert json.loads((data / "dataset.json").read_text())["labels"]["white_matter"] == 2
    assert len(list((data / "imagesTr").glob("*_0000.nii.gz"))) == 2
    summary = json.loads((out / "evaluation" / "summary.json").read_text())
    printed = capsys.readouterr().out
    for row in summary["cases"]:
        truth = np.asarray(nib.load(data / "labelsTs" / f"{row['case']}.nii.gz").dataobj)
        pred = np.asarray(nib.load(out / "predictions" / f"{row['case']}.nii.gz").dataobj)
        assert pred.shape == truth.shape
        for value in (1, 2):
            total = (pred == value).sum() + (truth == value).sum()
            dice = 2 * ((pred == value) & (truth == value)).sum() / total if total else 1.0
            assert row[f"Dice_{value}"] == pytest.approx(dice)
            assert f"{dice:.4f}" in printed
        overlay = Image.open(out / f"overlay_{row['case']}.png")
        assert overlay.mode == "RGB" and overlay.width > 3 * 40
    recipe = load_config(DEFAULT_CONFIG, ["data.root=x"]).model  # the demo's config with its packaged recipe
    meta = read_metadata(out / "model" / "best.safetensors")
    assert recipe.window_spec and list(meta.architecture.window_spec) == recipe.window_spec
    assert recipe.full_res_channels and meta.architecture.full_res_channels == recipe.full_res_channels
    # trained on 56 px slices (augment.train_size), predicts at 64 px (data.input_size)
    assert meta.input_size == 64 and meta.provenance["config"]["augment"]["train_size"] == 56


SHORT = ["--device", "cpu", "--train-cases", "2", "--test-cases", "1", "--resolution-mm", "4", "optim.epochs=1",
         "data.samples_per_epoch=4", "data.input_size=64", "augment.crop_size=32", "augment.train_size=56", "optim.batch_size=4",
         "data.val_fraction=0.5"]


@pytest.mark.slow
def test_demo_trains_on_a_given_sam2_checkpoint_with_the_trunk_frozen(tmp_path: Path, sam2_checkpoint: Path) -> None:
    out = tmp_path / "demo"
    assert main(["--out", str(out), "--sam2", str(sam2_checkpoint), *SHORT]) == 0
    from sam2unet_core import load_model

    meta = read_metadata(out / "model" / "best.safetensors")
    assert meta.architecture.freeze_encoder and meta.architecture.window_spec == ()  # SAM 2's windows
    assert meta.architecture.full_res_channels == 0  # and the paper's head
    assert meta.provenance["config"]["model"]["sam2_checkpoint"] == str(sam2_checkpoint.resolve())
    # The trunk the model holds is the checkpoint's (frozen: training left it as loaded).
    state = torch.load(sam2_checkpoint, map_location="cpu", weights_only=True)["model"]
    trunk = load_model(out / "model" / "best.safetensors").encoder.state_dict()
    weight = "patch_embed.proj.weight"
    assert torch.equal(trunk[weight], state[f"image_encoder.trunk.{weight}"])


def test_demo_names_a_missing_sam2_checkpoint(tmp_path: Path, capsys) -> None:
    assert main(["--out", str(tmp_path / "demo"), "--sam2", str(tmp_path / "none.pt"), *SHORT]) == 2
    assert "none.pt: no such file" in capsys.readouterr().err


def test_demo_script_runs_by_path_from_anywhere_with_its_own_config(tmp_path: Path) -> None:
    """``python training/demo.py`` from another folder: the script finds its config and the
    data builder; the package holds no demo (it is not part of the wheel)."""
    shown = subprocess.run([sys.executable, str(DEMO), "--help"], cwd=tmp_path, capture_output=True, text=True,
                           check=True).stdout
    assert str(REPO / "training" / "configs" / "demo_brain_cpu.yaml") in " ".join(shown.split())
    assert DEFAULT_CONFIG.is_file()
    assert importlib.util.find_spec("sam2unet_core.demo") is None
