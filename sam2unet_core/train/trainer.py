"""The training loop: AdamW + warm-up and cosine schedule, deep-supervised loss, validation Dice every
epoch, best/last checkpoints in our format, exact resume, TensorBoard, DDP via torchrun.

:class:`Trainer` holds one run; :meth:`Trainer.run_training` drives it through
:meth:`~Trainer.train_epoch` (:meth:`~Trainer.train_step` per batch) and
:meth:`~Trainer.on_epoch_end` (:meth:`~Trainer.validation_step`, checkpoints, resume state).
What watches a run (TensorBoard, progress events for a GUI or ``--progress jsonl``) is a
``TrainerCallback`` (:mod:`.callbacks`); the learning rate and the time box are in
:mod:`.schedule`; :func:`train` is the one-call form.

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
``DistributedSampler`` share (``optim.batch_size`` per process); rank 0 validates, logs,
calls the callbacks and saves. CUDA uses NCCL, CPU uses gloo.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

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

from .callbacks import TensorBoardLogger, TrainerCallback
from .config import OptimConfig, TrainConfig
from .init_from import BaseModel, read_base_model
from .losses import DeepSupervisionLoss
from .pipeline import TrainingData, build_training_data
from .resume import capture_rng, load_resume_state, restore_rng, save_resume_state
from .schedule import TimeBox, lr_factor

__all__ = ["train", "Trainer", "TrainResult", "TrainState", "RESUME_FILE", "make_optimizer", "validate"]

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
class TrainState:
    """Where a run is; all of it goes into ``resume.pt``."""

    epoch: int = 0  # current epoch, 0-based
    batches_done: int = 0  # batches of ``epoch`` already trained (per process)
    global_step: int = 0  # optimiser steps, all runs of this training
    best_dice: float = -math.inf
    best_epoch: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)  # one validation record per epoch


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


def _metadata(config: TrainConfig, data: TrainingData, base: BaseModel | None = None) -> ModelMetadata:
    """The new model's metadata: architecture and labels of the config and the dataset
    (colours from ``model.label_colors``, else the base model's for a label it has)."""
    frozen = base.metadata.architecture.freeze_encoder if base else bool(config.model.sam2_checkpoint)
    arch = Architecture(config.model.backbone, data.num_classes, data.in_channels, freeze_encoder=frozen,
                        window_spec=list(config.model.window_spec),
                        full_res_channels=config.model.full_res_channels)
    labels = default_labels(data.num_classes, data.label_names, config.model.label_terms)
    inherited = {label.name: label for label in base.metadata.labels} if base else {}
    for i, label in enumerate(labels):
        if label.name in config.model.label_colors:
            labels[i] = dataclasses.replace(label, color=tuple(config.model.label_colors[label.name]))
        elif label.name in inherited:
            old = inherited[label.name]
            codes = {key: getattr(label, key) or getattr(old, key) for key in ("category", "type", "modifier")}
            labels[i] = dataclasses.replace(label, color=old.color, **codes)
    meta = ModelMetadata(architecture=arch, labels=labels, **config.data.preprocessing())
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


@torch.no_grad()
def validate(model: torch.nn.Module, loader: DataLoader, num_classes: int, device: torch.device,
             amp: torch.dtype | None) -> DiceAccumulator:
    """Dice per validation case (all its slices together) at network resolution."""
    was_training = model.training
    model.eval()
    scores = DiceAccumulator(num_classes)
    # disable=None: bars on a terminal only; a piped stderr (a GUI's child process, whose
    # output may share one pipe with JSON events) gets none
    for batch in tqdm(loader, desc="validation", unit="batch", leave=False, dynamic_ncols=True, disable=None):
        images = batch["image"].to(device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(images).float()
        pred = (logits[:, 0] > 0) if num_classes == 1 else logits.argmax(dim=1)
        scores.update(batch["case"], pred.long().cpu(), batch["label"][:, 0].long())
    model.train(was_training)
    return scores


class Trainer:
    """One training run of ``config``: builds data, model, optimiser and loss, continues from
    ``<run.output>/resume.pt`` when it exists and ``resume`` is True, and calls
    ``callbacks`` (on rank 0; TensorBoard is always one of them)."""

    def __init__(self, config: TrainConfig, resume: bool = True, callbacks: Sequence[TrainerCallback] = ()) -> None:
        config.validate()
        self.config = config
        self.dist, self.device = _init_distributed(config.run.device)
        self.output = Path(config.run.output)
        self.amp = self._autocast_dtype()
        torch.manual_seed(config.run.seed)

        base = read_base_model(config.model.init_from) if config.model.init_from else None
        if base is not None:  # refused before the data are read
            base.check_architecture(config.model.backbone, tuple(config.model.window_spec),
                                    config.model.full_res_channels, config.data.network_channels())
        self.data = build_training_data(config)
        if base is not None:
            base.check_labels(self.data.label_names)
        self.metadata = _metadata(config, self.data, base)
        self.model = self._build_model(base)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.trainable, config.optim, self.device)
        self.loss_fn = DeepSupervisionLoss(self.data.num_classes, config.optim.aux_loss_weights)
        # fp16 autocast (CUDA GPUs without bf16) needs loss scaling; bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.val_loader = DataLoader(self.data.val, batch_size=config.run.val_batch_size,
                                     num_workers=config.data.num_workers)
        self.state = TrainState()
        self.resume_path = self.output / RESUME_FILE
        cpu_before = self._load_resume() if resume and self.resume_path.exists() else 0.0
        self.clock = TimeBox(config.run.max_cpu_minutes, config.run.max_minutes, cpu_before, config.run.max_steps)
        self.net = self._distributed_net()
        self.callbacks: list[TrainerCallback] = []
        if self.dist.main:
            self.output.mkdir(parents=True, exist_ok=True)
            (self.output / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2))
            self.callbacks = [TensorBoardLogger(self.output / "tensorboard", config.run.log_every_steps),
                              *callbacks]
        self.learning_rate = config.optim.lr
        self.steps_this_run = 0
        self.stop_requested = False  # a callback may set it: the epoch ends, validates and saves
        self._box_used_at_start = 0.0  # share of the time box used by earlier runs (resume)
        self._last_resume_save = time.monotonic()

    # ------------------------------------------------------------------ set-up
    def _autocast_dtype(self) -> torch.dtype | None:
        if self.config.run.amp == "off":
            return None
        if self.config.run.amp == "bf16" and self.device.type == "cpu":
            return torch.bfloat16
        return autocast_dtype(self.device, training=True)

    def _build_model(self, base: BaseModel | None) -> torch.nn.Module:
        config = self.config
        if base is None and not config.model.sam2_checkpoint:
            logger.warning("no SAM 2 checkpoint given (model.sam2_checkpoint): the Hiera encoder starts from "
                           "random weights and is trained in full (no frozen trunk); expect slower training "
                           "and lower accuracy than with SAM 2 weights")
        model = build_model(self.metadata, config.model.sam2_checkpoint or None,
                            drop_path_rate=config.model.drop_path_rate)
        if base is not None:
            base.initialise(model, self.metadata)
        model = model.to(self.device)
        if self.dist.main:
            params = sum(p.numel() for p in model.parameters() if p.requires_grad)
            logger.info("model %s: %d trainable of %d parameters; %d training samples per epoch, %d validation "
                        "cases; device %s%s", config.model.backbone, params,
                        sum(p.numel() for p in model.parameters()), len(self.data.train), len(self.data.val_names),
                        self.device, f", {self.dist.world} processes" if self.dist.world > 1 else "")
        return model

    def _load_resume(self) -> float:
        """Restore ``resume.pt``; returns the CPU seconds of the earlier runs."""
        saved = load_resume_state(self.resume_path)
        _check_same_run(saved["config"], self.config, self.resume_path)
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scaler.load_state_dict(saved["scaler"])
        self.state = TrainState(saved["epoch"], saved["batches_done"], saved["global_step"], saved["best_dice"],
                                saved["best_epoch"], list(saved["history"]))
        restore_rng(saved["rng"])
        if self.dist.main:
            logger.info("resuming %s at epoch %d, batch %d", self.resume_path, self.state.epoch + 1,
                        self.state.batches_done)
        return saved["cpu_seconds"]

    def _distributed_net(self) -> torch.nn.Module:
        if self.dist.world == 1:
            return self.model
        net: torch.nn.Module = self.model
        if self.device.type == "cuda":  # batch statistics over all GPUs (same state-dict keys)
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        return torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    # ------------------------------------------------------------------ the run
    def run_training(self) -> TrainResult:
        """Train until ``optim.epochs``, the time box, ``run.stop_after_steps`` or a stop
        request; returns where the results are and the best validation Dice."""
        self._call("on_train_start")
        self._box_used_at_start = self.clock.used(self.state.global_step)
        self.net.train()
        stopped = False
        while self.state.epoch < self.config.optim.epochs:
            ended = self.train_epoch()
            if ended == "stopped":
                stopped = True
                break
            if self.dist.main:
                self.on_epoch_end()
            self.state.epoch += 1
            self.state.batches_done = 0
            _barrier(self.dist)
            if ended == "time_box":
                break
        s = self.state
        result = TrainResult(self.output, float(s.best_dice), s.best_epoch, s.epoch, stopped, s.global_step,
                             self.clock.cpu_seconds())
        self._call("on_train_end", result)
        return result

    def train_epoch(self) -> str:
        """Train the rest of the current epoch. Returns ``"done"``, ``"time_box"`` (the box or
        a stop request ended it early) or ``"stopped"`` (``run.stop_after_steps``, as if killed)."""
        config, s = self.config, self.state
        batch = config.optim.batch_size
        sampler = DistributedSampler(self.data.train, num_replicas=self.dist.world, rank=self.dist.rank,
                                     shuffle=True, seed=config.run.seed, drop_last=False)
        per_rank = len(sampler)
        self.data.train.set_epoch(s.epoch)
        # Own generator: creating the loader must not draw from the global RNG (exact resume).
        generator = torch.Generator().manual_seed(config.run.seed * 100_003 + s.epoch)
        loader = DataLoader(self.data.train, batch_size=batch,
                            sampler=_epoch_indices(sampler, s.epoch, s.batches_done, batch),
                            num_workers=config.data.num_workers, drop_last=per_rank >= batch,
                            pin_memory=self.device.type == "cuda", generator=generator)
        bar = tqdm(loader, total=per_rank // batch if per_rank >= batch else 1, initial=s.batches_done,
                   disable=None if self.dist.main else True,  # None: on a terminal only (as validation)
                   desc=f"epoch {s.epoch + 1}/{config.optim.epochs}", unit="batch", dynamic_ncols=True)
        try:
            for sample in bar:
                loss = self.train_step(sample)
                s.batches_done += 1
                s.global_step += 1
                self.steps_this_run += 1
                if self.dist.main:
                    bar.set_postfix(loss=f"{loss:.4f}")
                    self._call("on_step_end", loss)
                if config.run.stop_after_steps and self.steps_this_run >= config.run.stop_after_steps:
                    return "stopped"
                self._save_resume_if_due()
                if _agree(self.dist, self._box_reached(), self.device):
                    logger.warning("time box reached (run.max_minutes=%s, run.max_cpu_minutes=%s, run.max_steps=%s; "
                                   "%.0f CPU seconds, %d steps) or stop requested: ending epoch %d early",
                                   config.run.max_minutes, config.run.max_cpu_minutes, config.run.max_steps,
                                   self.clock.cpu_seconds(), s.global_step, s.epoch + 1)
                    return "time_box"
        finally:
            bar.close()
        return "done"

    def train_step(self, sample: dict[str, torch.Tensor]) -> float:
        """One optimiser step on a batch ``{"image": (B, C, n, n), "label": (B, 1, n, n)}``;
        returns its loss."""
        config = self.config
        images, labels = sample["image"].to(self.device), sample["label"].to(self.device)
        if config.augment.multiscale:
            images, labels = _multiscale(images, labels, config.augment.multiscale, config.run.seed,
                                         self.state.epoch, self.state.batches_done)
        self.learning_rate = config.optim.lr * lr_factor(config.optim, self.state.global_step, self.state.epoch,
                                                         self.clock.used(self.state.global_step))
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            outputs = self.net(images)
        loss = self.loss_fn(outputs, labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.item()

    def validation_step(self) -> dict[str, Any]:
        """Validation Dice of the current model; the epoch's history record."""
        scores = validate(self.model, self.val_loader, self.data.num_classes, self.device, self.amp)
        per_class = np.mean(list(scores.per_case().values()), axis=0).tolist()
        return {"epoch": self.state.epoch + 1, "val_dice": scores.mean(), "lr": self.learning_rate,
                "step": self.state.global_step, "val_dice_per_class": dict(zip(self.metadata.class_names, per_class))}

    def on_epoch_end(self) -> None:
        """Rank 0 after an epoch: validate, save last/best models and the resume state."""
        s = self.state
        record = self.validation_step()
        s.history.append(record)
        dice = record["val_dice"]
        metadata = dataclasses.replace(self.metadata, provenance={
            "tool": f"sam2unet_core {__version__}", "config": self.config.to_dict(), **self.data.facts,
            "epoch": s.epoch + 1, "val_dice": dice, "history": s.history})
        save_model(self.model, self.output / "last.safetensors", metadata)
        if dice > s.best_dice:
            s.best_dice, s.best_epoch = dice, s.epoch + 1
            save_model(self.model, self.output / "best.safetensors", metadata)
        logger.info("epoch %d: validation Dice %.4f (%s; best %.4f at epoch %d)", s.epoch + 1, dice,
                    ", ".join(f"{k} {v:.3f}" for k, v in record["val_dice_per_class"].items()), s.best_dice,
                    s.best_epoch)
        self._save_resume(epoch=s.epoch + 1, batches_done=0)
        self._call("on_validation_end", record)

    # ------------------------------------------------------------------ helpers
    def eta_seconds(self) -> float | None:
        """Wall seconds left: from the time box's share used, else from the steps of
        ``optim.epochs`` at this run's pace; None before the first step."""
        elapsed = self.clock.wall_seconds()
        if self.steps_this_run == 0 or elapsed <= 0:
            return None
        if self.clock.set:  # the share used by this run (a resumed run starts part-way)
            used = self.clock.used(self.state.global_step)
            this_run = used - self._box_used_at_start
            return round(elapsed * max(0.0, 1.0 - used) / this_run, 1) if this_run > 0 else None
        per_epoch = max(1, len(self.data.train) // (self.config.optim.batch_size * self.dist.world))
        steps_left = self.config.optim.epochs * per_epoch - self.state.global_step
        return round(max(0, steps_left) * elapsed / self.steps_this_run, 1)

    def _box_reached(self) -> bool:
        return self.stop_requested or (self.clock.set and self.clock.used(self.state.global_step) >= 1.0)

    def _save_resume_if_due(self) -> None:
        run = self.config.run
        by_steps = run.resume_every_steps and self.state.global_step % run.resume_every_steps == 0
        by_time = run.resume_every_minutes and time.monotonic() - self._last_resume_save > 60 * run.resume_every_minutes
        if self.dist.main and (by_steps or by_time):
            self._save_resume(self.state.epoch, self.state.batches_done)

    def _save_resume(self, epoch: int, batches_done: int) -> None:
        s = self.state
        save_resume_state({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                           "cpu_seconds": self.clock.cpu_seconds(), "scaler": self.scaler.state_dict(),
                           "epoch": epoch, "batches_done": batches_done, "global_step": s.global_step,
                           "best_dice": float(s.best_dice), "best_epoch": s.best_epoch, "history": s.history,
                           "config": self.config.to_json(), "rng": capture_rng()}, self.resume_path)
        self._last_resume_save = time.monotonic()

    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)


def train(config: TrainConfig, resume: bool = True, callbacks: Sequence[TrainerCallback] = ()) -> TrainResult:
    """Train as ``config`` says; continue from ``<run.output>/resume.pt`` when it exists and
    ``resume`` is True. Returns where the results are and the best validation Dice."""
    return Trainer(config, resume, callbacks).run_training()
