"""Training data: find cases on disk and serve deterministic, seeded 2D samples.

Layouts:
    * polyp (PraNet convention of the SAM2-UNet paper): ``<root>/images/*`` and
      ``<root>/masks/*`` paired by file name without ending (``1.jpg`` <-> ``1.png``);
      e.g. ``TrainDataset`` or ``TestDataset/Kvasir``.
    * volume (nnU-Net v2 / Medical Segmentation Decathlon): ``<root>/dataset.json``,
      ``<root>/imagesTr/CASE_0000.nii.gz`` (or the MSD ``training`` list) and
      ``<root>/labelsTr/CASE.nii.gz``.

Every sample is a pure function of ``(seed, epoch, index)``: the item choice (which slice of
which volume) and the random augmentation are seeded from it. So results do not depend on
the number of workers or processes, and a resumed run can skip the batches it has done.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose

from sam2unet_core.io.cases import find_cases
from sam2unet_core.io.readers import split_suffix

__all__ = [
    "TrainingCase",
    "VolumeDataset",
    "find_polyp_cases",
    "read_volume_dataset",
    "split_cases",
    "SeededSamples",
    "slice_plan",
]


@dataclass
class TrainingCase:
    """One training case: an image file and its label (mask) file (inference reads
    ``io.cases.Case``: a name and one input)."""

    name: str
    image: Path
    label: Path

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "image": str(self.image), "label": str(self.label)}


@dataclass
class VolumeDataset:
    """The parts of a ``dataset.json`` training uses."""

    root: Path
    cases: list[TrainingCase]
    label_names: list[str]  # names of label values 0..K-1 (0 = background)
    channel_names: list[str]


def _files_by_case(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder (expected the PraNet layout images/ + masks/)")
    return {case.name: case.path for case in find_cases(folder)}


def find_polyp_cases(root: str | Path) -> list[TrainingCase]:
    """Image/mask pairs of ``<root>/images`` and ``<root>/masks``, sorted by name.

    Raises ``ValueError`` listing images without masks and masks without images.
    """
    root = Path(root)
    images, masks = _files_by_case(root / "images"), _files_by_case(root / "masks")
    no_mask, no_image = sorted(set(images) - set(masks)), sorted(set(masks) - set(images))
    if no_mask or no_image:
        raise ValueError(
            f"{root}: {len(no_mask)} images have no mask in masks/ (e.g. {no_mask[:5]}), "
            f"{len(no_image)} masks have no image in images/ (e.g. {no_image[:5]})"
        )
    return [TrainingCase(name, images[name], masks[name]) for name in sorted(images)]


def _label_names(labels: dict[str, Any], path: Path) -> list[str]:
    """``{"0": "background", "1": "liver"}`` (MSD) or ``{"background": 0, "liver": 1}`` (v2)."""
    by_value: dict[int, str] = {}
    for key, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise ValueError(f"{path}: region labels ({key}: {value}) are not supported; use plain label values")
        number, name = (int(key), str(value)) if str(key).isdigit() else (int(value), str(key))
        by_value[number] = name
    if sorted(by_value) != list(range(len(by_value))) or len(by_value) < 2:
        raise ValueError(f"{path}: label values must be 0..K-1 with K >= 2, got {sorted(by_value)}")
    return [by_value[v] for v in range(len(by_value))]


def read_volume_dataset(root: str | Path) -> VolumeDataset:
    """Parse ``<root>/dataset.json`` and list the training cases that exist on disk."""
    root = Path(root)
    path = root / "dataset.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err
    if "labels" not in meta:
        raise ValueError(f"{path} has no 'labels' entry")
    label_names = _label_names(meta["labels"], path)
    channels = meta.get("channel_names", meta.get("modality", {"0": "image"}))
    channel_names = [str(channels[k]) for k in sorted(channels, key=int)]
    if "training" in meta:  # MSD: explicit list, image paths without the channel suffix
        cases = []
        for entry in meta["training"]:
            image, label = root / entry["image"], root / entry["label"]
            cases.append(TrainingCase(split_suffix(label)[0], image, label))
    else:  # nnU-Net v2: labelsTr/CASE<ending> with imagesTr/CASE_0000<ending>
        ending = meta.get("file_ending", ".nii.gz")
        cases = [
            TrainingCase(split_suffix(label)[0], root / "imagesTr" / f"{split_suffix(label)[0]}_0000{ending}", label)
            for label in sorted((root / "labelsTr").glob(f"*{ending}"))
        ]
    missing = [str(p) for c in cases for p in (c.image, c.label) if not p.exists()]
    if missing:
        raise ValueError(f"{path}: {len(missing)} listed files do not exist, e.g. {missing[:3]}")
    if not cases:
        raise ValueError(f"{root}: no training cases (dataset.json 'training' or labelsTr/*)")
    return VolumeDataset(root, cases, label_names, channel_names)


def split_cases(cases: Sequence[TrainingCase], val_fraction: float, seed: int,
                val_names: Sequence[str] = ()) -> tuple[list[TrainingCase], list[TrainingCase]]:
    """Split into (train, val): the named cases, else a seeded random ``val_fraction``
    (at least one case); ``val_fraction`` 0 validates on the training cases themselves (a
    check of the fit when there are too few cases to hold one out)."""
    if val_names:
        unknown = sorted(set(val_names) - {c.name for c in cases})
        if unknown:
            raise ValueError(f"validation cases {unknown} are not in the dataset")
        return [c for c in cases if c.name not in val_names], [c for c in cases if c.name in val_names]
    if val_fraction == 0:
        return list(cases), list(cases)
    if len(cases) < 2:
        raise ValueError(f"need at least 2 cases to hold one out for validation, got {len(cases)}")
    n_val = min(len(cases) - 1, max(1, round(val_fraction * len(cases))))
    order = np.random.default_rng(seed).permutation(len(cases))
    val_idx = set(order[:n_val].tolist())
    return ([c for i, c in enumerate(cases) if i not in val_idx], [c for i, c in enumerate(cases) if i in val_idx])


def slice_plan(labels: Sequence[np.ndarray]) -> list[tuple[int, np.ndarray]]:
    """Per volume ``(number of slices, indices of slices with foreground)``; volumes are
    ``(S, A, B)`` label arrays with the slicing axis first."""
    return [(int(lab.shape[0]), np.flatnonzero(lab.reshape(lab.shape[0], -1).any(axis=1))) for lab in labels]


class SeededSamples(torch.utils.data.Dataset):
    """``length`` samples per epoch; sample ``i`` of epoch ``e`` is
    ``transform(pick(rng))`` with ``rng`` seeded by ``(seed, e, i)``.

    Args:
        pick: ``(index, rng) -> dict`` sample before the random transforms.
        transform: MONAI ``Compose`` of (random) transforms; seeded per sample.
    """

    def __init__(self, length: int, pick: Callable[[int, np.random.Generator], dict[str, Any]],
                 transform: Compose, seed: int) -> None:
        self.length, self.pick, self.transform, self.seed = length, pick, transform, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        sample = self.pick(index, rng)
        self.transform.set_random_state(seed=int(rng.integers(2**31 - 1)))
        out = self.transform(sample)
        return {"image": out["image"], "label": out["label"]}
