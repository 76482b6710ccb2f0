"""Metric values against masks whose scores are known by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sam2unet_core.metrics import DiceAccumulator, image_metrics, volume_metrics


def square(size: int, y0: int, y1: int, x0: int, x1: int, value: int = 255) -> np.ndarray:
    image = np.zeros((size, size), np.uint8)
    image[y0:y1, x0:x1] = value
    return image


def test_perfect_2d_prediction_scores_one_and_zero_error() -> None:
    gt = square(64, 10, 40, 12, 50)
    scores = image_metrics(gt.copy(), gt)
    for name in ("Dice@0.5", "Smeasure", "wFmeasure"):
        assert scores[name] == pytest.approx(1.0, abs=1e-6), name
    assert scores["MAE"] == 0.0
    assert 0.99 < scores["meanEm"] < 1.0  # also a 256-threshold curve
    # Threshold 0 of the 256 marks every pixel foreground, so even a perfect 0/255 map
    # scores a little below 1 (as in the official evaluation).
    area, pixels = 30 * 38, 64 * 64
    assert scores["mDice"] == pytest.approx((255 + 2 * area / (pixels + area)) / 256, rel=1e-9)
    assert scores["mIoU"] == pytest.approx((255 + area / pixels) / 256, rel=1e-9)


def test_binary_2d_prediction_dice_and_mae_by_hand() -> None:
    gt = square(64, 0, 20, 0, 20)  # 400 pixels
    pred = square(64, 0, 20, 10, 30)  # 400 pixels, 200 shared
    scores = image_metrics(pred, gt)
    assert scores["Dice@0.5"] == pytest.approx(2 * 200 / 800)
    assert scores["MAE"] == pytest.approx(400 / 64**2)
    # A 0/255 map gives the same binary mask at thresholds 1..255; threshold 0 marks all
    # pixels foreground (Dice 2*400/(4096+400)).
    expected = (255 * 0.5 + 2 * 400 / (4096 + 400)) / 256
    assert scores["mDice"] == pytest.approx(expected, rel=1e-6)


def test_threshold_averaged_dice_of_a_grey_prediction() -> None:
    """A prediction with two grey levels: the mDice is the average over the 256 thresholds
    of the Dice of (pred >= t), which we count by hand (pysodmetrics min-max normalises
    the prediction first: levels 0, 100, 200 stay ordered, 200 becomes 255)."""
    gt = square(32, 0, 16, 0, 32)  # top half, 512 px
    pred = np.zeros((32, 32), np.uint8)
    pred[0:8] = 200  # 256 px inside gt
    pred[8:24] = 100  # 256 px inside gt, 256 px outside
    scaled = (pred / 200 * 255).astype(np.uint8)  # 0, 127, 255 after min-max
    dices = []
    for t in range(256):
        p = scaled >= t
        g = gt > 128
        dices.append(2 * np.logical_and(p, g).sum() / (p.sum() + g.sum()))
    assert image_metrics(pred, gt)["mDice"] == pytest.approx(np.mean(dices), rel=1e-6)
    assert image_metrics(pred, gt)["Dice@0.5"] == pytest.approx(2 * 256 / (256 + 512))


def test_volume_metrics_with_anisotropic_spacing() -> None:
    gt = np.zeros((12, 20, 20), np.uint8)
    gt[2:8, 5:15, 5:15] = 1
    gt[9:11, 1:4, 1:4] = 2
    pred = np.zeros_like(gt)
    pred[3:9, 5:15, 5:15] = 1  # shifted by one slice (2.5 mm)
    scores = volume_metrics(pred, gt, spacing_kji=(2.5, 1.0, 1.0), label_values=[1, 2, 3], tolerance_mm=1.0)
    assert scores[1]["Dice"] == pytest.approx(2 * 500 / 1200)
    assert scores[1]["HD95"] == pytest.approx(2.5)
    # Only the two cap faces of each box lie 2.5 mm from the other surface: > 1 mm tolerance.
    assert 0.0 < scores[1]["SurfaceDice"] < 1.0
    assert scores[1]["SurfaceDice"] > volume_metrics(pred, gt, (5.0, 1.0, 1.0), [1], 1.0)[1]["SurfaceDice"] - 1e-9
    assert scores[2]["Dice"] == 0.0 and math.isnan(scores[2]["HD95"]) and scores[2]["SurfaceDice"] == 0.0
    assert scores[3] == {"Dice": 1.0, "HD95": 0.0, "SurfaceDice": 1.0}  # absent in both
    wide = volume_metrics(pred, gt, (2.5, 1.0, 1.0), [1], tolerance_mm=3.0)[1]
    assert wide["SurfaceDice"] == pytest.approx(1.0)


def test_volume_metrics_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="differs from ground truth"):
        volume_metrics(np.zeros((2, 3, 4)), np.zeros((2, 3, 5)), (1, 1, 1), [1])
    with pytest.raises(ValueError, match="spacing"):
        volume_metrics(np.zeros((2, 3, 4)), np.zeros((2, 3, 4)), (1, 1), [1])


def test_dice_accumulator_sums_slices_of_a_case() -> None:
    acc = DiceAccumulator(num_classes=3)
    gt = torch.zeros(2, 4, 4, dtype=torch.long)
    gt[0, :2, :2] = 1  # case 0: label 1 on slice 0 only
    pred = gt.clone()
    pred[1, 3, 3] = 1  # one false positive on slice 1
    acc.update(torch.tensor([0, 0]), pred, gt)
    acc.update(torch.tensor([1]), gt[:1], gt[:1])
    per_case = acc.per_case()
    assert per_case[0] == pytest.approx([2 * 4 / 9, 1.0])  # label 2 absent -> 1
    assert per_case[1] == pytest.approx([1.0, 1.0])
    assert acc.mean() == pytest.approx((8 / 9 + 3) / 4)
