"""Train a model from (image, label map) volume pairs, without a config file or a dataset
folder: the library call behind the 3D Slicer module's Train section and
``sam2unet-train --request``.

A :class:`~sam2unet_core.training_request.TrainingRequest` names the pairs, the labels
(names, colours, codes), the base (from scratch, a SAM 2 checkpoint, or one of our models to
fine-tune), the plane and a wall-clock budget. :func:`train_from_pairs` checks every pair
(readable, label map on the image's grid, label values declared), writes a dataset
description into a temporary folder (the volumes are not copied), trains with a packaged
recipe (``recipes/*.yaml``), reports events through ``on_event`` and writes the model to
``request.output`` only when training has ended: a failed or cancelled run leaves no model
file and no temporary folder.

Validation: with 5 or more pairs one pair is held out and its Dice reported; with fewer,
every pair trains and the validation Dice is measured on the training pairs (a check of the
fit, not of generalisation; the ``train_start`` event says which).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from sam2unet_core.io.atomic import atomic_write
from sam2unet_core.training_request import BASES, TrainingPair, TrainingRequest

from .config import TrainConfig, config_from_dict, merge_sections, read_recipe
from .callbacks import ProgressEvents
from .trainer import TrainResult, Trainer

__all__ = ["TrainingPair", "TrainingRequest", "train_from_pairs", "BASES", "MIN_PAIRS_TO_HOLD_OUT"]

logger = logging.getLogger(__name__)

MIN_PAIRS_TO_HOLD_OUT = 5  # from this many pairs on, one is held out for validation
Event = Callable[[dict[str, Any]], None]


def _check_pair(pair: TrainingPair, num_labels: int) -> None:
    """Both files read, share one voxel grid, and the label values are 0..num_labels."""
    import numpy as np

    from sam2unet_core.io.readers import read_volume

    image, label = read_volume(pair.image), read_volume(pair.label)
    if image.num_channels != 1:
        raise ValueError(f"{pair.image}: pair {pair.name!r}: a scalar volume is needed, got {image.num_channels} "
                         f"components per voxel")
    if not image.same_grid(label):
        raise ValueError(f"{pair.label}: pair {pair.name!r}: the label map is not on the image's voxel grid "
                         f"(shape {label.shape_kji} vs {image.shape_kji}, spacing {label.spacing_ijk.tolist()} vs "
                         f"{image.spacing_ijk.tolist()}, origin {label.origin_lps.tolist()} vs "
                         f"{image.origin_lps.tolist()})")
    values = np.unique(label.array_kji)
    if values.min() < 0 or values.max() > num_labels or not np.array_equal(values, np.round(values)):
        raise ValueError(f"{pair.label}: pair {pair.name!r}: label values {values.tolist()[:10]}; the request "
                         f"declares 1..{num_labels}")


def _write_dataset(request: TrainingRequest, folder: Path) -> None:
    """An MSD-style ``dataset.json`` in ``folder`` whose training list points at the pairs'
    own files (label files are linked under the pairs' names: case names come from them)."""
    from sam2unet_core.io.readers import split_suffix

    (folder / "labelsTr").mkdir()
    training = []
    for pair in request.pairs:
        label = folder / "labelsTr" / f"{pair.name}{split_suffix(pair.label)[1]}"
        try:
            label.symlink_to(Path(pair.label).resolve())
        except OSError:  # no symbolic links (Windows without the privilege): a copy
            shutil.copyfile(pair.label, label)
        training.append({"image": str(Path(pair.image).resolve()), "label": str(label)})
    labels = {"background": 0, **{label.name: label.value for label in request.labels}}
    (folder / "dataset.json").write_text(json.dumps({"labels": labels, "channel_names": {"0": "image"},
                                                     "training": training}, indent=2))


def request_config(request: TrainingRequest, dataset: Path, run_folder: Path) -> TrainConfig:
    """The training config of ``request``: the base's recipe, the request's settings."""
    base_meta = None
    if request.base == "model":
        from .init_from import read_init_metadata

        base_meta = read_init_metadata(request.base_path)
    frozen = request.base == "sam2" or (base_meta is not None and base_meta.architecture.freeze_encoder)
    recipe = read_recipe("volumes_sam2_frozen" if frozen else "volumes_from_scratch")
    n = len(request.pairs)
    settings: dict[str, Any] = {
        "data": {"root": str(dataset), "plane": request.plane,
                 "val_fraction": 1.0 / n if n >= MIN_PAIRS_TO_HOLD_OUT else 0.0},
        "model": {"label_names": [], "label_colors": {label.name: list(label.color) for label in request.labels},
                  "label_terms": {label.name: {key: getattr(label, key).to_list()
                                               for key in ("category", "type", "modifier") if getattr(label, key)}
                                  for label in request.labels if label.category and label.type}},
        "run": {"output": str(run_folder), "max_minutes": request.minutes, "max_cpu_minutes": 0.0,
                "device": request.device, "seed": request.seed},
    }
    if request.base == "sam2":
        from sam2unet_core.checkpoint import read_torch_metadata

        settings["model"].update(sam2_checkpoint=request.base_path,
                                 backbone=read_torch_metadata(request.base_path).architecture.backbone)
    if base_meta is not None:  # the model's preprocessing, plane and network, not the recipe's
        from .init_from import settings_of_model

        recipe = merge_sections(recipe, settings_of_model(base_meta))
        settings["model"]["init_from"] = request.base_path
    return config_from_dict(merge_sections(recipe, settings))


def train_from_pairs(request: TrainingRequest, on_event: Event | None = None,
                     work_folder: str | Path | None = None) -> TrainResult:
    """Train the model ``request`` describes and write it to ``request.output``.

    Events (dicts, see :class:`~.trainer.ProgressEvents`): ``train_start`` (with ``pairs``,
    ``base`` and ``held_out``), ``train_step``, ``validation``, then ``train_done`` with
    ``model`` (the written file), ``best_dice``, ``steps`` and ``seconds``. Raises
    ``ValueError`` naming the file or field for a bad request, before any training.
    ``work_folder``: where the temporary folder goes (default: the system's).
    """
    request.validate()
    for pair in request.pairs:
        _check_pair(pair, len(request.labels))
    emit = on_event or (lambda event: None)
    n = len(request.pairs)

    def with_request_facts(event: dict[str, Any]) -> None:
        if event["event"] == "train_start":
            event = {**event, "pairs": n, "base": request.base, "held_out": n >= MIN_PAIRS_TO_HOLD_OUT}
        emit(event)

    with tempfile.TemporaryDirectory(prefix="sam2unet-train-", dir=work_folder) as temporary:
        folder = Path(temporary)
        (folder / "dataset").mkdir()
        _write_dataset(request, folder / "dataset")
        config = request_config(request, folder / "dataset", folder / "run")
        started = time.monotonic()
        result = Trainer(config, resume=False, callbacks=[ProgressEvents(with_request_facts)]).run_training()
        best = folder / "run" / "best.safetensors"
        atomic_write(request.output, lambda tmp: shutil.copyfile(best, tmp))
    emit({"event": "train_done", "model": str(Path(request.output).resolve()), "best_dice": result.best_dice,
          "steps": result.steps, "seconds": round(time.monotonic() - started, 2)})
    return dataclasses.replace(result, output=Path(request.output))
