"""Segmentation metrics: the paper's 2D polyp metrics and per-class volume metrics.

2D (``image_metrics``): the metrics of the official SAM2-UNet ``eval.py`` through
``pysodmetrics``. ``mDice``/``mIoU`` are the *threshold-averaged* scores the paper reports:
the prediction (grey values 0-255) is binarised at each of 256 thresholds, Dice/IoU is
computed per threshold and averaged. ``Dice@0.5`` binarises at p > 0.5 (pixel > 127). Also the
S-measure, weighted F-measure, mean E-measure and MAE. All these are per-image values whose
mean over images equals the dataset value of the official script.

Volumes (``volume_metrics``): per label value, MONAI's Dice, 95th-percentile Hausdorff
distance (mm) and normalised surface Dice at a tolerance in mm, using the voxel spacing.
Conventions for empty structures: both empty -> Dice 1, surface Dice 1, HD95 0; only one
empty -> Dice 0, surface Dice 0, HD95 NaN (undefined; means skip NaN).

Arrays are KJI (``(slices, rows, columns)``) with ``spacing_kji`` in the same axis order.
Importing this module costs no torch (``mask_dice`` serves torch-free callers); the pieces
that work on tensors import it when called.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["DiceAccumulator", "mask_dice", "image_metrics", "volume_metrics", "IMAGE_METRIC_NAMES"]

IMAGE_METRIC_NAMES = ("mDice", "mIoU", "Dice@0.5", "Smeasure", "wFmeasure", "meanEm", "MAE")


class DiceAccumulator:
    """Dice per case and class from label maps fed in pieces (slices or images).

    ``update(case_ids, pred, gt)`` takes ``(B,)`` case ids and ``(B, H, W)`` integer label
    maps; the sums of all pieces of a case make its (3D) Dice. ``num_classes`` counts model
    channels: 1 (binary, label 1) or K (labels 1..K-1 are scored). A class absent from both
    prediction and ground truth of a case scores 1.
    """

    def __init__(self, num_classes: int) -> None:
        self.values = list(range(1, max(num_classes, 2)))
        self.sums: dict[int, torch.Tensor] = {}  # case -> (3, classes): intersection, pred, gt

    def update(self, case_ids: torch.Tensor, pred: torch.Tensor, gt: torch.Tensor) -> None:
        import torch

        for case, p, g in zip(case_ids.tolist(), pred, gt):
            rows = [
                torch.stack([((p == v) & (g == v)).sum(), (p == v).sum(), (g == v).sum()])
                for v in self.values
            ]
            counts = torch.stack(rows, dim=1).double().cpu()
            self.sums[case] = self.sums.get(case, 0) + counts

    def per_case(self) -> dict[int, list[float]]:
        """``{case: [Dice of label 1, 2, ...]}``."""
        import torch

        out = {}
        for case, (inter, n_pred, n_gt) in self.sums.items():
            denom = n_pred + n_gt
            dice = torch.where(denom > 0, 2 * inter / denom.clamp(min=1), torch.ones_like(denom))
            out[case] = dice.tolist()
        return out

    def mean(self) -> float:
        """Mean over cases and classes (NaN before any update)."""
        scores = [d for dices in self.per_case().values() for d in dices]
        return float(np.mean(scores)) if scores else float("nan")


def mask_dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    total = int(pred.sum()) + int(gt.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(pred, gt).sum()) / total


def image_metrics(pred_u8: np.ndarray, gt_u8: np.ndarray) -> dict[str, float]:
    """Metrics of one 2D prediction, as in the official ``eval.py``.

    Args:
        pred_u8: ``(H, W)`` uint8 probability map (0-255) or binary mask (0/255).
        gt_u8: ``(H, W)`` uint8 mask; pixels > 128 are foreground (pysodmetrics' rule).

    As in the official evaluation, pysodmetrics min-max normalises each prediction before
    the threshold-averaged and structural metrics. ``Dice@0.5`` does not: it is the Dice of
    ``pred > 127`` (p > 0.5, the model's label rule) against the mask.
    """
    import py_sod_metrics as sod

    if pred_u8.shape != gt_u8.shape:
        raise ValueError(f"prediction shape {pred_u8.shape} differs from ground truth {gt_u8.shape}")
    gray = dict(with_adaptive=False, with_dynamic=True)
    curves = sod.FmeasureV2(metric_handlers={"dice": sod.DICEHandler(**gray), "iou": sod.IOUHandler(**gray)})
    others = {"sm": sod.Smeasure(), "wfm": sod.WeightedFmeasure(), "em": sod.Emeasure(), "mae": sod.MAE()}
    curves.step(pred=pred_u8, gt=gt_u8)
    for metric in others.values():
        metric.step(pred=pred_u8, gt=gt_u8)
    res = curves.get_results()
    return {
        "mDice": float(res["dice"]["dynamic"].mean()),
        "mIoU": float(res["iou"]["dynamic"].mean()),
        "Dice@0.5": mask_dice(pred_u8 > 127, gt_u8 > 128),
        "Smeasure": float(others["sm"].get_results()["sm"]),
        "wFmeasure": float(others["wfm"].get_results()["wfm"]),
        "meanEm": float(others["em"].get_results()["em"]["curve"].mean()),
        "MAE": float(others["mae"].get_results()["mae"]),
    }


def volume_metrics(
    pred_kji: np.ndarray,
    gt_kji: np.ndarray,
    spacing_kji: Sequence[float],
    label_values: Sequence[int],
    tolerance_mm: float = 1.0,
) -> dict[int, dict[str, float]]:
    """Dice, HD95 (mm) and surface Dice per label value of two label maps of one volume.

    Args:
        pred_kji, gt_kji: integer label maps of equal shape (KJI, or any 2D/3D array).
        spacing_kji: voxel size in mm in the arrays' axis order.
        label_values: label values to score (e.g. ``[1, 2]``).
        tolerance_mm: surface Dice tolerance.

    Returns:
        ``{value: {"Dice": d, "HD95": mm, "SurfaceDice": s}}``.
    """
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    if pred_kji.shape != gt_kji.shape:
        raise ValueError(f"prediction shape {pred_kji.shape} differs from ground truth {gt_kji.shape}")
    if len(spacing_kji) != gt_kji.ndim:
        raise ValueError(f"spacing {tuple(spacing_kji)} does not have {gt_kji.ndim} entries")
    spacing = [float(s) for s in spacing_kji]
    results: dict[int, dict[str, float]] = {}
    for value in label_values:
        pred = pred_kji == value
        gt = gt_kji == value
        n_pred, n_gt = int(pred.sum()), int(gt.sum())
        if n_pred == 0 or n_gt == 0:
            both_empty = n_pred == 0 and n_gt == 0
            score = 1.0 if both_empty else 0.0
            results[int(value)] = {"Dice": score, "HD95": 0.0 if both_empty else float("nan"), "SurfaceDice": score}
            continue
        dice = mask_dice(pred, gt)
        # (B=1, C=1, *spatial) boolean tensors; MONAI ignores the background channel only
        # when include_background=False, so pass the foreground channel alone and keep it.
        pred_t = torch.from_numpy(pred)[None, None]
        gt_t = torch.from_numpy(gt)[None, None]
        with warnings.catch_warnings():  # MONAI 1.5+ warns about its own internal argument
            warnings.simplefilter("ignore", FutureWarning)
            hd95 = compute_hausdorff_distance(pred_t, gt_t, include_background=True, percentile=95, spacing=spacing)
            nsd = compute_surface_dice(pred_t, gt_t, [tolerance_mm], include_background=True, spacing=spacing)
        results[int(value)] = {"Dice": float(dice), "HD95": float(hd95.item()), "SurfaceDice": float(nsd.item())}
    return results
