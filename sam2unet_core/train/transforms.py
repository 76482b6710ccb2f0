"""MONAI dictionary transforms for training: loading, core preprocessing, augmentation.

The input preparation is the core's (``sam2unet_core.preprocessing``), wrapped in MONAI
``MapTransform``s, so training sees exactly what inference feeds the model:
intensity per volume -> plane view -> 2.5D slice stack -> bilinear resize -> per-channel
mean/std.
Augmentation runs between the resize and the mean/std step.

Sample dicts hold ``"image"`` and ``"label"``:
    * loaded: volumes ``(K, J, I)``, colour pictures ``(1, H, W, 3)``, grey ``(1, H, W)``;
    * after :class:`ToPlaned` (volumes): image ``(S, A, B)`` = slices of the chosen plane as
      the inference engine sees them, label ``(S, A, B)`` int64;
    * after :class:`StackSlicesd`: image ``(C, A, B)`` float32, label ``(1, A, B)``;
    * after :class:`ResizeToNetworkd`: ``(C, n, n)`` and ``(1, n, n)`` torch tensors.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import (
    MapTransform,
    RandAdjustContrastd,
    RandFlipd,
    RandRotated,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    RandZoomd,
    Transform,
)

from sam2unet_core.io.orientation import PLANES, plane_view
from sam2unet_core.io.readers import read_volume
from sam2unet_core.preprocessing import normalize_channels, normalize_intensity, resize_batch, stack_slices

from .config import AugmentConfig

__all__ = [
    "LoadCased",
    "IntensityNormalized",
    "ToPlaned",
    "StackSlicesd",
    "ResizeToNetworkd",
    "NormalizeChannelsd",
    "augmentation_transforms",
]


class LoadCased(MapTransform):
    """Read an image/label pair with ``sam2unet_core.io``.

    Pictures (PNG/JPEG, K == 1) keep a colour axis: image ``(1, H, W[, 3])``; the mask
    becomes {0, 1}: pixels > 128 as in the evaluation (> 0 for 0/1 masks), any channel of
    an RGB mask.
    Volumes: image ``(K, J, I)`` float32, label ``(K, J, I)`` int64, and ``"direction"``
    (the image's LPS direction matrix) for :class:`ToPlaned`.
    """

    def __init__(self, picture: bool) -> None:
        super().__init__(keys=("image", "label"))
        self.picture = picture

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image, label = read_volume(d["image"]), read_volume(d["label"])
        if image.shape_kji != label.shape_kji:
            raise ValueError(f"label {d['label']} has shape {label.shape_kji}, image {d['image']} has {image.shape_kji}")
        labels = label.array_kji
        if self.picture:
            mask = labels.max(axis=-1) if labels.ndim == 4 else labels  # (1, H, W)
            d["image"] = image.array_kji.astype(np.float32)
            d["label"] = (mask > (128 if mask.max() > 1 else 0)).astype(np.int64)
            return d
        if image.num_channels != 1:
            raise ValueError(f"{d['image']} has {image.num_channels} channels; training takes one "
                             "modality per volume (write one channel per image file)")
        if labels.ndim != 3 or not np.allclose(labels, np.round(labels)):
            raise ValueError(f"{d['label']} is not a label map (one channel of integer values expected)")
        d["image"] = image.array_kji.astype(np.float32)
        d["label"] = np.round(labels).astype(np.int64)
        d["direction"] = image.direction_lps
        return d


class ToPlaned(MapTransform):
    """View ``(K, J, I)`` volumes as ``(slice, row, column)`` stacks of an anatomical plane,
    exactly as the inference engine does (``io.orientation.plane_view`` from the direction
    matrix). Runs after :class:`IntensityNormalized`, which (like the engine) fits its
    statistics on the KJI array."""

    def __init__(self, plane: str = "axial") -> None:
        super().__init__(keys=("image", "label"))
        if plane not in PLANES:
            raise ValueError(f"plane must be one of {sorted(PLANES)}, got {plane!r}")
        self.plane = plane

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        view = plane_view(d.pop("direction"), self.plane)
        d["image"] = np.ascontiguousarray(view.to_plane(d["image"]))
        d["label"] = np.ascontiguousarray(view.to_plane(d["label"]))
        return d


class IntensityNormalized(MapTransform):
    """Map the whole image to about [0, 1] with the core's ``intensity`` rule."""

    def __init__(self, intensity: dict[str, Any]) -> None:
        super().__init__(keys=("image",))
        self.intensity = dict(intensity)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        d["image"] = normalize_intensity(d["image"], self.intensity)
        return d


class StackSlicesd(MapTransform):
    """Cut slice ``d["slice"]`` (0 for pictures) out of a loaded image as model channels
    (core ``stack_slices``: 2c+1 neighbours, edge slices repeated; a grey slice repeated to
    3 channels for 3-channel models) and the matching label slice ``(1, A, B)``."""

    def __init__(self, context_slices: int, in_channels: int) -> None:
        super().__init__(keys=("image", "label"))
        self.context_slices, self.in_channels = context_slices, in_channels

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        index = int(d.get("slice", 0))
        d["image"] = np.ascontiguousarray(stack_slices(d["image"], [index], self.context_slices, self.in_channels)[0])
        d["label"] = np.ascontiguousarray(d["label"][index][np.newaxis])
        return d


class ResizeToNetworkd(Transform):
    """Resize to ``size x size``: image bilinear (core ``resize_batch``), label nearest.
    Returns float32 torch tensors ``(C, n, n)`` and ``(1, n, n)``."""

    def __init__(self, size: int) -> None:
        self.size = (size, size)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = torch.as_tensor(np.asarray(d["image"]), dtype=torch.float32)[None]
        label = torch.as_tensor(np.asarray(d["label"]), dtype=torch.float32)[None]
        d["image"] = resize_batch(image, self.size)[0]
        d["label"] = F.interpolate(label, size=self.size, mode="nearest")[0]
        return d


class NormalizeChannelsd(Transform):
    """Per-channel ``(x - mean) / std`` of the image (core ``normalize_channels``); the last
    step: image and label leave it as plain float32 tensors."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        self.mean, self.std = list(mean), list(std)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        # MONAI's random transforms return MetaTensors: back to plain tensors for collation.
        image = torch.as_tensor(d["image"], dtype=torch.float32).as_subclass(torch.Tensor)
        d["image"] = normalize_channels(image[None], self.mean, self.std)[0]
        d["label"] = torch.as_tensor(d["label"], dtype=torch.float32).as_subclass(torch.Tensor)
        return d


def augmentation_transforms(aug: AugmentConfig) -> list[MapTransform]:
    """Random flips, rotation, zoom and intensity changes of ``(C, n, n)`` samples at network
    size (intensities about [0, 1]), then a random ``(C, crop_size, crop_size)`` window when
    ``crop_size`` is set; labels follow spatial changes with nearest sampling."""
    keys = ("image", "label")
    steps: list[MapTransform] = []
    if aug.flip_prob > 0:
        steps += [RandFlipd(keys, prob=aug.flip_prob, spatial_axis=0), RandFlipd(keys, prob=aug.flip_prob, spatial_axis=1)]
    if aug.rotate_deg > 0:
        steps.append(RandRotated(keys, range_x=float(np.deg2rad(aug.rotate_deg)), prob=0.5,
                                 mode=("bilinear", "nearest"), padding_mode="zeros"))
    if aug.scale_range > 0:
        steps.append(RandZoomd(keys, prob=0.5, min_zoom=1 - aug.scale_range, max_zoom=1 + aug.scale_range,
                               mode=("bilinear", "nearest"), padding_mode="constant"))
    if aug.intensity_prob > 0:
        steps += [
            RandScaleIntensityd("image", factors=0.1, prob=aug.intensity_prob),
            RandShiftIntensityd("image", offsets=0.1, prob=aug.intensity_prob),
            RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=aug.intensity_prob),
        ]
    if aug.crop_size:
        steps.append(RandSpatialCropd(keys, roi_size=(aug.crop_size, aug.crop_size), random_size=False))
    return steps
