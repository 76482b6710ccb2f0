"""``sam2unet-evaluate`` on real PNG and NIfTI folders."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import py_sod_metrics as sod
import pytest
from PIL import Image

from sam2unet_core.cli.evaluate import main


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture()
def polyp_results(tmp_path: Path) -> tuple[Path, Path, list[tuple[np.ndarray, np.ndarray]]]:
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(4):
        gt = np.zeros((48, 56), np.uint8)
        y, x = rng.integers(5, 25, size=2)
        gt[y : y + 20, x : x + 25] = 255
        noise = rng.normal(0, 40, gt.shape)
        pred = np.clip(gt * 0.8 + 20 + noise, 0, 255).astype(np.uint8)  # a grey probability map
        write_png(tmp_path / "gt" / f"img{i}.png", gt)
        write_png(tmp_path / "pred" / f"img{i}.png", pred)
        pairs.append((pred, gt))
    return tmp_path / "pred", tmp_path / "gt", pairs


def test_2d_means_equal_the_official_evaluation(polyp_results, tmp_path: Path) -> None:
    pred_dir, gt_dir, pairs = polyp_results
    assert main(["--pred", str(pred_dir), "--gt", str(gt_dir), "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["mode"] == "2d" and len(summary["cases"]) == 4
    # The official eval.py accumulates over the whole set:
    fmv2 = sod.FmeasureV2(metric_handlers={
        "dice": sod.DICEHandler(with_adaptive=True, with_dynamic=True),
        "iou": sod.IOUHandler(with_adaptive=True, with_dynamic=True)})
    sm, wfm, em, mae = sod.Smeasure(), sod.WeightedFmeasure(), sod.Emeasure(), sod.MAE()
    for pred, gt in pairs:
        for metric in (fmv2, sm, wfm, em, mae):
            metric.step(pred=pred, gt=gt)
    res = fmv2.get_results()
    mean = summary["mean"]
    assert mean["mDice"] == pytest.approx(res["dice"]["dynamic"].mean(), rel=1e-9)
    assert mean["mIoU"] == pytest.approx(res["iou"]["dynamic"].mean(), rel=1e-9)
    assert mean["Smeasure"] == pytest.approx(sm.get_results()["sm"], rel=1e-9)
    assert mean["wFmeasure"] == pytest.approx(wfm.get_results()["wfm"], rel=1e-9)
    assert mean["meanEm"] == pytest.approx(em.get_results()["em"]["curve"].mean(), rel=1e-9)
    assert mean["MAE"] == pytest.approx(mae.get_results()["mae"], rel=1e-9)
    expected_bin = np.mean([2 * ((p > 127) & (g > 128)).sum() / ((p > 127).sum() + (g > 128).sum()) for p, g in pairs])
    assert mean["Dice@0.5"] == pytest.approx(expected_bin)
    rows = list(csv.DictReader((tmp_path / "out" / "metrics.csv").open()))
    assert [r["case"] for r in rows] == ["img0", "img1", "img2", "img3", "mean"]


def test_missing_prediction_is_reported(polyp_results, capsys) -> None:
    pred_dir, gt_dir, _ = polyp_results
    (pred_dir / "img2.png").unlink()
    assert main(["--pred", str(pred_dir), "--gt", str(gt_dir)]) == 1
    assert "img2" in capsys.readouterr().err


def test_volumes_get_per_class_dice_hd95_and_surface_dice(tmp_path: Path) -> None:
    affine = np.diag([2.0, 1.0, 1.0, 1.0])  # 2 mm along i, the last KJI axis
    dices = []
    for n in range(2):
        gt = np.zeros((10, 12, 14), np.uint8)  # KJI
        gt[2:6, 3:9, 3:9] = 1
        gt[7:9, 2:5, 9:12] = 2
        pred = gt.copy()
        pred[2:6, 3:9, 9] = 1 if n else 0  # case 1: one extra column of label 1 (2 mm off)
        for folder, array in (("gt", gt), ("pred", pred)):
            (tmp_path / folder).mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(array.transpose(2, 1, 0), affine), tmp_path / folder / f"case_{n}.nii.gz")
        dices.append(2 * 144 / (144 + (pred == 1).sum()))
    assert main(["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")]) == 0
    summary = json.loads((tmp_path / "pred" / "summary.json").read_text())
    assert summary["mode"] == "volume"
    case0, case1 = summary["cases"]
    assert case0["Dice_1"] == 1.0 and case0["HD95_1"] == 0.0 and case0["Dice_2"] == 1.0
    assert case1["Dice_1"] == pytest.approx(dices[1])
    assert case1["HD95_1"] == pytest.approx(2.0)  # the extra column is one 2 mm voxel away
    assert summary["mean"]["Dice_1"] == pytest.approx(np.mean(dices))
    rows = list(csv.DictReader((tmp_path / "pred" / "metrics.csv").open()))
    assert [r["case"] for r in rows] == ["case_0", "case_1", "mean"]
    assert {"Dice_1", "HD95_1", "SurfaceDice_1", "Dice_2", "Dice_mean"} <= set(rows[0])


def test_predict_outputs_evaluate_as_masks_and_as_probability_maps(polyp_results, tiny_checkpoint: Path,
                                                                   tmp_path: Path) -> None:
    """sam2unet-predict's PNG masks (0/255) and its probability maps (NIfTI, paper protocol)
    are both accepted; their Dice@0.5 agree."""
    from sam2unet_core.cli import predict

    _, gt_dir, pairs = polyp_results
    images = tmp_path / "images"
    for n, (pred, _) in enumerate(pairs[:2]):
        write_png(images / f"img{n}.png", np.stack([pred] * 3, axis=-1))
    out = tmp_path / "predicted"
    assert predict.main(["-i", str(images), "-o", str(out), "-m", str(tiny_checkpoint), "--device", "cpu",
                         "--save-probabilities", "--progress", "none"]) == 0
    for name in ("img2.png", "img3.png"):
        (gt_dir / name).unlink()
    assert main(["--pred", str(out), "--gt", str(gt_dir), "--out", str(tmp_path / "masks")]) == 0
    assert main(["--pred", str(out / "probabilities"), "--gt", str(gt_dir), "--out", str(tmp_path / "probs")]) == 0
    masks = json.loads((tmp_path / "masks" / "summary.json").read_text())
    probs = json.loads((tmp_path / "probs" / "summary.json").read_text())
    assert masks["mode"] == probs["mode"] == "2d"
    for a, b in zip(masks["cases"], probs["cases"]):
        assert a["Dice@0.5"] == pytest.approx(b["Dice@0.5"], abs=0.02)
