"""The learning-rate rule and the time box of a training run (``optim.schedule``,
``run.max_minutes``, ``run.max_cpu_minutes``, ``run.max_steps``)."""

from __future__ import annotations

import math
import time

from .config import OptimConfig

__all__ = ["lr_factor", "budget_used", "TimeBox"]


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


def budget_used(cpu_seconds: float, wall_seconds: float, max_cpu_minutes: float, max_minutes: float,
                steps: int = 0, max_steps: int = 0) -> float:
    """Share of the time box used: the largest of CPU seconds over ``max_cpu_minutes``, wall
    seconds over ``max_minutes`` and optimiser steps over ``max_steps`` (a limit of 0 is off;
    0.0 with no limit)."""
    shares = [used / limit for used, limit in ((cpu_seconds, 60.0 * max_cpu_minutes), (wall_seconds, 60.0 * max_minutes),
                                               (steps, max_steps)) if limit > 0]
    return max(shares, default=0.0)


class TimeBox:
    """The clocks of a run: process CPU seconds (counting earlier runs of a resumed training)
    and wall seconds of this run, against ``run.max_cpu_minutes`` and ``run.max_minutes``; and
    the optimiser steps of all runs, which the caller passes, against ``run.max_steps``."""

    def __init__(self, max_cpu_minutes: float, max_minutes: float, cpu_before: float = 0.0,
                 max_steps: int = 0) -> None:
        self.max_cpu_minutes, self.max_minutes, self.cpu_before = max_cpu_minutes, max_minutes, cpu_before
        self.max_steps = max_steps
        self.wall_started, self.cpu_started = time.monotonic(), time.process_time()

    @property
    def set(self) -> bool:
        return bool(self.max_cpu_minutes or self.max_minutes or self.max_steps)

    def cpu_seconds(self) -> float:
        return self.cpu_before + time.process_time() - self.cpu_started

    def wall_seconds(self) -> float:
        return time.monotonic() - self.wall_started

    def used(self, steps: int = 0) -> float:
        """Share of the box used so far, ``steps`` optimiser steps done (0 with no box), see
        :func:`budget_used`."""
        return budget_used(self.cpu_seconds(), self.wall_seconds(), self.max_cpu_minutes, self.max_minutes,
                           steps, self.max_steps)

    def budget_seconds(self) -> float | None:
        """Wall seconds of the box when only a wall limit is set, else None."""
        return 60.0 * self.max_minutes if self.max_minutes and not (self.max_cpu_minutes or self.max_steps) else None
