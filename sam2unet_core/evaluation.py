"""Score folders of predictions against ground truth, one row per case (the library
behind ``sam2unet-evaluate``).

2D sets (PNG/JPEG masks, e.g. the polyp test sets): the official SAM2-UNet metrics
(threshold-averaged mDice/mIoU, Dice@0.5, S-measure, weighted F, mean E-measure, MAE); the
prediction is read as a grey map (0-255), as the official ``eval.py`` does.
Volumes (NIfTI, NRRD, MHA, DICOM, ... read by ``sam2unet_core.io``): per-class Dice, HD95
(mm) and surface Dice (MONAI), using the ground truth's voxel spacing.

Cases are paired by name without the file ending (``case_001.nii.gz`` <-> ``case_001.nii``,
``img1.jpg`` <-> ``img1.png``). :func:`write_evaluation` writes ``summary.json`` (cases,
mean, settings) and ``metrics.csv`` (one row per case, then a ``mean`` row).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from sam2unet_core.io.atomic import atomic_write
from sam2unet_core.io.readers import PICTURE_SUFFIXES
from sam2unet_core.metrics import image_metrics, volume_metrics

__all__ = ["evaluate_folders", "write_evaluation"]

logger = logging.getLogger(__name__)


def _index(folder: Path) -> dict[str, Path]:
    """Case name -> file (or DICOM folder) for every image or volume in ``folder``."""
    from sam2unet_core.io.cases import find_cases

    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    return {case.name: case.path for case in find_cases(folder)}


def _read_gray(path: Path) -> np.ndarray:
    """``(H, W)`` uint8 grey values.

    Pictures: colour is converted with ITU-R 601 weights as cv2.IMREAD_GRAYSCALE does.
    Probability maps of ``sam2unet-predict --save-probabilities`` (one-slice volumes with
    values in [0, 1]) become ``round(255 * p)``, the grey maps the official test.py saves.
    """
    if path.name.lower().endswith(PICTURE_SUFFIXES):
        from PIL import Image

        with Image.open(path) as img:
            return np.asarray(img.convert("L"), dtype=np.uint8)
    from sam2unet_core.io.readers import read_volume

    array = read_volume(path).array_kji
    if array.ndim != 3 or array.shape[0] != 1 or array.min() < 0 or array.max() > 1:
        raise ValueError(f"{path}: expected a one-slice probability map in [0, 1], got shape {array.shape} "
                         f"and values {array.min()}..{array.max()}")
    return np.round(array[0] * 255).astype(np.uint8)


def _read_labels(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """Integer label array (KJI) and its spacing in the same (k, j, i) order."""
    from sam2unet_core.io.readers import read_volume

    volume = read_volume(path)
    if volume.num_channels != 1 or not np.allclose(volume.array_kji, np.round(volume.array_kji)):
        raise ValueError(f"{path} is not a label map (one channel of integer values expected)")
    return volume.array_kji.astype(np.int64), tuple(float(s) for s in volume.spacing_ijk[::-1])


def _evaluate_2d(pairs: list[tuple[str, Path, Path]]) -> list[dict[str, Any]]:
    rows = []
    for name, pred_path, gt_path in pairs:
        pred, gt = _read_gray(pred_path), _read_gray(gt_path)
        if pred.shape != gt.shape:
            raise ValueError(f"{pred_path} has size {pred.shape}, but {gt_path} has {gt.shape}; "
                             "resize predictions to the ground-truth size")
        rows.append({"case": name, **image_metrics(pred, gt)})
    return rows


def _evaluate_volumes(pairs: list[tuple[str, Path, Path]], labels: list[int] | None,
                      tolerance_mm: float) -> list[dict[str, Any]]:
    loaded = []
    for name, pred_path, gt_path in pairs:
        pred, _ = _read_labels(pred_path)
        gt, spacing_kji = _read_labels(gt_path)
        if pred.shape != gt.shape:
            raise ValueError(f"{pred_path} has shape {pred.shape}, but {gt_path} has {gt.shape}")
        loaded.append((name, pred, gt, spacing_kji))
    if labels is None:
        labels = sorted({int(v) for _, _, gt, _ in loaded for v in np.unique(gt) if v != 0})
        logger.info("scoring label values %s (found in the ground truth)", labels)
    rows = []
    for name, pred, gt, spacing_kji in loaded:
        scores = volume_metrics(pred, gt, spacing_kji, labels, tolerance_mm)
        row: dict[str, Any] = {"case": name}
        for value, metrics in scores.items():
            row.update({f"{metric}_{value}": score for metric, score in metrics.items()})
        row["Dice_mean"] = float(np.mean([m["Dice"] for m in scores.values()]))
        rows.append(row)
    return rows


def _mean_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    mean: dict[str, Any] = {"case": "mean"}
    for key in rows[0]:
        if key == "case":
            continue
        values = [r[key] for r in rows if not math.isnan(r[key])]
        mean[key] = float(np.mean(values)) if values else float("nan")
    return mean


def evaluate_folders(pred_dir: Path, gt_dir: Path, mode: str = "auto", labels: list[int] | None = None,
                     tolerance_mm: float = 1.0) -> dict[str, Any]:
    """Score every ground-truth case in ``gt_dir`` against ``pred_dir``.

    Returns ``{"mode", "cases": [row, ...], "mean": row, ...}``; a row maps metric names to
    floats (``NaN`` for an undefined HD95). Raises ``ValueError`` if a prediction is missing.
    """
    gt_files, pred_files = _index(gt_dir), _index(pred_dir)
    if not gt_files:
        raise ValueError(f"no images or volumes in {gt_dir}")
    missing = sorted(set(gt_files) - set(pred_files))
    if missing:
        raise ValueError(f"{len(missing)} cases of {gt_dir} have no prediction in {pred_dir}: {missing[:5]}")
    if mode == "auto":
        is_image = [p.name.lower().endswith(PICTURE_SUFFIXES) for p in gt_files.values()]
        mode = "2d" if all(is_image) else "volume"
    pairs = [(name, pred_files[name], gt_files[name]) for name in sorted(gt_files)]
    if mode == "2d":
        rows = _evaluate_2d(pairs)
    elif mode == "volume":
        rows = _evaluate_volumes(pairs, labels, tolerance_mm)
    else:
        raise ValueError(f"mode must be 'auto', '2d' or 'volume', got {mode!r}")
    return {
        "mode": mode,
        "pred": str(pred_dir),
        "gt": str(gt_dir),
        "tolerance_mm": tolerance_mm if mode == "volume" else None,
        "cases": rows,
        "mean": _mean_row(rows),
    }


def _json_safe(value: Any) -> Any:
    """NaN (undefined HD95) -> None, so that summary.json is strict JSON (null)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_evaluation(summary: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """``summary.json`` (NaN written as null) and ``metrics.csv`` (NaN as ``nan``), each
    written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / "summary.json", out_dir / "metrics.csv"
    rows = summary["cases"] + [summary["mean"]]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    summary_text = json.dumps(_json_safe(summary), indent=2, allow_nan=False)
    atomic_write(json_path, lambda tmp: tmp.write_text(summary_text))
    atomic_write(csv_path, lambda tmp: tmp.write_text(text.getvalue(), newline=""))  # csv's \r\n kept
    return json_path, csv_path
