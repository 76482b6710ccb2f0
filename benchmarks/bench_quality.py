"""Segmentation quality at an equal training budget: SAM2-UNet (our trainer, a config of
``training/configs``) beside MONAI's ``BasicUNet`` (a small and the default width), trained
one after the other in one run on the ``make demo`` data (``benchmarks.brain_data``: MNI152
variants, grey and white matter), the same split, the same slices, augmentation, loss,
optimiser and schedule, then scored with ``sam2unet_core.evaluation`` (``sam2unet-evaluate``) on the same held-out cases.

The budget is **process CPU time** (``time.process_time`` of this process: training steps,
data preparation and the per-epoch validation), not wall time: on a shared machine the
wall clock measures the neighbours. ``--cpu-minutes 8`` is 4 minutes on 2 free cores.
Wall-clock figures are printed too, labelled as such.

A model trained on several planes (``data.planes``) is scored twice:
predicting along its first plane alone (``/axial``) and fusing its planes (``/fused``, the
mean of their class probabilities). ``sam2unet-1plane`` and ``sam2unet-3planes`` are the
recipe forced to the axial plane and to all three planes.

Prints a table (Dice per class, HD95, the between-slice consistency, steps done, inference
CPU and wall seconds per axial slice, parameters) and writes it as JSON under
``benchmarks/results/``. The consistency is the mean absolute change of each class's area
(voxels) from one axial slice to the next, as a ratio to the ground truth's (1.0: as smooth
as the truth; above: masks that jump between slices)::

    python benchmarks/bench_quality.py                       # the demo's recipe, 2 mm, 8 CPU-min
    python benchmarks/bench_quality.py --models sam2unet optim.warmup_steps=0   # one trial
    python benchmarks/bench_quality.py --models sam2unet-1plane sam2unet-3planes   # planes

``key=value`` arguments override the SAM2-UNet config; ``--cnn-set key=value`` the CNNs'
(by default the same config: same input size, 2.5D context, batch, optimiser, schedule).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.brain_data import DEMO_CONFIG as DEFAULT_CONFIG, build_brain_dataset  # noqa: E402

__all__ = ["main", "CNN_WIDTHS", "train_cnn", "predict_cases", "evaluate_predictions"]

LOGGER = logging.getLogger("bench_quality")
RESULTS = Path(__file__).resolve().parent / "results"
CNN_WIDTHS = {  # MONAI BasicUNet ``features``: 5 encoder levels + the last decoder level
    "basicunet-small": (16, 16, 32, 64, 128, 16),
    "basicunet": (32, 32, 64, 128, 256, 32),  # MONAI's default
}
PLANE_VARIANTS = {  # the recipe with its planes forced
    "sam2unet-1plane": "data.planes=[]",
    "sam2unet-3planes": "data.planes=[axial,coronal,sagittal]",
}
MODELS = ("sam2unet", *PLANE_VARIANTS, *CNN_WIDTHS)


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train_cnn(config: Any, features: tuple[int, ...]) -> dict[str, Any]:
    """Train a 2D ``BasicUNet`` with the SAM2-UNet trainer's data, loss, optimiser, learning
    rate rule and CPU time box (``config`` is a ``TrainConfig``); keep the weights of the
    epoch with the best validation Dice. Returns the model (eval mode) and run figures."""
    from monai.networks.nets import BasicUNet
    from torch.utils.data import DataLoader, DistributedSampler

    from sam2unet_core.train.losses import DeepSupervisionLoss
    from sam2unet_core.train.pipeline import build_training_data
    from sam2unet_core.train.schedule import budget_used, lr_factor
    from sam2unet_core.train.trainer import make_optimizer, validate

    torch.manual_seed(config.run.seed)
    data = build_training_data(config)
    model = BasicUNet(spatial_dims=2, in_channels=data.in_channels, out_channels=data.num_classes,
                      features=features)
    optim = config.optim
    optimizer = make_optimizer(list(model.parameters()), optim, torch.device("cpu"))
    loss_fn = DeepSupervisionLoss(data.num_classes)
    sampler = DistributedSampler(data.train, num_replicas=1, rank=0, shuffle=True, seed=config.run.seed)
    val_loader = DataLoader(data.val, batch_size=config.run.val_batch_size)
    started, cpu_started = time.monotonic(), time.process_time()

    def box_used() -> float:
        return budget_used(time.process_time() - cpu_started, time.monotonic() - started,
                           config.run.max_cpu_minutes, config.run.max_minutes)

    step, best_dice, best_state, best_epoch, history, timed_out = 0, -1.0, None, 0, [], False
    for epoch in range(optim.epochs):
        data.train.set_epoch(epoch)
        sampler.set_epoch(epoch)
        generator = torch.Generator().manual_seed(config.run.seed * 100_003 + epoch)
        loader = DataLoader(data.train, batch_size=optim.batch_size, sampler=list(sampler),
                            drop_last=len(sampler) >= optim.batch_size, generator=generator)
        model.train()
        for sample in loader:
            for group in optimizer.param_groups:
                group["lr"] = optim.lr * lr_factor(optim, step, epoch, box_used())
            loss = loss_fn(model(sample["image"]), sample["label"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            timed_out = box_used() >= 1.0
            if timed_out:
                break
        scores = validate(model, val_loader, data.num_classes, torch.device("cpu"), None)
        history.append({"epoch": epoch + 1, "val_dice": scores.mean(), "step": step})
        if scores.mean() > best_dice:
            best_dice, best_epoch = scores.mean(), epoch + 1
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        if timed_out:
            break
    model.load_state_dict(best_state)
    return {"model": model.eval(), "steps": step, "epochs": len(history), "best_epoch": best_epoch,
            "val_dice": best_dice, "cpu_s": time.process_time() - cpu_started,
            "wall_s": time.monotonic() - started, "history": history, "in_channels": data.in_channels,
            "num_classes": data.num_classes}


def predict_cases(predictor: Any, images: list[Path], out: Path, planes: tuple[str, ...],
                  tta: bool) -> dict[str, float]:
    """Segment every held-out case into ``out`` along ``planes`` (several: fused; ``tta``:
    averaged over flips, as ``sam2unet-predict --tta``); CPU and wall seconds per slice of
    the first plane (a case's whole cost divided by those slices)."""
    from sam2unet_core.io.orientation import plane_view
    from sam2unet_core.io.readers import read_volume, split_suffix
    from sam2unet_core.io.writers import write_labels

    out.mkdir(parents=True, exist_ok=True)
    cpu = wall = 0.0
    slices = 0
    for path in images:
        volume = read_volume(path)
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        labels = predictor.predict(volume, planes=planes, tta=tta).labels
        cpu += time.process_time() - cpu_start
        wall += time.perf_counter() - wall_start
        slices += plane_view(volume.direction_lps, planes[0]).to_plane(volume.array_kji).shape[0]
        case = split_suffix(path)[0].removesuffix("_0000")
        write_labels(labels, out / f"{case}.nii.gz")
    return {"infer_cpu_s_per_slice": cpu / slices, "infer_wall_s_per_slice": wall / slices}


def slice_area_change(labels: Any, value: int, plane: str = "axial") -> float:
    """Mean absolute change of the area (voxels) of ``value`` from one ``plane`` slice to the
    next, for a label :class:`Volume`."""
    from sam2unet_core.io.orientation import plane_view

    stack = plane_view(labels.direction_lps, plane).to_plane(labels.array_kji) == value
    areas = stack.reshape(stack.shape[0], -1).sum(axis=1)
    return float(np.abs(np.diff(areas)).mean())


def evaluate_predictions(pred: Path, truth: Path, out: Path) -> dict[str, float]:
    """Score the label maps in ``pred`` against ``truth`` (grey and white matter) into ``out``;
    mean Dice and HD95 per class, and the between-slice consistency per class
    (``slice_change_<c>``: :func:`slice_area_change` of the prediction over the truth's,
    averaged over the cases)."""
    from sam2unet_core.evaluation import evaluate_folders, write_evaluation
    from sam2unet_core.io.readers import read_volume

    summary = evaluate_folders(pred, truth, labels=[1, 2])
    write_evaluation(summary, out)
    scores = {key: float(summary["mean"][key]) for key in ("Dice_1", "Dice_2", "HD95_1", "HD95_2")}
    for value in (1, 2):
        ratios = [slice_area_change(read_volume(p), value) / slice_area_change(read_volume(truth / p.name), value)
                  for p in sorted(pred.glob("*.nii.gz"))]
        scores[f"slice_change_{value}"] = float(np.mean(ratios))
    return scores


def _run_model(name: str, args: argparse.Namespace, data_root: Path, work: Path) -> dict[str, dict[str, Any]]:
    """Train ``name`` and score it: one table row, or one per way of predicting."""
    from sam2unet_core.inference.engine import Predictor
    from sam2unet_core.inference.torch_runner import TorchRunner
    from sam2unet_core.train.config import load_config

    budget = [f"data.root={data_root}", "run.device=cpu", f"run.max_cpu_minutes={args.cpu_minutes}",
              "run.max_minutes=0", "data.num_workers=0", f"run.output={work / name / 'model'}"]
    images = sorted((data_root / "imagesTs").glob("*_0000.nii.gz"))
    LOGGER.info("training %s for %.1f CPU minutes", name, args.cpu_minutes)
    if name.startswith("sam2unet"):
        from sam2unet_core import load_model
        from sam2unet_core.train.trainer import train

        planes = [PLANE_VARIANTS[name]] if name in PLANE_VARIANTS else []
        config = load_config(args.config, args.overrides + planes + budget)
        cpu_start, wall_start = time.process_time(), time.monotonic()
        result = train(config, resume=False)
        model = load_model(result.output / "best.safetensors", device="cpu")
        history = json.loads(json.dumps(model.metadata.provenance.get("history", [])))
        row = {"steps": result.steps, "epochs": result.epochs_done, "best_epoch": result.best_epoch,
               "val_dice": result.best_dice, "cpu_s": time.process_time() - cpu_start,
               "wall_s": time.monotonic() - wall_start, "parameters": _parameters(model), "history": history}
        predictor = Predictor(model, device="cpu", batch_size=8)
    else:
        from sam2unet_core.metadata import Architecture, ModelMetadata, default_labels

        config = load_config(args.config, args.cnn_set + budget)
        run = train_cnn(config, CNN_WIDTHS[name])
        model = run.pop("model")
        meta = ModelMetadata(architecture=Architecture("hiera_t", run.pop("num_classes"), run.pop("in_channels")),
                             labels=default_labels(3, ["grey_matter", "white_matter"]),
                             **config.data.preprocessing())
        row = {**run, "parameters": _parameters(model)}
        predictor = Predictor(TorchRunner(model, metadata=meta, device="cpu"), batch_size=8)
    row["config"] = config.to_dict()
    trained = predictor.metadata.trained_planes
    ways = {name: trained} if len(trained) == 1 else {f"{name}/axial": ("axial",), f"{name}/fused": trained}
    rows = {}
    for label, planes in ways.items():
        scored = dict(row, planes=list(planes))
        folder = work / label.replace("/", "-")
        scored.update(predict_cases(predictor, images, folder / "predictions", planes, args.tta))
        scored.update(evaluate_predictions(folder / "predictions", data_root / "labelsTs", folder / "evaluation"))
        LOGGER.info("%s: %s", label, {k: v for k, v in scored.items() if k not in ("history", "config")})
        rows[label] = scored
    return rows


def _table(rows: dict[str, dict[str, Any]]) -> str:
    head = (f"{'model':<24} {'Dice GM':>8} {'Dice WM':>8} {'HD95 GM':>8} {'HD95 WM':>8} {'jump GM':>8} "
            f"{'jump WM':>8} {'steps':>6} {'train CPU s':>11} {'wall s*':>8} {'infer CPU s/slice':>17} "
            f"{'wall s/slice*':>13} {'params':>10}")
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        lines.append(f"{name:<24} {r['Dice_1']:>8.4f} {r['Dice_2']:>8.4f} {r['HD95_1']:>8.2f} {r['HD95_2']:>8.2f} "
                     f"{r['slice_change_1']:>8.2f} {r['slice_change_2']:>8.2f} "
                     f"{r['steps']:>6d} {r['cpu_s']:>11.0f} {r['wall_s']:>8.0f} {r['infer_cpu_s_per_slice']:>17.4f} "
                     f"{r['infer_wall_s_per_slice']:>13.4f} {r['parameters'] / 1e6:>9.2f}M")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="SAM2-UNet training config")
    parser.add_argument("--models", nargs="+", default=["sam2unet", *CNN_WIDTHS], choices=MODELS)
    parser.add_argument("--cpu-minutes", type=float, default=8.0,
                        help="training budget per model in process CPU minutes (8 = 4 minutes on 2 free cores)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: no thread spin-waiting in the CPU time of a busy machine)")
    parser.add_argument("--resolution-mm", type=int, default=2, help="voxel size of the demo volumes")
    parser.add_argument("--train-cases", type=int, default=8, help="training cases (one validates)")
    parser.add_argument("--test-cases", type=int, default=3, help="held-out cases")
    parser.add_argument("--tta", action="store_true",
                        help="predict every model with flip test-time augmentation (3 passes per slice)")
    parser.add_argument("--work", type=Path, default=Path("bench_quality_runs"), help="data, models, predictions")
    parser.add_argument("--cnn-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for the BasicUNets only")
    parser.add_argument("--json", type=Path, default=None,
                        help="result file (default benchmarks/results/quality_<date>.json)")
    parser.add_argument("overrides", nargs="*", help="SAM2-UNet config overrides, section.key=value")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    work = args.work.resolve()
    data_root = work / f"Dataset001_MNIBrain_{args.resolution_mm}mm_{args.train_cases}_{args.test_cases}"
    if not (data_root / "dataset.json").exists():
        build_brain_dataset(data_root, args.train_cases, args.test_cases, resolution_mm=args.resolution_mm)
    rows = {label: row for name in args.models for label, row in _run_model(name, args, data_root, work).items()}
    machine = (f"CPU {platform.machine()}, {os.cpu_count()} cores, {args.threads} torch threads; "
               f"load average {os.getloadavg()[0]:.1f} at the end")
    print(f"\nMNI152 demo data at {args.resolution_mm} mm, {args.train_cases} training (one validates) and "
          f"{args.test_cases} held-out cases; {args.cpu_minutes:g} CPU minutes of training each "
          f"(process CPU time); {'prediction averaged over flips (--tta); ' if args.tta else ''}{machine}")
    print(_table(rows))
    print("* wall-clock seconds on a shared machine: other processes' load is in them; compare CPU seconds")
    print("jump: mean change of a class's area from one axial slice to the next, over the ground truth's")
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python benchmarks/bench_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine, "budget_cpu_minutes": args.cpu_minutes, "tta": args.tta,
              "resolution_mm": args.resolution_mm, "train_cases": args.train_cases, "test_cases": args.test_cases,
              "models": rows}
    path = args.json or RESULTS / f"quality_{datetime.date.today().isoformat()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=float))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
