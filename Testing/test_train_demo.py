"""``make demo`` end to end, shrunk (4 mm volumes, 64 px, one short epoch): the dataset is
real NIfTI from nilearn's template, the Dice it reports equals our own count, and the
label maps and overlays exist."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from sam2unet_core.demo import main


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reports_true_dice(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    rc = main(["--out", str(out), "--device", "cpu", "--train-cases", "2", "--test-cases", "1",
               "--resolution-mm", "4", "optim.epochs=1", "data.samples_per_epoch=8", "data.input_size=64",
               "optim.batch_size=4", "data.val_fraction=0.5"])
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
    assert (out / "model" / "best.safetensors").exists()
