"""Slice-wise inference of a 2D SAM2-UNet over a 3D :class:`Volume` (or a 2D image).

``Predictor.predict`` takes the volume apart along the chosen anatomical plane
(:func:`sam2unet_core.io.orientation.plane_view`), prepares each batch of slices as the
checkpoint says (intensity, 2.5D stacking, resize to the model input, mean/std), runs the
model, resizes the probabilities back to the slice size and writes labels straight into
the output volume. Memory stays at one uint8/uint16 label volume plus one batch; a float
probability volume exists only when ``return_probabilities=True``.

The model is injected: any ``predict_fn(batch (B, C, S, S) float) -> logits (B, N, S, S)``
works, so the engine is tested without SAM2-UNet and does no file I/O.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..device import autocast_dtype, describe_device, resolve_device
from ..io.orientation import PlaneView, plane_view
from ..io.volume import Volume, check_fits_in_memory, label_dtype
from ..metadata import ModelMetadata
from ..preprocessing import (
    IntensityMapping,
    apply_intensity,
    fit_intensity,
    normalize_channels,
    resize_batch,
    stack_slices,
    to_tensor,
)
from . import acceleration
from .postprocess import check_steps, postprocess_labels

__all__ = ["Predictor", "PredictFn", "ProgressFn", "StageTimes", "TTA_FLIPS"]

logger = logging.getLogger(__name__)

PredictFn = Callable[[torch.Tensor], torch.Tensor]  # (B, C, S, S) -> logits (B, N, S, S)
ProgressFn = Callable[[int, int], None]  # (slices done, slices to do)
TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (3,), (2,))  # none, left-right, up-down


@dataclass
class StageTimes:
    """Seconds spent in the last ``predict`` call, per stage."""

    preprocess: float = 0.0  # slice stacking, intensity, host-to-device copy, resize
    model: float = 0.0  # forward passes (TTA included), probabilities, resize back, labels
    postprocess: float = 0.0  # connected components, hole filling
    extra: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        return {"preprocess": self.preprocess, "model": self.model,
                "postprocess": self.postprocess, **self.extra}


class Predictor:
    """Run a SAM2-UNet (or any injected predict function) over volumes slice by slice.

    Args:
        model: a ``SAM2UNet`` module, a checkpoint path (``sam2unet_core.load_model``), or
            None when ``predict_fn`` is given.
        metadata: preprocessing and labels; defaults to ``model.metadata``. Required with
            ``predict_fn``.
        predict_fn: ``(B, C, S, S)`` float tensor on ``device`` -> logits ``(B, N, S, S)``;
            replaces the model (tests, other networks).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        batch_size: slices per forward pass.
        mixed_precision: fp16 autocast on CUDA (see ``device.autocast_dtype``); ignored elsewhere (fp32).
    """

    def __init__(
        self,
        model: nn.Module | str | Path | None = None,
        *,
        metadata: ModelMetadata | None = None,
        predict_fn: PredictFn | None = None,
        device: str | torch.device = "auto",
        batch_size: int = 8,
        mixed_precision: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.amp_dtype = autocast_dtype(self.device) if mixed_precision else None
        self.model: nn.Module | None = None
        self.acceleration: acceleration.AccelerationInfo | None = None  # CPU speed-ups applied
        if isinstance(model, (str, Path)):
            from ..checkpoint import load_model

            model = load_model(model, device="cpu")
        if model is not None:
            self.model = model.to(self.device).eval()
            self.acceleration = acceleration.accelerate_model(self.model, self.device)
            logger.info("model acceleration: %s", self.acceleration.describe())
            metadata = metadata or model.metadata
            predict_fn = predict_fn or self.model
        if predict_fn is None or metadata is None:
            raise ValueError("Predictor needs a model (or checkpoint path), or predict_fn "
                             "together with metadata")
        metadata.validate()
        self.metadata = metadata
        self.predict_fn = predict_fn
        self.last_times = StageTimes()
        logger.info("Predictor on %s", describe_device(self.device))

    @property
    def num_classes(self) -> int:
        return self.metadata.architecture.num_classes

    @property
    def label_dtype(self) -> np.dtype:
        """uint8, or uint16 for models with more than 255 labels."""
        return label_dtype(max(self.num_classes - 1, 1))

    # ------------------------------------------------------------------ model call
    def _probabilities(self, batch: torch.Tensor, tta: bool) -> torch.Tensor:
        """``(B, C, S, S)`` model input -> float32 probabilities ``(B, N, S, S)``;
        N = 1 (foreground) for binary models, else the softmax over all classes."""
        flips = TTA_FLIPS if tta else ((),)
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype)
                    if self.amp_dtype is not None else nullcontext())
        total = None
        with autocast:
            for dims in flips:
                x = torch.flip(batch, dims) if dims else batch
                logits = self.predict_fn(x)
                if logits.ndim != 4 or logits.shape[1] != self.num_classes:
                    raise ValueError(
                        f"the model returned shape {tuple(logits.shape)}; expected "
                        f"(B, {self.num_classes}, H, W) for num_classes={self.num_classes}"
                    )
                logits = logits.float()
                probs = torch.sigmoid(logits) if self.num_classes == 1 else logits.softmax(1)
                probs = torch.flip(probs, dims) if dims else probs
                total = probs if total is None else total + probs
        return total / len(flips)

    def _prepare(
        self, image: np.ndarray, start: int, end: int, mapping: IntensityMapping
    ) -> torch.Tensor:
        """View slices ``start:end`` of ``(S, H, W[, C])`` -> model input ``(B, C, S, S)`` on
        the device: stacking, copy of the raw values (pinned, asynchronous on CUDA), then
        intensity, resize and mean/std on the device."""
        meta = self.metadata
        stacked = stack_slices(image, range(start, end), meta.context_slices,
                               meta.architecture.in_channels)
        batch = to_tensor(stacked)  # (B, C, H, W), raw values (e.g. int16 HU)
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        else:
            batch = batch.to(self.device)
        batch = apply_intensity(batch, mapping)  # float32 on the device
        batch = resize_batch(batch, (meta.input_size, meta.input_size))
        return normalize_channels(batch, meta.mean, meta.std)

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """Queue a copy to the CPU; on CUDA it is asynchronous (pinned memory), so the
        caller must synchronise the stream before reading it."""
        return tensor.to("cpu", non_blocking=self.device.type == "cuda")

    def _labels(self, probs: torch.Tensor) -> torch.Tensor:
        """``(B, N, H, W)`` probabilities -> ``(B, H, W)`` integer labels."""
        if self.num_classes == 1:
            return (probs[:, 0] > 0.5).to(torch.uint8)
        # a narrow type before the copy to the host: 1 byte a pixel up to 256 classes
        return probs.argmax(1).to(torch.uint8 if self.num_classes <= 256 else torch.int32)

    # -------------------------------------------------------------------- volumes
    @torch.inference_mode()
    def predict(
        self,
        volume: Volume,
        axis: str = "axial",
        slice_range: tuple[int, int] | None = None,
        tta: bool = False,
        postprocess: Sequence[str] = (),
        return_probabilities: bool = False,
        progress: ProgressFn | None = None,
    ) -> Volume | tuple[Volume, Volume]:
        """Segment ``volume``; returns a label :class:`Volume` on the input's exact grid.

        Args:
            volume: ``(K, J, I)`` grey volume or ``(K, J, I, C)`` colour image.
            axis: ``axial``, ``coronal`` or ``sagittal``: the plane of the 2D slices, found
                from the direction matrix whatever the array order. 2D images (K == 1)
                are always processed as one slice.
            slice_range: ``(start, stop)``, half-open, indices along the voxel axis that
                runs across the chosen plane (as stored in the file); other slices get
                label 0. None: all slices.
            tta: average over horizontal and vertical flips (3 passes).
            postprocess: steps from ``POSTPROCESS_STEPS`` applied in order on the 3D
                labels (``largest_component``, ``fill_holes``), each label separately.
            return_probabilities: also return float32 probabilities on the grid:
                ``(K, J, I)`` foreground for binary models, ``(K, J, I, N)`` otherwise.
            progress: called as ``progress(done, total)`` after each batch.

        Labels are uint8, or uint16 for models with more than 255 labels.
        """
        meta = self.metadata
        times = StageTimes()
        check_steps(postprocess)  # before the model runs
        view = _plane_view(volume, axis)
        image = view.to_plane(volume.array_kji)  # (S, H, W[, C]), no copy
        num_slices, height, width = image.shape[:3]
        first, stop = _view_range(slice_range, num_slices, view)

        labels = np.zeros(volume.shape_kji, dtype=self.label_dtype)
        labels_view = view.to_plane(labels)  # writes land in `labels`
        out_channels = 1 if self.num_classes == 1 else self.num_classes
        probabilities = None
        if return_probabilities:
            check_fits_in_memory(
                volume.source or "volume", volume.shape_kji, 4 * out_channels,
                what=f"the labels and {out_channels}-channel float32 probabilities",
                advice="segment without probabilities (sam2unet-predict without "
                       "--save-probabilities)",
            )
            shape = volume.shape_kji if out_channels == 1 else volume.shape_kji + (out_channels,)
            probabilities = np.zeros(shape, dtype=np.float32)
        probabilities_view = None if probabilities is None else view.to_plane(probabilities)

        started = time.perf_counter()
        mapping = fit_intensity(volume.array_kji, meta.intensity)
        batches = [(start, min(start + self.batch_size, stop))
                   for start in range(first, stop, self.batch_size)]
        batch = self._prepare(image, *batches[0], mapping) if batches else None
        times.preprocess += time.perf_counter() - started
        for number, (start, end) in enumerate(batches):
            # One-deep pipeline: on CUDA the forward pass and the copies back are queued
            # asynchronously, the next batch is prepared on the CPU meanwhile, then we wait.
            tick = time.perf_counter()
            probs = resize_batch(self._probabilities(batch, tta), (height, width))
            labels_out = self._to_host(self._labels(probs))
            probs_out = None
            if probabilities_view is not None:
                channels_last = probs[:, 0] if out_channels == 1 else probs.permute(0, 2, 3, 1)
                probs_out = self._to_host(channels_last)
            queued = time.perf_counter()
            if number + 1 < len(batches):
                batch = self._prepare(image, *batches[number + 1], mapping)
            prepared = time.perf_counter()
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            labels_view[start:end] = labels_out.numpy()
            if probs_out is not None:
                probabilities_view[start:end] = probs_out.numpy()
            times.preprocess += prepared - queued
            times.model += (queued - tick) + (time.perf_counter() - prepared)
            if progress is not None:
                progress(end - first, stop - first)

        result = self._finish(volume, labels, probabilities, postprocess, times, view.plane)
        self.last_times = times
        return result

    @torch.inference_mode()
    def predict_images(
        self,
        images: Sequence[Volume],
        tta: bool = False,
        postprocess: Sequence[str] = (),
        return_probabilities: bool = False,
    ) -> list[Volume] | list[tuple[Volume, Volume]]:
        """Segment many 2D images (``K == 1``, e.g. endoscopy frames of any sizes) in shared
        batches of ``batch_size``, one result per image on its own grid; options as in
        :meth:`predict`. ``last_times`` covers the whole call."""
        check_steps(postprocess)
        for volume in images:
            if volume.shape_kji[0] != 1:
                raise ValueError(f"{volume.source}: predict_images takes 2D images, this one "
                                 f"has {volume.shape_kji[0]} slices; use predict")
        times = StageTimes()
        results = []
        for first in range(0, len(images), self.batch_size):
            group = images[first:first + self.batch_size]
            tick = time.perf_counter()
            batch = torch.cat([
                self._prepare(v.array_kji, 0, 1, fit_intensity(v.array_kji, self.metadata.intensity))
                for v in group
            ])
            tock = time.perf_counter()
            probs = self._probabilities(batch, tta)  # (B, N, S, S)
            for volume, image_probs in zip(group, probs):
                image_probs = resize_batch(image_probs[None], volume.shape_kji[1:3])  # (1, N, H, W)
                labels = self._labels(image_probs).cpu().numpy().astype(self.label_dtype)
                probabilities = None
                if return_probabilities:  # (1, H, W) foreground or (1, H, W, N)
                    kept = image_probs[:, 0] if self.num_classes == 1 else image_probs.permute(0, 2, 3, 1)
                    probabilities = kept.cpu().numpy()
                results.append((volume, labels, probabilities))
            times.preprocess += tock - tick
            times.model += time.perf_counter() - tock
        finished = [self._finish(v, lab, prob, postprocess, times, "axial")
                    for v, lab, prob in results]
        self.last_times = times
        return finished

    def _finish(
        self,
        volume: Volume,
        labels: np.ndarray,
        probabilities: np.ndarray | None,
        postprocess: Sequence[str],
        times: StageTimes,
        plane: str,
    ) -> Volume | tuple[Volume, Volume]:
        """Post-process ``(K, J, I)`` labels and wrap labels (and probabilities) as volumes
        on the input's grid."""
        if postprocess:
            tick = time.perf_counter()
            values = [label.value for label in self.metadata.labels]
            labels = postprocess_labels(labels, postprocess, values)
            times.postprocess += time.perf_counter() - tick
        result = volume.with_array(labels, meta={**volume.meta, "axis": plane})
        if probabilities is None:
            return result
        return result, volume.with_array(probabilities)

    @staticmethod
    def count_slices(
        volume: Volume, axis: str = "axial", slice_range: tuple[int, int] | None = None
    ) -> int:
        """How many slices ``predict`` will run for these arguments (checks the range)."""
        view = _plane_view(volume, axis)
        num_slices = volume.shape_kji[view.slice_array_axis]
        first, stop = _view_range(slice_range, num_slices, view)
        return stop - first


def _plane_view(volume: Volume, axis: str) -> PlaneView:
    """The slicing of ``volume`` along ``axis``; a 2D image (K == 1) is one axial slice."""
    if volume.shape_kji[0] == 1:
        return plane_view(np.eye(3), "axial")
    return plane_view(volume.direction_lps, axis)


def _view_range(
    slice_range: tuple[int, int] | None, num_slices: int, view: PlaneView
) -> tuple[int, int]:
    """Array-order ``(start, stop)`` -> view-order ``(first, stop)``, checked."""
    if slice_range is None:
        return 0, num_slices
    start, stop = (int(v) for v in slice_range)
    if not 0 <= start < stop <= num_slices:
        raise ValueError(
            f"slice range {start}:{stop} is outside the {num_slices} slices of this "
            f"volume along the {view.plane} axis (expected 0 <= start < stop <= "
            f"{num_slices})"
        )
    if view.slice_axis_flipped:
        return num_slices - stop, num_slices - start
    return start, stop
