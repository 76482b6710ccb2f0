"""What watches a training run: :class:`TrainerCallback` hooks and the two the project
ships, TensorBoard scalars and progress events (a GUI, ``sam2unet-train --progress jsonl``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from .trainer import Trainer, TrainResult

__all__ = ["TrainerCallback", "TensorBoardLogger", "ProgressEvents"]


class TrainerCallback:
    """Hooks a :class:`Trainer` calls on rank 0. Override the ones you need; each gets the
    trainer, whose ``state``, ``clock``, ``config`` and ``metadata`` describe the run."""

    def on_train_start(self, trainer: "Trainer") -> None:
        """Before the first step of this run (after a resume state was loaded)."""

    def on_step_end(self, trainer: "Trainer", loss: float) -> None:
        """After optimiser step ``trainer.state.global_step`` with the batch ``loss``."""

    def on_validation_end(self, trainer: "Trainer", record: dict[str, Any]) -> None:
        """After an epoch's validation and checkpoints; ``record`` as in ``state.history``."""

    def on_train_end(self, trainer: "Trainer", result: TrainResult) -> None:
        """When the run ends (epochs done, time box reached or stopped)."""


class TensorBoardLogger(TrainerCallback):
    """Training loss and learning rate every ``run.log_every_steps`` steps, validation Dice
    per epoch, under ``<run.output>/tensorboard``."""

    def __init__(self, folder: Path, every_steps: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer, self.every_steps = SummaryWriter(str(folder)), every_steps

    def on_step_end(self, trainer: "Trainer", loss: float) -> None:
        step = trainer.state.global_step
        if step % self.every_steps == 0:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", trainer.learning_rate, step)

    def on_validation_end(self, trainer: "Trainer", record: dict[str, Any]) -> None:
        self.writer.add_scalar("val/dice", record["val_dice"], record["epoch"])
        for name, value in record["val_dice_per_class"].items():
            self.writer.add_scalar(f"val/dice_{name}", value, record["epoch"])
        self.writer.flush()

    def on_train_end(self, trainer: "Trainer", result: TrainResult) -> None:
        self.writer.close()


class ProgressEvents(TrainerCallback):
    """The run as event dicts for ``on_event`` (a GUI, ``sam2unet-train --progress jsonl``):

    * ``{"event": "train_start", "steps_done", "device", "labels", "budget_s"}``
    * ``{"event": "train_step", "step", "loss", "lr", "elapsed_s", "eta_s"}`` (``eta_s``: None
      until it can be estimated) every ``every_steps`` steps;
    * ``{"event": "validation", "epoch", "step", "dice", "dice_per_label"}``.

    The caller sends the end (``train_done`` with the model it wrote).
    """

    def __init__(self, on_event: Callable[[dict[str, Any]], None], every_steps: int = 1) -> None:
        self.on_event, self.every_steps = on_event, every_steps

    def on_train_start(self, trainer: "Trainer") -> None:
        self.on_event({"event": "train_start", "steps_done": trainer.state.global_step,
                       "device": str(trainer.device), "labels": trainer.metadata.class_names,
                       "budget_s": trainer.clock.budget_seconds()})

    def on_step_end(self, trainer: "Trainer", loss: float) -> None:
        if trainer.state.global_step % self.every_steps == 0:
            self.on_event({"event": "train_step", "step": trainer.state.global_step, "loss": loss,
                           "lr": trainer.learning_rate, "elapsed_s": round(trainer.clock.wall_seconds(), 2),
                           "eta_s": trainer.eta_seconds()})

    def on_validation_end(self, trainer: "Trainer", record: dict[str, Any]) -> None:
        self.on_event({"event": "validation", "epoch": record["epoch"], "step": record["step"],
                       "dice": record["val_dice"], "dice_per_label": record["val_dice_per_class"]})
