"""Build the training and validation datasets of a config (polyp folders or volumes).

Deterministic loading and intensity normalisation are cached per case with MONAI
(``CacheDataset`` in memory, ``PersistentDataset`` on disk); slice choice, 2.5D stacking,
resizing and augmentation run per sample (see :mod:`.datasets` for the seeding).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.data.utils import pickle_hashing
from monai.transforms import Compose

from sam2unet_core.io.orientation import plane_view

from .config import TrainConfig
from .datasets import TrainingCase, SeededSamples, find_polyp_cases, read_volume_dataset, slice_plan, split_cases
from .transforms import (
    IntensityNormalized,
    LoadCased,
    NormalizeChannelsd,
    ResizeToNetworkd,
    StackSlicesd,
    ToPlaned,
    augmentation_transforms,
)

__all__ = ["TrainingData", "build_training_data"]

logger = logging.getLogger(__name__)


@dataclass
class TrainingData:
    train: SeededSamples  # items {"image": (C, n, n), "label": (1, n, n)}
    val: torch.utils.data.Dataset  # items as train plus "case": index into val_names
    val_names: list[str]
    num_classes: int  # model channels: 1 (binary) or K
    in_channels: int
    label_names: list[str]  # names of label values 1..K-1 (one name when binary)
    facts: dict[str, Any] = field(default_factory=dict)  # for the checkpoint's provenance


def _cached(cases: list[TrainingCase], transform: Compose, config: TrainConfig, part: str) -> torch.utils.data.Dataset:
    items = [c.as_dict() for c in cases]
    mode = config.data.cache
    if mode == "memory":
        return CacheDataset(items, transform, num_workers=config.data.num_workers or None,
                            copy_cache=False, progress=False)
    if mode == "disk":
        cache_dir = Path(config.data.cache_dir or Path(config.run.output) / "cache") / part
        cache_dir.mkdir(parents=True, exist_ok=True)
        # hash_transform: a change of loading/intensity settings makes new cache entries.
        return PersistentDataset(items, transform, cache_dir=cache_dir, hash_transform=pickle_hashing)
    return Dataset(items, transform)


class _PickImage:
    """Sample ``index`` is case ``index`` (2D sets: one sample per image and epoch)."""

    def __init__(self, base: torch.utils.data.Dataset) -> None:
        self.base = base

    def __call__(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        return dict(self.base[index])


class _PickSlice:
    """A random case, then with probability ``foreground_fraction`` a slice holding
    foreground (if the case has any), else any slice."""

    def __init__(self, base: torch.utils.data.Dataset, plan: list[tuple[int, np.ndarray]],
                 foreground_fraction: float) -> None:
        self.base, self.plan, self.foreground_fraction = base, plan, foreground_fraction

    def __call__(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        case = int(rng.integers(len(self.plan)))
        num_slices, foreground = self.plan[case]
        if len(foreground) and rng.random() < self.foreground_fraction:
            chosen = int(foreground[rng.integers(len(foreground))])
        else:
            chosen = int(rng.integers(num_slices))
        return {**self.base[case], "slice": chosen}


class _PickPlaneSlice:
    """Multi-planar training: a random case, a random plane of ``planes``, then a slice of
    that plane as :class:`_PickSlice` chooses it. The cases are cached in array order
    ``(K, J, I)`` with their direction; each sample views its case in the chosen plane
    (``io.orientation.plane_view``, as the engine does, no copy) before its slice is cut."""

    def __init__(self, base: torch.utils.data.Dataset, planes: tuple[str, ...],
                 foreground_fraction: float) -> None:
        self.base, self.planes, self.foreground_fraction = base, planes, foreground_fraction
        self.plan = {}  # (case, plane) -> (slices, slices with foreground)
        for case in range(len(base)):
            item = base[case]
            for plane in planes:
                label = plane_view(item["direction"], plane).to_plane(item["label"])
                self.plan[case, plane] = slice_plan([label])[0]

    def __call__(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        case = int(rng.integers(len(self.base)))
        plane = self.planes[int(rng.integers(len(self.planes)))]
        num_slices, foreground = self.plan[case, plane]
        if len(foreground) and rng.random() < self.foreground_fraction:
            chosen = int(foreground[rng.integers(len(foreground))])
        else:
            chosen = int(rng.integers(num_slices))
        item = self.base[case]
        view = plane_view(item["direction"], plane)
        return {"image": view.to_plane(item["image"]), "label": view.to_plane(item["label"]),
                "slice": chosen}


class _AllSlices(torch.utils.data.Dataset):
    """Every slice of every validation case, prepared without augmentation."""

    def __init__(self, base: torch.utils.data.Dataset, transform: Compose) -> None:
        self.base, self.transform = base, transform
        self.index = [(case, s) for case in range(len(base)) for s in range(base[case]["label"].shape[0])]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> dict[str, Any]:
        case, chosen = self.index[item]
        out = self.transform({**self.base[case], "slice": chosen})
        return {"image": out["image"], "label": out["label"], "case": case}


def _check_labels(labels: list[np.ndarray], cases: list[TrainingCase], num_values: int) -> None:
    for label, case in zip(labels, cases):
        values = np.unique(label)
        if values.min() < 0 or values.max() >= num_values:
            raise ValueError(f"{case.label} holds label values {values.tolist()}; dataset.json "
                             f"declares values 0..{num_values - 1}")


def _picture_data(config: TrainConfig) -> TrainingData:
    """Image/mask folders (PraNet layout): one sample per image and epoch, cached at
    network size; binary, 3 channels."""
    data, seed = config.data, config.run.seed
    cases = find_polyp_cases(data.root)
    if data.val_root:
        train_cases, val_cases = cases, find_polyp_cases(data.val_root)
    else:
        train_cases, val_cases = split_cases(cases, data.val_fraction, seed)
    in_channels = data.network_channels()
    load = Compose([LoadCased(True), IntensityNormalized(data.intensity), StackSlicesd(0, in_channels),
                    ResizeToNetworkd(data.input_size)])
    logger.info("loading %d training and %d validation cases", len(train_cases), len(val_cases))
    train_base = _cached(train_cases, load, config, "train")
    val_base = _cached(val_cases, load, config, "val")
    normalize = NormalizeChannelsd(data.mean, data.std)
    train_side = config.augment.train_size or data.input_size
    rescale = [ResizeToNetworkd(train_side)] if train_side != data.input_size else []
    train = SeededSamples(len(train_base), _PickImage(train_base),
                          Compose([*rescale, *augmentation_transforms(config.augment), normalize]), seed)
    facts = {"dataset": str(Path(data.root).resolve()), "plane": None, "planes": None,
             "train_cases": [c.name for c in train_cases], "val_cases": [c.name for c in val_cases]}
    return TrainingData(train, _AllSlices(val_base, Compose([normalize])), [c.name for c in val_cases], 1,
                        in_channels, config.model.label_names or ["polyp"], facts)


def _volume_data(config: TrainConfig) -> TrainingData:
    """An nnU-Net/MSD dataset folder: seeded 2D (2.5D) slices of the training volumes in the
    model's plane(s), foreground-aware; validation on every main-plane slice."""
    data, seed = config.data, config.run.seed
    dataset = read_volume_dataset(data.root)
    train_cases, val_cases = split_cases(dataset.cases, data.val_fraction, seed, data.val_cases)
    num_values = len(dataset.label_names)
    context, in_channels = data.context_slices, data.network_channels()
    preprocessing = data.preprocessing()
    planes = tuple(preprocessing["planes"]) or (preprocessing["plane"],)
    load = [LoadCased(False), IntensityNormalized(data.intensity)]
    # Cached in their main plane; with several planes the training cases stay in array order
    # and each sample views its case in a random plane (_PickPlaneSlice). Validation (model
    # choice) uses the main plane.
    in_plane = [ToPlaned(planes[0])]
    logger.info("loading %d training and %d validation cases", len(train_cases), len(val_cases))
    train_base = _cached(train_cases, Compose(load + (in_plane if len(planes) == 1 else [])), config, "train")
    val_base = _cached(val_cases, Compose(load + in_plane), config, "val")
    # Read once: with data.cache=none every base[i] loads the volume again.
    train_labels = [train_base[i]["label"] for i in range(len(train_base))]
    _check_labels(train_labels, train_cases, num_values)
    _check_labels([val_base[i]["label"] for i in range(len(val_base))], val_cases, num_values)
    if len(planes) == 1:
        plan = slice_plan(train_labels)
        pick: Any = _PickSlice(train_base, plan, data.foreground_fraction)
    else:
        pick = _PickPlaneSlice(train_base, planes, data.foreground_fraction)
        plan = [pick.plan[case, planes[0]] for case in range(len(train_base))]
    normalize = NormalizeChannelsd(data.mean, data.std)
    stack = StackSlicesd(context, in_channels)
    train_side = config.augment.train_size or data.input_size
    train = SeededSamples(data.samples_per_epoch or sum(n for n, _ in plan), pick,
                          Compose([stack, ResizeToNetworkd(train_side), *augmentation_transforms(config.augment),
                                   normalize]), seed)
    val = _AllSlices(val_base, Compose([stack, ResizeToNetworkd(data.input_size), normalize]))
    facts = {"dataset": str(Path(data.root).resolve()), "plane": planes[0], "planes": list(planes),
             "train_cases": [c.name for c in train_cases], "val_cases": [c.name for c in val_cases]}
    num_classes = 1 if num_values == 2 else num_values
    return TrainingData(train, val, [c.name for c in val_cases], num_classes, in_channels,
                        dataset.label_names[1:], facts)


BUILDERS = {"polyp": _picture_data, "volume": _volume_data}  # data.kind -> builder


def build_training_data(config: TrainConfig) -> TrainingData:
    """Datasets of ``config.data`` (see the module docstring)."""
    return BUILDERS[config.data.kind](config)
