"""The training loop: AdamW + warm-up and cosine schedule, deep-supervised loss, validation Dice every
epoch, best/last checkpoints in our format, exact resume, TensorBoard, DDP via torchrun.

Output folder (``run.output``):
    ``best.safetensors`` / ``last.safetensors``: models with metadata (labels,
    preprocessing, provenance: config, epoch, validation Dice), loadable by
    ``sam2unet_core.load_model`` and ``sam2unet-predict``;
    ``resume.pt``: the exact resume state (see :mod:`.resume`), written each epoch and every
    ``run.resume_every_steps`` steps / ``run.resume_every_minutes`` minutes;
    ``train_config.json``: the resolved config; ``tensorboard/``: scalar logs.

Reproducibility: the batches of epoch e are a function of (seed, e) only (seeded sampler and
per-sample seeded augmentation), so a resumed run skips the batches already trained and
continues with identical data, weights, optimiser and schedule.

Distributed: started with ``torchrun --nproc_per_node N``, every process trains on its
``DistributedSampler`` share (``optim.batch_size`` per process); rank 0 validates, logs and
saves. CUDA uses NCCL, CPU uses gloo.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from sam2unet_core import __version__, build_model, save_model
from sam2unet_core.device import autocast_dtype, resolve_device
from sam2unet_core.metadata import Architecture, ModelMetadata, default_labels
from sam2unet_core.metrics import DiceAccumulator

from .config import OptimConfig, TrainConfig
from .losses import DeepSupervisionLoss
from .pipeline import TrainingData, build_training_data
from .resume import capture_rng, load_resume_state, restore_rng, save_resume_state

__all__ = ["train", "TrainResult", "RESUME_FILE", "lr_factor", "budget_used", "make_optimizer"]

logger = logging.getLogger(__name__)

RESUME_FILE = "resume.pt"
COMPARED_SECTIONS = ("data", "augment", "model", "optim")  # must match to resume a run


@dataclass
class TrainResult:
    output: Path
    best_dice: float
    best_epoch: int
    epochs_done: int
    stopped_early: bool  # run.stop_after_steps ended the run
    steps: int = 0  # optimiser steps, all runs of this training
    cpu_seconds: float = 0.0  # process CPU time of the training, all runs (the run.max_cpu_minutes clock)


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(requested_device: str) -> tuple[_Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return _Dist(), resolve_device(requested_device)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size()), device


def _agree(d: _Dist, flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every process (a time limit must stop all ranks together)."""
    if d.world == 1:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())


def _barrier(d: _Dist) -> None:
    if d.world > 1:
        dist.barrier()


def _metadata(config: TrainConfig, data: TrainingData) -> ModelMetadata:
    pretrained = bool(config.model.sam2_checkpoint)
    arch = Architecture(config.model.backbone, data.num_classes, data.in_channels, freeze_encoder=pretrained,
                        window_spec=list(config.model.window_spec),
                        full_res_channels=config.model.full_res_channels)
    meta = ModelMetadata(
        architecture=arch,
        labels=default_labels(data.num_classes, data.label_names, config.model.label_terms),
        **config.data.preprocessing(),  # the plane trained on included
    )
    meta.validate()
    return meta


def _check_same_run(saved_json: str, config: TrainConfig, path: Path) -> None:
    saved, now = json.loads(saved_json), config.to_dict()
    differ = [s for s in COMPARED_SECTIONS if saved.get(s) != now[s]]
    if differ:
        raise ValueError(f"{path} belongs to a run with other {differ} settings; give a new run.output "
                         "or start over without resuming")


def _epoch_indices(sampler: DistributedSampler, epoch: int, skip_batches: int, batch_size: int) -> list[int]:
    sampler.set_epoch(epoch)
    return list(sampler)[skip_batches * batch_size:]


def _multiscale(images: torch.Tensor, labels: torch.Tensor, scales: list[float], seed: int, epoch: int,
                step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize a batch to a seeded choice of ``scales`` times its size (multiples of 32)."""
    scale = scales[int(np.random.default_rng([seed, epoch, step, 7]).integers(len(scales)))]
    side = max(32, int(round(images.shape[-1] * scale / 32)) * 32)
    if side == images.shape[-1]:
        return images, labels
    images = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)
    return images, F.interpolate(labels, size=(side, side), mode="nearest")


def make_optimizer(params: list[torch.nn.Parameter], optim: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with ``optim.lr`` and ``optim.weight_decay``; PyTorch's fused kernel on CPU and
    CUDA (one pass over all parameters: on one core of our 2-core CPU it cuts the step of
    Hiera-T's 29M parameters from 0.17 to 0.06 s), the per-parameter loop elsewhere."""
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay, fused=fused)


def lr_factor(optim: OptimConfig, step: int, epoch: int, budget: float) -> float:
    """Learning rate / ``optim.lr`` for optimiser step ``step`` (0-based, counted over all
    runs of a resumed training) in epoch ``epoch`` (0-based).

    Cosine from 1 to ``min_lr / lr``: with ``optim.schedule == "epochs"`` over the epochs,
    constant within an epoch (torch's ``CosineAnnealingLR`` stepped per epoch, the paper);
    with ``"budget"`` over ``budget``, the share of the time box used so far (0..1, see
    :func:`budget_used`), so that a time-boxed run anneals whatever its speed. Times a linear
    warm-up ``(step + 1) / warmup_steps`` over the first ``optim.warmup_steps`` steps.
    """
    progress = epoch / optim.epochs if optim.schedule == "epochs" else min(max(budget, 0.0), 1.0)
    floor = optim.min_lr / optim.lr
    factor = floor + (1.0 - floor) * (1.0 + math.cos(math.pi * progress)) / 2.0
    if step < optim.warmup_steps:
        factor *= (step + 1) / optim.warmup_steps
    return factor


def budget_used(cpu_seconds: float, wall_seconds: float, max_cpu_minutes: float, max_minutes: float) -> float:
    """Share of the time box used: the larger of CPU seconds over ``max_cpu_minutes`` and
    wall seconds over ``max_minutes`` (a limit of 0 is off; 0.0 with no limit)."""
    shares = [used / (60.0 * limit) for used, limit in ((cpu_seconds, max_cpu_minutes), (wall_seconds, max_minutes))
              if limit > 0]
    return max(shares, default=0.0)


@torch.no_grad()
def validate(model: torch.nn.Module, loader: DataLoader, num_classes: int, device: torch.device,
             amp: torch.dtype | None) -> DiceAccumulator:
    """Dice per validation case (all its slices together) at network resolution."""
    was_training = model.training
    model.eval()
    scores = DiceAccumulator(num_classes)
    for batch in tqdm(loader, desc="validation", unit="batch", leave=False, dynamic_ncols=True):
        images = batch["image"].to(device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(images).float()
        pred = (logits[:, 0] > 0) if num_classes == 1 else logits.argmax(dim=1)
        scores.update(batch["case"], pred.long().cpu(), batch["label"][:, 0].long())
    model.train(was_training)
    return scores


def train(config: TrainConfig, resume: bool = True) -> TrainResult:
    """Train as ``config`` says; continue from ``<run.output>/resume.pt`` when it exists and
    ``resume`` is True. Returns where the results are and the best validation Dice."""
    config.validate()
    d, device = _init_distributed(config.run.device)
    out = Path(config.run.output)
    amp = None if config.run.amp == "off" else autocast_dtype(device, training=True)
    if config.run.amp == "bf16" and device.type == "cpu":
        amp = torch.bfloat16
    torch.manual_seed(config.run.seed)

    data = build_training_data(config)
    metadata = _metadata(config, data)
    if not config.model.sam2_checkpoint:
        logger.warning("no SAM 2 checkpoint given (model.sam2_checkpoint): the Hiera encoder starts from "
                       "random weights and is trained in full (no frozen trunk); expect slower training "
                       "and lower accuracy than with SAM 2 weights")
    model = build_model(metadata, config.model.sam2_checkpoint or None,
                        drop_path_rate=config.model.drop_path_rate).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config.optim, device)
    loss_fn = DeepSupervisionLoss(data.num_classes, config.optim.aux_loss_weights)
    # fp16 autocast (CUDA GPUs without bf16) needs loss scaling; bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    if d.main:
        logger.info("model %s: %d trainable of %d parameters; %d training samples per epoch, %d validation "
                    "cases; device %s%s", config.model.backbone, sum(p.numel() for p in params),
                    sum(p.numel() for p in model.parameters()), len(data.train), len(data.val_names), device,
                    f", {d.world} processes" if d.world > 1 else "")

    epoch, skip, global_step, best_dice, best_epoch, history = 0, 0, 0, -math.inf, -1, []
    cpu_before = 0.0  # process CPU seconds of earlier runs of this training (run.max_cpu_minutes)
    resume_path = out / RESUME_FILE
    if resume and resume_path.exists():
        state = load_resume_state(resume_path)
        _check_same_run(state["config"], config, resume_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        epoch, skip, global_step = state["epoch"], state["batches_done"], state["global_step"]
        best_dice, best_epoch, history = state["best_dice"], state["best_epoch"], list(state["history"])
        cpu_before = state["cpu_seconds"]
        restore_rng(state["rng"])
        if d.main:
            logger.info("resuming %s at epoch %d, batch %d", resume_path, epoch + 1, skip)

    net: torch.nn.Module = model
    if d.world > 1:
        if device.type == "cuda":  # batch statistics over all GPUs (same state-dict keys)
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    writer = None
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2))
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"))

    def resume_state(ep: int, done: int) -> dict[str, Any]:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "cpu_seconds": cpu_seconds(),
                "scaler": scaler.state_dict(), "epoch": ep, "batches_done": done, "global_step": global_step, "best_dice": float(best_dice),
                "best_epoch": best_epoch, "history": history, "config": config.to_json(), "rng": capture_rng()}

    sampler = DistributedSampler(data.train, num_replicas=d.world, rank=d.rank, shuffle=True,
                                 seed=config.run.seed, drop_last=False)
    batch = config.optim.batch_size
    per_rank = len(sampler)
    val_loader = DataLoader(data.val, batch_size=config.run.val_batch_size, num_workers=config.data.num_workers)
    steps_this_run, last_save, stopped, timed_out = 0, time.monotonic(), False, False
    started, cpu_started = time.monotonic(), time.process_time()

    def cpu_seconds() -> float:
        return cpu_before + time.process_time() - cpu_started

    def box_used() -> float:
        return budget_used(cpu_seconds(), time.monotonic() - started, config.run.max_cpu_minutes,
                           config.run.max_minutes)

    net.train()
    while epoch < config.optim.epochs and not stopped:
        data.train.set_epoch(epoch)
        indices = _epoch_indices(sampler, epoch, skip, batch)
        # Own generator: creating the loader must not draw from the global RNG (exact resume).
        generator = torch.Generator().manual_seed(config.run.seed * 100_003 + epoch)
        loader = DataLoader(data.train, batch_size=batch, sampler=indices, num_workers=config.data.num_workers,
                            drop_last=per_rank >= batch, pin_memory=device.type == "cuda", generator=generator)
        total = per_rank // batch if per_rank >= batch else 1
        bar = tqdm(loader, total=total, initial=skip, disable=not d.main, desc=f"epoch {epoch + 1}/{config.optim.epochs}",
                   unit="batch", dynamic_ncols=True)
        done = skip
        for sample in bar:
            images, labels = sample["image"].to(device), sample["label"].to(device)
            if config.augment.multiscale:
                images, labels = _multiscale(images, labels, config.augment.multiscale, config.run.seed, epoch, done)
            lr = config.optim.lr * lr_factor(config.optim, global_step, epoch, box_used())
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                outputs = net(images)
            loss = loss_fn(outputs, labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            done += 1
            global_step += 1
            steps_this_run += 1
            if d.main:
                loss_value = loss.item()
                bar.set_postfix(loss=f"{loss_value:.4f}")
                if writer is not None and global_step % config.run.log_every_steps == 0:
                    writer.add_scalar("train/loss", loss_value, global_step)
                    writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], global_step)
            if config.run.stop_after_steps and steps_this_run >= config.run.stop_after_steps:
                stopped = True
                break
            by_steps = config.run.resume_every_steps and global_step % config.run.resume_every_steps == 0
            by_time = config.run.resume_every_minutes and time.monotonic() - last_save > 60 * config.run.resume_every_minutes
            if d.main and (by_steps or by_time):
                save_resume_state(resume_state(epoch, done), resume_path)
                last_save = time.monotonic()
            if config.run.max_minutes or config.run.max_cpu_minutes:
                timed_out = _agree(d, box_used() >= 1.0, device)
            if timed_out:
                logger.warning("time box reached (run.max_minutes=%s, run.max_cpu_minutes=%s; %.0f CPU seconds): "
                               "ending epoch %d early", config.run.max_minutes, config.run.max_cpu_minutes,
                               cpu_seconds(), epoch + 1)
                break
        bar.close()
        if stopped:
            break
        skip = 0
        if d.main:
            scores = validate(model, val_loader, data.num_classes, device, amp)
            dice = scores.mean()
            per_class = np.mean(list(scores.per_case().values()), axis=0).tolist()
            record = {"epoch": epoch + 1, "val_dice": dice, "lr": optimizer.param_groups[0]["lr"], "step": global_step,
                      "val_dice_per_class": dict(zip(metadata.class_names, per_class))}
            history.append(record)
            metadata.provenance = {"tool": f"sam2unet_core {__version__}", "config": config.to_dict(), **data.facts,
                                   "epoch": epoch + 1, "val_dice": dice, "history": history}
            save_model(model, out / "last.safetensors", metadata)
            if dice > best_dice:
                best_dice, best_epoch = dice, epoch + 1
                save_model(model, out / "best.safetensors", metadata)
            logger.info("epoch %d: validation Dice %.4f (%s; best %.4f at epoch %d)", epoch + 1, dice,
                        ", ".join(f"{k} {v:.3f}" for k, v in record["val_dice_per_class"].items()), best_dice, best_epoch)
            if writer is not None:
                writer.add_scalar("val/dice", dice, epoch + 1)
                for name, value in record["val_dice_per_class"].items():
                    writer.add_scalar(f"val/dice_{name}", value, epoch + 1)
                writer.flush()
            save_resume_state(resume_state(epoch + 1, 0), resume_path)
            last_save = time.monotonic()
        epoch += 1
        _barrier(d)
        if timed_out:
            break
    if writer is not None:
        writer.close()
    return TrainResult(out, float(best_dice), best_epoch, epoch, stopped, global_step, cpu_seconds())
