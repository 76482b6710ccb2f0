"""``sam2unet-evaluate``: score predictions against ground truth, one row per case.

2D sets (PNG/JPEG masks, e.g. the polyp test sets): the official SAM2-UNet metrics
(threshold-averaged mDice/mIoU, Dice@0.5, S-measure, weighted F, mean E-measure, MAE); the
prediction is read as a grey map (0-255), as the official ``eval.py`` does. The paper's
numbers come from probability maps: use ``sam2unet-predict --save-probabilities`` and pass
its ``probabilities/`` folder as ``--pred`` (binary 0/255 masks score lower mDice).
Volumes (NIfTI, NRRD, MHA, DICOM, ... read by ``sam2unet_core.io``): per-class Dice, HD95
(mm) and surface Dice (MONAI), using the ground truth's voxel spacing.

Cases are paired by name without the file ending (``case_001.nii.gz`` <-> ``case_001.nii``,
``img1.jpg`` <-> ``img1.png``). Writes ``summary.json`` (cases, mean, settings) and
``metrics.csv`` (one row per case, then a ``mean`` row) to ``--out`` (default: ``--pred``).

Example::

    sam2unet-evaluate --pred results/Kvasir --gt TestDataset/Kvasir/masks
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from sam2unet_core.evaluation import evaluate_folders, write_evaluation
from sam2unet_core.metrics import IMAGE_METRIC_NAMES

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sam2unet-evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--pred", required=True, type=Path, help="folder of predictions")
    parser.add_argument("--gt", required=True, type=Path, help="folder of ground-truth masks or label maps")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: --pred)")
    parser.add_argument("--mode", choices=("auto", "2d", "volume"), default="auto",
                        help="2d: polyp-style image masks; volume: label maps; auto: from file endings")
    parser.add_argument("--labels", type=int, nargs="+", default=None,
                        help="label values to score in volumes (default: all found in the ground truth)")
    parser.add_argument("--tolerance-mm", type=float, default=1.0, help="surface Dice tolerance in mm")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = evaluate_folders(args.pred, args.gt, args.mode, args.labels, args.tolerance_mm)
    except (ValueError, FileNotFoundError) as err:
        print(f"sam2unet-evaluate: error: {err}", file=sys.stderr)
        return 1
    json_path, csv_path = write_evaluation(summary, args.out or args.pred)
    mean = summary["mean"]
    names = IMAGE_METRIC_NAMES if summary["mode"] == "2d" else [k for k in mean if k != "case"]
    print(f"{len(summary['cases'])} cases ({summary['mode']})")
    for name in names:
        print(f"  {name:<16} {mean[name]:.4f}")
    print(f"wrote {json_path} and {csv_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
