"""``make demo``: train and test SAM2-UNet end to end on real MRI, offline, in minutes.

Data: the MNI152 brain tissue data set of ``benchmarks/brain_data.py`` (random variants of
nilearn's MNI152 2009 T1 template, labels 1 = grey matter, 2 = white matter), written as an
nnU-Net / Medical Segmentation Decathlon dataset. Then: train a small hiera_t SAM2-UNet
(``configs/demo_brain_cpu.yaml`` next to this script: without SAM 2 weights the whole
network from scratch with the recipe of ``training/README.md``; with ``--sam2 CHECKPOINT``
the paper's frozen SAM 2 trunk + adapters), run ``sam2unet-predict``'s library on the
held-out cases, score them with that of ``sam2unet-evaluate`` and write a PNG overlay per
case (image | ground truth | prediction, axial and coronal).

Run by path: ``python training/demo.py [--out demo_output] [key=value ...]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: benchmarks.brain_data
from benchmarks.brain_data import build_brain_dataset  # noqa: E402

__all__ = ["DEFAULT_CONFIG", "main", "write_overlay"]

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "demo_brain_cpu.yaml"


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _panel(grey: np.ndarray, labels: np.ndarray, colors: dict[int, tuple[int, int, int]]) -> np.ndarray:
    """``(H, W)`` float image and labels -> ``(H, W, 3)`` uint8 with 50% label colours."""
    low, high = np.percentile(grey, [1, 99])
    base = np.clip((grey - low) / max(high - low, 1e-6), 0, 1)[..., None].repeat(3, axis=2) * 255
    for value, color in colors.items():
        mask = labels == value
        base[mask] = 0.5 * base[mask] + 0.5 * np.asarray(color, dtype=np.float64)
    return base.astype(np.uint8)


def write_overlay(image_path: Path, truth_path: Path, pred_path: Path, colors: dict[int, tuple[int, int, int]],
                  out_path: Path, zoom: int = 3) -> Path:
    """PNG with rows axial / coronal and columns image | ground truth | prediction, through
    the slices with the most ground-truth foreground (radiological orientation)."""
    from PIL import Image, ImageDraw

    from sam2unet_core.io.orientation import plane_view
    from sam2unet_core.io.readers import read_volume

    image, truth, pred = (read_volume(p) for p in (image_path, truth_path, pred_path))
    rows = []
    for plane in ("axial", "coronal"):
        view = plane_view(image.direction_lps, plane)
        img, gt, pr = (view.to_plane(v.array_kji) for v in (image, truth, pred))
        index = int(np.argmax((gt > 0).reshape(gt.shape[0], -1).sum(axis=1)))
        tiles = [_panel(img[index], np.zeros_like(gt[index]), colors), _panel(img[index], gt[index], colors),
                 _panel(img[index], pr[index], colors)]
        rows.append(np.concatenate(tiles, axis=1))
    width = max(r.shape[1] for r in rows)
    canvas = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows], axis=0)
    picture = Image.fromarray(canvas).resize((canvas.shape[1] * zoom, canvas.shape[0] * zoom), Image.NEAREST)
    draw = ImageDraw.Draw(picture)
    tile = rows[0].shape[1] // 3 * zoom
    for n, title in enumerate(("image", "ground truth", "prediction")):
        draw.text((n * tile + 4, 4), title, fill=(255, 255, 0))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out_path)
    return out_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sam2unet-demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="training config")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    parser.add_argument("--train-cases", type=int, default=8, help="training cases (one held for validation)")
    parser.add_argument("--test-cases", type=int, default=3, help="held-out cases for prediction")
    parser.add_argument("--resolution-mm", type=int, default=2, help="voxel size of the demo volumes")
    parser.add_argument("--sam2", type=Path, default=None, metavar="CHECKPOINT",
                        help="SAM 2 / 2.1 hiera_tiny checkpoint (sam2.1_hiera_tiny.pt): train adapters and decoder "
                             "on its frozen trunk (the paper) instead of the whole network from scratch")
    parser.add_argument("overrides", nargs="*", help="training config overrides, section.key=value")
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from sam2unet_core.checkpoint import load_model
    from sam2unet_core.device import resolve_device
    from sam2unet_core.evaluation import evaluate_folders, write_evaluation
    from sam2unet_core.inference import Predictor
    from sam2unet_core.inference.batch import PredictOptions, predict_from_files
    from sam2unet_core.train.config import load_config
    from sam2unet_core.train.trainer import train

    if args.sam2 is not None and not args.sam2.is_file():
        print(f"--sam2 {args.sam2}: no such file", file=sys.stderr)
        return 2
    started = time.monotonic()
    out = args.out.resolve()
    device = resolve_device(args.device)
    data_root = out / "Dataset001_MNIBrain"
    _say(f"[1/5] building {args.train_cases} training + {args.test_cases} held-out cases from nilearn's MNI152 "
         f"template in {data_root}")
    build_brain_dataset(data_root, args.train_cases, args.test_cases, resolution_mm=args.resolution_mm, on_case=_say)

    overrides = [f"data.root={data_root}", f"run.output={out / 'model'}", f"run.device={device}"]
    if args.sam2 is not None:
        # the paper's recipe: SAM 2's weights keep SAM 2's attention windows and the paper's head
        overrides += [f"model.sam2_checkpoint={args.sam2.resolve()}", "model.window_spec=[]",
                      "model.full_res_channels=0"]
    if device.type == "cuda":  # a wall-clock box instead of the CPU one (a GPU process spins on the CPU)
        overrides += ["run.max_cpu_minutes=0", "run.max_minutes=10", "data.samples_per_epoch=1280"]
    config = load_config(args.config, overrides + args.overrides)
    trunk = "frozen SAM 2 trunk + adapters" if config.model.sam2_checkpoint else "from scratch"
    _say(f"[2/5] training a {config.model.backbone} SAM2-UNet ({trunk}) on {device}: time box "
         f"{config.run.max_cpu_minutes or 'no'} CPU minutes, {config.run.max_minutes or 'no'} wall minutes")
    result = train(config, resume=False)
    model_path = result.output / "best.safetensors"
    _say(f"      best validation Dice {result.best_dice:.4f} (epoch {result.best_epoch}); model {model_path}")

    pred_dir = out / "predictions"
    _say(f"[3/5] predicting the held-out cases (predict_from_files) -> {pred_dir}")
    predictor = Predictor(load_model(model_path), device=device)
    run = predict_from_files(predictor, data_root / "imagesTs", pred_dir, PredictOptions(overwrite=True))
    failed = [case for case in run.cases if case.status == "failed"]
    if failed:
        print(f"prediction failed: {failed[0].case}: {failed[0].error}", file=sys.stderr)
        return 1

    _say("[4/5] scoring the held-out predictions (sam2unet_core.evaluation, as sam2unet-evaluate)")
    summary = evaluate_folders(pred_dir, data_root / "labelsTs", labels=[1, 2])
    write_evaluation(summary, out / "evaluation")
    print(f"      Dice per held-out case\n      {'case':<12} {'grey matter':>12} {'white matter':>13}")
    for row in summary["cases"] + [summary["mean"]]:
        print(f"      {row['case']:<12} {row['Dice_1']:>12.4f} {row['Dice_2']:>13.4f}")

    _say("[5/5] overlays")
    from sam2unet_core import read_metadata

    colors = {label.value: label.color for label in read_metadata(model_path).labels}
    for row in summary["cases"]:
        case = row["case"]
        path = write_overlay(data_root / "imagesTs" / f"{case}_0000.nii.gz", data_root / "labelsTs" / f"{case}.nii.gz",
                             pred_dir / f"{case}.nii.gz", colors, out / f"overlay_{case}.png")
        print(f"      {path}")
    _say(f"done in {(time.monotonic() - started) / 60:.1f} min: mean Dice grey matter {summary['mean']['Dice_1']:.3f}, "
         f"white matter {summary['mean']['Dice_2']:.3f}; label maps in {pred_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
