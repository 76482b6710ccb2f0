"""Segmentation quality over the training budget: SAM2-UNet (our trainer, a config of
``training/configs``) beside MONAI's ``BasicUNet`` (a small and the default width), trained
one after the other in one run on the ``make demo`` data (``benchmarks.brain_data``: MNI152
variants, grey and white matter), the same split, the same slices, augmentation, loss,
optimiser and schedule, then scored with ``sam2unet_core.evaluation`` (``sam2unet-evaluate``)
on the same held-out cases.

A learning curve, not one point: each model is trained at several budgets in **optimiser
steps** (``--steps`` for SAM2-UNet, ``--cnn-steps`` for the CNNs, paired in order). A
budget in steps is the same on every machine: a CPU-time box gives a fast CPU more steps
than a slow one, so a budget of N steps stands for a machine that fits N steps into the
recipe's box (on a 2-core AVX2 AMD EPYC, 1 thread, the demo's 8 CPU minutes hold about 260
SAM2-UNet steps). Each budget is its own training run: the recipe's learning rate anneals
over its box (``optim.schedule: budget``), so a short run is not a snapshot of a long one.
The box replaces the config's CPU and wall-clock limits; a SAM2-UNet recipe's own step
limit (``run.max_steps``) still applies, as it would on a machine that fits more steps.
The first seed of ``--seeds`` trains at every budget, the others at the middle budget only:
their spread is the run-to-run noise against which differences are read. The process CPU
minutes each run took are printed beside its steps (wall-clock seconds too, labelled as
such: on a shared machine the wall clock measures the neighbours).

A model trained on several planes (``data.planes``) is scored twice:
predicting along its first plane alone (``/axial``) and fusing its planes (``/fused``, the
mean of their class probabilities). ``sam2unet-1plane`` and ``sam2unet-3planes`` are the
recipe forced to the axial plane and to all three planes.

Prints a table (Dice per class, HD95, the between-slice consistency, steps done, training
CPU minutes, inference CPU seconds per axial slice, parameters) and the seed spread at the
middle budget, and writes them as JSON under ``benchmarks/results/`` (after every run, so
an interrupted benchmark keeps what it measured). The consistency is the mean absolute
change of each class's area (voxels) from one axial slice to the next, as a ratio to the
ground truth's (1.0: as smooth as the truth; above: masks that jump between slices)::

    python benchmarks/bench_quality.py                       # the demo's recipe and the CNNs
    python benchmarks/bench_quality.py --models sam2unet --steps 300 --seeds 0 optim.warmup_steps=0  # one trial
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

__all__ = ["main", "CNN_WIDTHS", "train_cnn", "predict_cases", "evaluate_predictions", "seed_spread"]

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
SCORES = ("Dice_1", "Dice_2", "HD95_1", "HD95_2")


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train_cnn(config: Any, features: tuple[int, ...]) -> dict[str, Any]:
    """Train a 2D ``BasicUNet`` with the SAM2-UNet trainer's data, loss, optimiser, learning
    rate rule and time box (``config`` is a ``TrainConfig``); keep the weights of the epoch
    with the best validation Dice. Returns the model (eval mode) and run figures."""
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
                           config.run.max_cpu_minutes, config.run.max_minutes, step, config.run.max_steps)

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
            "val_dice": best_dice, "history": history, "in_channels": data.in_channels,
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


def _run_model(name: str, budget: int, seed: int, args: argparse.Namespace, data_root: Path,
               work: Path) -> dict[str, dict[str, Any]]:
    """Train ``name`` with a box of ``budget`` optimiser steps and ``seed``, and score it: one
    table row, or one per way of predicting."""
    from sam2unet_core.inference.engine import Predictor
    from sam2unet_core.inference.torch_runner import TorchRunner
    from sam2unet_core.train.config import load_config

    run_name = f"{name}-{budget}steps-seed{seed}"
    setup = [f"data.root={data_root}", "run.device=cpu", "data.num_workers=0", f"run.seed={seed}",
             f"run.output={work / run_name / 'model'}"]
    images = sorted((data_root / "imagesTs").glob("*_0000.nii.gz"))
    if name.startswith("sam2unet"):
        from sam2unet_core import load_model
        from sam2unet_core.train.trainer import train

        planes = [PLANE_VARIANTS[name]] if name in PLANE_VARIANTS else []
        config = load_config(args.config, args.overrides + planes + setup)
        own_limit = config.run.max_steps  # the recipe's step limit holds on any machine
        config.run.max_steps = min(budget, own_limit) if own_limit else budget
    else:
        config = load_config(args.config, args.cnn_set + setup)
        config.run.max_steps = budget
    config.run.max_cpu_minutes = config.run.max_minutes = 0.0  # the box is the steps
    LOGGER.info("training %s: %d steps at most, seed %d", name, config.run.max_steps, seed)
    cpu_start, wall_start = time.process_time(), time.monotonic()
    if name.startswith("sam2unet"):
        result = train(config, resume=False)
        model = load_model(result.output / "best.safetensors", device="cpu")
        history = json.loads(json.dumps(model.metadata.provenance.get("history", [])))
        row = {"steps": result.steps, "epochs": result.epochs_done, "best_epoch": result.best_epoch,
               "val_dice": result.best_dice, "history": history}
        predictor = Predictor(model, device="cpu", batch_size=8)
    else:
        from sam2unet_core.metadata import Architecture, ModelMetadata, default_labels

        run = train_cnn(config, CNN_WIDTHS[name])
        model = run.pop("model")
        meta = ModelMetadata(architecture=Architecture("hiera_t", run.pop("num_classes"), run.pop("in_channels")),
                             labels=default_labels(3, ["grey_matter", "white_matter"]),
                             **config.data.preprocessing())
        row = run
        predictor = Predictor(TorchRunner(model, metadata=meta, device="cpu"), batch_size=8)
    row.update(model=name, budget_steps=budget, seed=seed, cpu_s=time.process_time() - cpu_start,
               wall_s=time.monotonic() - wall_start, parameters=_parameters(model), config=config.to_dict())
    trained = predictor.metadata.trained_planes
    ways = {name: trained} if len(trained) == 1 else {f"{name}/axial": ("axial",), f"{name}/fused": trained}
    rows = {}
    for label, planes in ways.items():
        scored = dict(row, label=label, planes=list(planes))
        folder = work / run_name / label.split("/")[-1] if "/" in label else work / run_name
        scored.update(predict_cases(predictor, images, folder / "predictions", planes, args.tta))
        scored.update(evaluate_predictions(folder / "predictions", data_root / "labelsTs", folder / "evaluation"))
        LOGGER.info("%s: %s", label, {k: v for k, v in scored.items() if k not in ("history", "config")})
        rows[f"{label} {budget} steps seed {seed}"] = scored
    return rows


def _table(rows: dict[str, dict[str, Any]]) -> str:
    head = (f"{'model':<24} {'budget':>6} {'seed':>4} {'steps':>6} {'CPU min':>7} {'wall s*':>7} "
            f"{'Dice GM':>8} {'Dice WM':>8} {'HD95 GM':>8} {'HD95 WM':>8} {'jump GM':>8} {'jump WM':>8} "
            f"{'infer CPU s/slice':>17} {'params':>10}")
    lines = [head, "-" * len(head)]
    for r in rows.values():
        lines.append(f"{r['label']:<24} {r['budget_steps']:>6d} {r['seed']:>4d} {r['steps']:>6d} "
                     f"{r['cpu_s'] / 60:>7.1f} {r['wall_s']:>7.0f} {r['Dice_1']:>8.4f} {r['Dice_2']:>8.4f} "
                     f"{r['HD95_1']:>8.2f} {r['HD95_2']:>8.2f} {r['slice_change_1']:>8.2f} "
                     f"{r['slice_change_2']:>8.2f} {r['infer_cpu_s_per_slice']:>17.4f} {r['parameters'] / 1e6:>9.2f}M")
    return "\n".join(lines)


def seed_spread(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per model (table label) and budget trained with more than one seed: the mean and the
    range (max - min) of each score over the seeds."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows.values():
        groups.setdefault((r["label"], r["budget_steps"]), []).append(r)
    spread = {}
    for (label, budget), runs in groups.items():
        if len(runs) > 1:
            spread[f"{label} {budget} steps"] = {
                "seeds": [r["seed"] for r in runs],
                **{f"{key}_mean": float(np.mean([r[key] for r in runs])) for key in SCORES},
                **{f"{key}_range": float(np.ptp([r[key] for r in runs])) for key in SCORES}}
    return spread


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="SAM2-UNet training config")
    parser.add_argument("--models", nargs="+", default=["sam2unet", *CNN_WIDTHS], choices=MODELS)
    parser.add_argument("--steps", nargs="+", type=int, default=[150, 300, 600],
                        help="SAM2-UNet budgets in optimiser steps (8 CPU minutes on a 2-core AVX2 EPYC, "
                             "1 thread: about 260)")
    parser.add_argument("--cnn-steps", nargs="+", type=int, default=[450, 900, 1800],
                        help="the CNNs' budgets, paired in order with --steps (a small CNN's step costs "
                             "about a third of SAM2-UNet's CPU time)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                        help="the first at every budget, the others at the middle budget only")
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
    parser = build_parser()
    args = parser.parse_args(argv)
    uses_cnn = any(name in CNN_WIDTHS for name in args.models)
    if uses_cnn and len(args.cnn_steps) != len(args.steps):
        parser.error(f"--cnn-steps needs one budget per --steps budget ({len(args.steps)}), got {args.cnn_steps}")
    if min(args.steps + args.cnn_steps) < 1:
        parser.error("budgets must be at least 1 step")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    work = args.work.resolve()
    data_root = work / f"Dataset001_MNIBrain_{args.resolution_mm}mm_{args.train_cases}_{args.test_cases}"
    if not (data_root / "dataset.json").exists():
        build_brain_dataset(data_root, args.train_cases, args.test_cases, resolution_mm=args.resolution_mm)
    middle = len(args.steps) // 2
    plan = [(name, index, seed) for name in args.models for seed in args.seeds
            for index in range(len(args.steps)) if seed == args.seeds[0] or index == middle]
    machine = (f"{_cpu_name()} ({platform.machine()}), {os.cpu_count()} cores, "
               f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}, {args.threads} torch threads")
    path = args.json or RESULTS / f"quality_{datetime.date.today().isoformat()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, Any]] = {}
    for name, index, seed in plan:
        budget = (args.cnn_steps if name in CNN_WIDTHS else args.steps)[index]
        rows.update(_run_model(name, budget, seed, args, data_root, work))
        report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "command": "python benchmarks/bench_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  "machine": f"{machine}; load average {os.getloadavg()[0]:.1f}", "tta": args.tta,
                  "resolution_mm": args.resolution_mm, "train_cases": args.train_cases, "test_cases": args.test_cases,
                  "models": rows, "seed_spread": seed_spread(rows)}
        path.write_text(json.dumps(report, indent=2, default=float))
    print(f"\nMNI152 demo data at {args.resolution_mm} mm, {args.train_cases} training (one validates) and "
          f"{args.test_cases} held-out cases (variants of one template brain); budgets in optimiser steps; "
          f"{'prediction averaged over flips (--tta); ' if args.tta else ''}{machine}")
    print(_table(rows))
    print("* wall-clock seconds on a shared machine: other processes' load is in them; compare CPU minutes")
    print("jump: mean change of a class's area from one axial slice to the next, over the ground truth's")
    for key, spread in seed_spread(rows).items():
        print(f"seeds {spread['seeds']} at {key}: " + ", ".join(
            f"{score} {spread[score + '_mean']:.4f} (range {spread[score + '_range']:.4f})" for score in SCORES))
    print(f"results: {path}")
    return 0


def _cpu_name() -> str:
    """The CPU's model name (Linux), or the platform's processor string."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    raise SystemExit(main())
