"""The resume state of a training run: one ``resume.pt`` written atomically.

It holds only tensors and plain containers of numbers/strings, so it is read back with
``torch.load(weights_only=True)`` (no pickled code runs when resuming):

``model``, ``optimizer``, ``scheduler``, ``scaler`` (state dicts), ``epoch`` (current epoch),
``batches_done`` (batches of that epoch already trained, per process), ``global_step``,
``best_dice``, ``history`` (per-epoch records), ``config`` (the run's config as JSON) and
``rng`` (torch, CUDA, numpy and Python generator states).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io.atomic import atomic_write

__all__ = ["capture_rng", "restore_rng", "save_resume_state", "load_resume_state"]


def capture_rng() -> dict[str, Any]:
    """States of the global generators as tensors and lists (``weights_only``-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back the generator states of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_resume_state(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (``io.atomic.atomic_write``), so a kill during
    the write leaves the previous state intact."""
    return atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


def load_resume_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a state of :func:`save_resume_state` safely (``weights_only=True``)."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as err:
        raise ValueError(f"cannot read resume state {path}: {err}") from err
