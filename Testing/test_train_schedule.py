"""Learning-rate rule and time box of the trainer: the epoch cosine equals torch's
``CosineAnnealingLR`` (the paper), warm-up and the budget cosine have their stated values,
and ``run.max_cpu_minutes`` / ``run.max_steps`` stop a run on the process CPU clock / the
optimiser step count."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from train_data import write_polyp_folder

from sam2unet_core.train.config import OptimConfig, load_config
from sam2unet_core.train.schedule import budget_used, lr_factor
from sam2unet_core.train.trainer import train


def test_epoch_schedule_is_torch_cosine_annealing_per_epoch() -> None:
    optim = OptimConfig(lr=1e-3, min_lr=1e-6, epochs=5)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=optim.lr)
    torch_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=optim.epochs, eta_min=optim.min_lr)
    for epoch in range(optim.epochs):
        for step in (epoch * 7, epoch * 7 + 6):  # constant within the epoch; budget is ignored
            assert optim.lr * lr_factor(optim, step, epoch, 0.9) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
        opt.step()
        torch_schedule.step()


def test_warm_up_is_linear_over_the_first_steps() -> None:
    optim = OptimConfig(lr=1e-3, min_lr=0.0, epochs=10, warmup_steps=4)
    assert [lr_factor(optim, s, 0, 0.0) for s in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    cosine_at_epoch_1 = (1 + math.cos(math.pi / 10)) / 2
    assert lr_factor(optim, 1, 1, 0.0) == pytest.approx(0.5 * cosine_at_epoch_1)


def test_budget_schedule_follows_the_share_of_the_time_box() -> None:
    optim = OptimConfig(lr=1e-3, min_lr=1e-5, epochs=1000, schedule="budget", warmup_steps=2)
    assert lr_factor(optim, 0, 999, 0.0) == pytest.approx(0.5)  # warm-up, epoch ignored
    assert lr_factor(optim, 10, 3, 0.0) == pytest.approx(1.0)
    assert lr_factor(optim, 10, 3, 0.5) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor(optim, 10, 3, 1.0) == pytest.approx(0.01)
    assert lr_factor(optim, 10, 3, 1.7) == pytest.approx(0.01)  # past the box: the floor


def test_budget_used_is_the_larger_share_of_the_set_limits() -> None:
    assert budget_used(30.0, 600.0, 1.0, 0.0) == pytest.approx(0.5)  # CPU box only
    assert budget_used(30.0, 90.0, 1.0, 2.0) == pytest.approx(0.75)  # wall share larger
    assert budget_used(30.0, 90.0, 0.0, 0.0) == 0.0
    assert budget_used(30.0, 90.0, 1.0, 2.0, 90, 100) == pytest.approx(0.9)  # step share larger
    assert budget_used(30.0, 90.0, 0.0, 0.0, 25, 100) == pytest.approx(0.25)  # steps only: any machine


def test_cpu_time_box_stops_the_run_and_counts_cpu_seconds(tmp_path: Path) -> None:
    root = write_polyp_folder(tmp_path / "TrainDataset", 6)
    config = load_config(None, [f"data.root={root}", f"run.output={tmp_path / 'run'}", "model.backbone=hiera_t",
                                "data.input_size=64", "data.num_workers=0", "optim.batch_size=1",
                                "optim.epochs=50", "data.val_fraction=0.5", "run.resume_every_minutes=0",
                                "run.max_cpu_minutes=0.0001", "optim.schedule=budget"])
    result = train(config, resume=False)
    # 6 ms of CPU time: the first step uses it up; the epoch ends, validates and saves.
    assert (result.steps, result.epochs_done) == (1, 1)
    assert result.cpu_seconds > 0.006 and (tmp_path / "run" / "best.safetensors").exists()


def test_step_box_stops_the_run_after_its_steps(tmp_path: Path) -> None:
    root = write_polyp_folder(tmp_path / "TrainDataset", 6)
    config = load_config(None, [f"data.root={root}", f"run.output={tmp_path / 'run'}", "model.backbone=hiera_t",
                                "data.input_size=64", "data.num_workers=0", "optim.batch_size=1",
                                "optim.epochs=50", "data.val_fraction=0.5", "run.resume_every_minutes=0",
                                "run.max_steps=4", "optim.schedule=budget", "run.log_every_steps=1"])
    result = train(config, resume=False)
    # 3 training samples per epoch: the box of 4 steps ends the second epoch after one step.
    assert (result.steps, result.epochs_done) == (4, 2)
    assert (tmp_path / "run" / "best.safetensors").exists()
