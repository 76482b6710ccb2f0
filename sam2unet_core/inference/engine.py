"""Slice-wise inference of a 2D SAM2-UNet over a 3D :class:`Volume` (or a 2D image), with
no torch in this module.

``Predictor.predict`` takes the volume apart along an anatomical plane (the model's
``metadata.plane`` unless told otherwise; :func:`sam2unet_core.io.orientation.plane_view`),
cuts it into view-ordered batches of raw slices with numpy (``stack_slices``) and hands each
batch to a *model runner* (:class:`ModelRunner`: ``inference.torch_runner.TorchRunner``
for PyTorch, an ONNX Runtime one elsewhere), which prepares, runs and post-processes it
per slice. Labels go straight into the output volume. Memory stays at one uint8/uint16 label
volume plus one batch; a float probability volume exists only when asked for. The engine
does no file I/O: the model comes loaded (``sam2unet_core.checkpoint``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import numpy as np

from ..errors import OptionError
from ..io.orientation import PlaneView, check_planes, plane_view
from ..io.volume import Volume, check_fits_in_memory, model_label_dtype
from ..metadata import ModelMetadata, UntrainedModelError
from ..preprocessing import IntensityMapping, fit_intensity, labels_from_probabilities, stack_slices
from .agreement import PlaneAgreement, plane_agreement
from .postprocess import check_steps, postprocess_labels

if TYPE_CHECKING:
    import torch

__all__ = ["ModelRunner", "PendingBatch", "Prediction", "Predictor", "ProgressFn", "StageTimes"]

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]  # (slices done, slices to do)


class PendingBatch(Protocol):
    """A batch handed to :meth:`ModelRunner.submit`."""

    def result(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Wait for the batch; labels (B, H, W) (uint8, or uint16 past 255 labels) and, when
        asked, float32 probabilities (B, H, W) (binary foreground) or (B, H, W, N)."""


class ModelRunner(Protocol):
    """What the :class:`Predictor` needs from a backend (PyTorch, ONNX Runtime, ...)."""

    metadata: ModelMetadata  # labels, preprocessing, plane
    description: str  # one line for logs/summary, e.g. "cpu: CPU (2 threads), fp32"

    def submit(self, raw_batch: np.ndarray, mapping: IntensityMapping,
               out_size: tuple[int, int], tta: bool, probabilities: bool) -> PendingBatch:
        """raw_batch: (B, C, H, W) stacked raw voxel values (any numeric dtype), in the view
        order of io.orientation.PlaneView; applies intensity `mapping`, resize to the model's
        input size, mean/std, the network, (TTA flips), resize back to `out_size`, sigmoid /
        softmax and the label rule. May run asynchronously (CUDA); `result()` synchronises."""


@dataclass
class StageTimes:
    """Seconds spent per stage of one prediction."""

    preprocess: float = 0.0  # slice stacking on the CPU (the runner's preparation is "model")
    model: float = 0.0  # the runner: intensity, resize, forward passes (TTA), resize back, labels
    postprocess: float = 0.0  # connected components, hole filling
    extra: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        return {"preprocess": self.preprocess, "model": self.model,
                "postprocess": self.postprocess, **self.extra}


@dataclass
class Prediction:
    """The result of one :meth:`Predictor.predict`.

    ``labels``: ``(K, J, I)`` uint8/uint16 label volume on the input's exact grid (its
    ``meta["plane"]`` says which plane was segmented). ``probabilities``: float32 on the
    same grid, ``(K, J, I)`` foreground for binary models or ``(K, J, I, N)``, or None when
    not asked for. ``planes``: the planes the slices were cut along (several when fused);
    ``plane`` names them (``"axial+coronal+sagittal"``). ``times``: stage seconds (for
    :meth:`Predictor.predict_images`, this image's share of the shared batches).
    ``agreement``: how the planes' own labels agree, for a fused prediction; else None.
    """

    labels: Volume
    probabilities: Volume | None
    planes: tuple[str, ...]
    times: StageTimes
    agreement: PlaneAgreement | None = None

    @property
    def plane(self) -> str:
        return "+".join(self.planes)


class Predictor:
    """Run a model over volumes slice by slice.

    Args:
        runner_or_model: a :class:`ModelRunner`, or a loaded torch ``SAM2UNet`` (wrapped in
            ``TorchRunner(model, device=device, precision=precision)``, which works on its own
            copy: the model is not changed).
        batch_size: slices per runner call.
        device, precision: for the ``TorchRunner`` built around a torch model (precision
            ``auto``, ``fp32``, ``bf16`` or ``fp16``; see ``inference.acceleration``).
        allow_untrained: run a model whose decoder was never trained (a SAM 2 checkpoint read
            as a model; smoke tests only). Without it such a model raises
            :class:`~sam2unet_core.metadata.UntrainedModelError`.
    """

    def __init__(self, runner_or_model: ModelRunner | Any, batch_size: int = 8, *,
                 device: str | torch.device = "auto", precision: str = "auto",
                 allow_untrained: bool = False) -> None:
        if batch_size < 1:
            raise OptionError(f"batch_size must be >= 1, got {batch_size}", "batch_size", batch_size)
        metadata = getattr(runner_or_model, "metadata", None)
        if isinstance(metadata, ModelMetadata) and not metadata.decoder_trained and not allow_untrained:
            raise UntrainedModelError(metadata.untrained_reason())
        if not callable(getattr(runner_or_model, "submit", None)):
            from .torch_runner import TorchRunner  # torch only for torch models

            runner_or_model = TorchRunner(runner_or_model, device=device, precision=precision)
        self.runner: ModelRunner = runner_or_model
        self.metadata = self.runner.metadata
        self.metadata.validate()
        self.batch_size = batch_size

    @property
    def description(self) -> str:
        return self.runner.description

    @property
    def num_classes(self) -> int:
        return self.metadata.architecture.num_classes

    @property
    def label_dtype(self) -> np.dtype:
        """uint8, or uint16 for models with more than 255 labels."""
        return model_label_dtype(self.num_classes)

    def resolve_plane(self, volume: Volume, axis: str | None = None) -> str:
        """The plane ``predict`` segments: ``axis``, else the model's plane; a single slice
        (K == 1) is always its own (axial) plane. Logs a warning when an explicit ``axis``
        differs from the model's plane or cannot apply."""
        if volume.shape_kji[0] == 1:
            if axis not in (None, "axial"):
                logger.warning("%s: a single slice; the %s plane does not apply, its own plane "
                               "is segmented", volume.source or "image", axis)
            return "axial"
        if axis is None:
            return self.metadata.plane
        if axis not in self.metadata.trained_planes:
            logger.warning("slicing along the %s plane, but the model was trained on %s slices",
                           axis, "/".join(self.metadata.trained_planes))
        return axis

    def _stack(self, image: np.ndarray, start: int, end: int) -> np.ndarray:
        """View slices ``start:end`` of ``(S, H, W[, C])`` -> raw ``(B, C, H, W)``."""
        meta = self.metadata
        return stack_slices(image, range(start, end), meta.context_slices, meta.architecture.in_channels)

    def resolve_planes(self, volume: Volume, axis: str | None = None,
                       planes: Sequence[str] | None = None,
                       slice_range: tuple[int, int] | None = None) -> tuple[str, ...]:
        """The planes ``predict`` segments along: ``axis`` alone, else ``planes``, else every
        plane the model was trained on (``metadata.trained_planes``; its main plane alone
        with a ``slice_range``, which applies to one plane); a single slice is its own axial
        plane. ``ValueError`` for both ``axis`` and ``planes``, an unknown plane, or a
        ``slice_range`` with several ``planes``."""
        if axis is not None and planes:
            raise OptionError(f"axis {axis!r} and planes {list(planes)} both given; give one",
                              "planes", list(planes))
        if volume.shape_kji[0] == 1 or axis is not None:
            return (self.resolve_plane(volume, axis),)
        if slice_range is not None and planes and len(planes) > 1:
            raise OptionError(f"a slice range applies to one plane, not to the fused planes "
                              f"{list(planes)}; choose one plane", "slice_range", slice_range)
        chosen = tuple(planes) if planes else self.metadata.trained_planes[:1 if slice_range else None]
        check_planes(chosen)
        untrained = [plane for plane in chosen if plane not in self.metadata.trained_planes]
        if untrained:
            logger.warning("slicing along %s, but the model was trained on %s slices",
                           "/".join(untrained), "/".join(self.metadata.trained_planes))
        return chosen

    # -------------------------------------------------------------------- volumes
    def predict(
        self,
        volume: Volume,
        axis: str | None = None,
        slice_range: tuple[int, int] | None = None,
        tta: bool = False,
        postprocess: Sequence[str] = (),
        probabilities: bool = False,
        progress: ProgressFn | None = None,
        planes: Sequence[str] | None = None,
    ) -> Prediction:
        """Segment ``volume``; returns labels (and probabilities) on the input's exact grid.

        Args:
            volume: ``(K, J, I)`` grey volume or ``(K, J, I, C)`` colour image.
            axis: ``axial``, ``coronal`` or ``sagittal``: segment along this one plane, found
                from the direction matrix whatever the array order.
            planes: segment along each of these planes and fuse them (the mean of the
                per-class probabilities in the volume's grid, then the label rule).
                With neither ``axis`` nor ``planes``: every plane the model was trained on
                (``metadata.trained_planes``), fused when there are several. 2D images
                (K == 1) are always processed as one slice.
            slice_range: ``(start, stop)``, half-open, indices along the voxel axis that
                runs across the chosen plane (as stored in the file); other slices get
                label 0. None: all slices. One plane only: without ``axis``/``planes`` the
                model's main plane.
            tta: average over horizontal and vertical flips (3 passes per plane).
            postprocess: steps from ``POSTPROCESS_STEPS`` applied in order on the 3D
                labels (``largest_component``, ``fill_holes``), each label separately.
            probabilities: also return float32 probabilities on the grid:
                ``(K, J, I)`` foreground for binary models, ``(K, J, I, N)`` otherwise.
            progress: called as ``progress(done, total)`` after each batch (slices of all
                planes).

        Labels are uint8, or uint16 for models with more than 255 labels. A fused
        prediction carries the planes' agreement (:class:`PlaneAgreement`).
        """
        times = StageTimes()
        check_steps(postprocess)  # before the model runs
        chosen = self.resolve_planes(volume, axis, planes, slice_range)
        if len(chosen) > 1:
            return self._predict_fused(volume, chosen, tta, postprocess, probabilities, progress, times)
        plane = chosen[0]
        labels = np.zeros(volume.shape_kji, dtype=self.label_dtype)
        probability_array = self._probability_volume(volume) if probabilities else None
        self._run_plane(volume, plane, slice_range, tta, labels, probability_array, progress, times)
        return self._finish(volume, labels, probability_array, postprocess, times, (plane,))

    def _probability_volume(self, volume: Volume, extra_bytes: int = 0) -> np.ndarray:
        """Zeros for the float32 probabilities of ``volume``: ``(K, J, I)`` foreground for
        binary models, ``(K, J, I, N)`` otherwise (memory checked, with ``extra_bytes`` more
        per voxel for the caller's other arrays)."""
        out_channels = 1 if self.num_classes == 1 else self.num_classes
        fused = extra_bytes > 0
        check_fits_in_memory(
            volume.source or "volume", volume.shape_kji, 4 * out_channels + extra_bytes,
            what=f"the labels and {out_channels}-channel float32 probabilities"
                 + (" fused over the planes" if fused else ""),
            advice="segment along one plane" if fused else "segment without probabilities",
            field="axis" if fused else "probabilities", value=None if fused else False,
        )
        shape = volume.shape_kji if out_channels == 1 else volume.shape_kji + (out_channels,)
        return np.zeros(shape, dtype=np.float32)

    def _run_plane(self, volume: Volume, plane: str, slice_range: tuple[int, int] | None,
                   tta: bool, labels: np.ndarray, probabilities: np.ndarray | None,
                   progress: ProgressFn | None, times: StageTimes, add: bool = False) -> None:
        """Segment ``volume`` along ``plane`` into ``labels`` ``(K, J, I)`` and, when given,
        ``probabilities`` (written, or added to when ``add``), batch by batch."""
        view = _plane_view(volume, plane)
        image = view.to_plane(volume.array_kji)  # (S, H, W[, C]), no copy
        num_slices, height, width = image.shape[:3]
        first, stop = _view_range(slice_range, num_slices, view)
        labels_view = view.to_plane(labels)  # writes land in `labels`
        probabilities_view = None if probabilities is None else view.to_plane(probabilities)

        started = time.perf_counter()
        mapping = fit_intensity(volume.array_kji, self.metadata.intensity)
        batches = [(start, min(start + self.batch_size, stop))
                   for start in range(first, stop, self.batch_size)]
        stacked = self._stack(image, *batches[0]) if batches else None
        times.preprocess += time.perf_counter() - started
        for number, (start, end) in enumerate(batches):
            # One-deep pipeline: the runner may queue the batch asynchronously (CUDA); the
            # next batch is stacked on the CPU meanwhile, then we wait for the result.
            tick = time.perf_counter()
            pending = self.runner.submit(stacked, mapping, (height, width), tta,
                                         probabilities is not None)
            queued = time.perf_counter()
            if number + 1 < len(batches):
                stacked = self._stack(image, *batches[number + 1])
            prepared = time.perf_counter()
            batch_labels, batch_probabilities = pending.result()
            labels_view[start:end] = batch_labels
            if probabilities_view is not None and add:
                probabilities_view[start:end] += batch_probabilities
            elif probabilities_view is not None:
                probabilities_view[start:end] = batch_probabilities
            times.preprocess += prepared - queued
            times.model += (queued - tick) + (time.perf_counter() - prepared)
            if progress is not None:
                progress(end - first, stop - first)

    def _predict_fused(self, volume: Volume, planes: tuple[str, ...], tta: bool,
                       postprocess: Sequence[str], probabilities: bool,
                       progress: ProgressFn | None, times: StageTimes) -> Prediction:
        """Segment along each plane and fuse: the per-class probabilities of the planes are
        summed in the volume's grid (one float32 volume, not one per plane), averaged, and
        labelled with the runners' rule (``preprocessing.labels_from_probabilities``).
        Each plane's own labels are kept (1 or 2 bytes a voxel) for :func:`plane_agreement`."""
        votes = np.zeros((len(planes),) + volume.shape_kji, dtype=self.label_dtype)
        total = self._probability_volume(volume, extra_bytes=votes.itemsize * len(planes))
        counts = [volume.shape_kji[_plane_view(volume, plane).slice_array_axis] for plane in planes]
        for index, plane in enumerate(planes):
            done_before = sum(counts[:index])
            step = None if progress is None else (
                lambda done, _, before=done_before: progress(before + done, sum(counts)))
            self._run_plane(volume, plane, None, tta, votes[index], total, step, times, add=True)
        tick = time.perf_counter()
        total /= len(planes)
        by_class = total[:, np.newaxis] if total.ndim == 3 else np.moveaxis(total, -1, 1)  # (K, N, J, I)
        labels = labels_from_probabilities(by_class, self.num_classes)
        agreement = plane_agreement(votes, planes, volume, [label.value for label in self.metadata.labels])
        times.extra["fuse"] = time.perf_counter() - tick
        prediction = self._finish(volume, labels, total if probabilities else None, postprocess,
                                  times, planes)
        prediction.agreement = agreement
        return prediction

    def predict_images(
        self,
        images: Sequence[Volume],
        tta: bool = False,
        postprocess: Sequence[str] = (),
        probabilities: bool = False,
    ) -> list[Prediction]:
        """Segment many 2D images (``K == 1``, e.g. endoscopy frames of any sizes), one
        result per image on its own grid; options as in :meth:`predict`. Consecutive images
        of one size and intensity mapping share runner batches of up to ``batch_size``."""
        check_steps(postprocess)
        for volume in images:
            if volume.shape_kji[0] != 1:
                raise ValueError(f"{volume.source}: predict_images takes 2D images, this one "
                                 f"has {volume.shape_kji[0]} slices; predict it as a volume")
        results: list[Prediction] = []
        for group, mapping in _image_groups(images, self.batch_size, self.metadata.intensity):
            times = StageTimes()
            tick = time.perf_counter()
            stacked = np.concatenate([self._stack(v.array_kji, 0, 1) for v in group])
            tock = time.perf_counter()
            size = group[0].shape_kji[1:3]
            batch_labels, batch_probabilities = self.runner.submit(
                stacked, mapping, size, tta, probabilities).result()
            times.preprocess = (tock - tick) / len(group)
            times.model = (time.perf_counter() - tock) / len(group)
            for index, volume in enumerate(group):
                kept = None if batch_probabilities is None else batch_probabilities[index:index + 1]
                results.append(self._finish(volume, batch_labels[index:index + 1], kept,
                                            postprocess, StageTimes(times.preprocess, times.model),
                                            ("axial",)))
        return results

    def _finish(self, volume: Volume, labels: np.ndarray, probabilities: np.ndarray | None,
                postprocess: Sequence[str], times: StageTimes, planes: tuple[str, ...]) -> Prediction:
        """Post-process ``(K, J, I)`` labels and wrap labels (and probabilities) as volumes
        on the input's grid."""
        if postprocess:
            tick = time.perf_counter()
            values = [label.value for label in self.metadata.labels]
            labels = postprocess_labels(labels, postprocess, values)
            times.postprocess += time.perf_counter() - tick
        return Prediction(
            labels=volume.with_array(labels, meta={**volume.meta, "plane": "+".join(planes)}),
            probabilities=None if probabilities is None else volume.with_array(probabilities),
            planes=planes,
            times=times,
        )

    def count_slices(self, volume: Volume, axis: str | None = None,
                     slice_range: tuple[int, int] | None = None,
                     planes: Sequence[str] | None = None) -> int:
        """How many slices ``predict`` will run for these arguments (all planes; checks
        the range)."""
        total = 0
        for plane in self.resolve_planes(volume, axis, planes, slice_range):
            view = _plane_view(volume, plane)
            num_slices = volume.shape_kji[view.slice_array_axis]
            first, stop = _view_range(slice_range, num_slices, view)
            total += stop - first
        return total


def _image_groups(images: Sequence[Volume], batch_size: int, intensity: dict[str, Any]
                  ) -> list[tuple[list[Volume], IntensityMapping]]:
    """Runs of consecutive images with one shape and one intensity mapping, at most
    ``batch_size`` long, each with that mapping (one runner batch each)."""
    groups: list[tuple[list[Volume], IntensityMapping]] = []
    for volume in images:
        mapping = fit_intensity(volume.array_kji, intensity)
        if (groups and len(groups[-1][0]) < batch_size and groups[-1][1] == mapping
                and groups[-1][0][0].shape_kji == volume.shape_kji):
            groups[-1][0].append(volume)
        else:
            groups.append(([volume], mapping))
    return groups


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
        raise OptionError(
            f"slice range {start}:{stop} is outside the {num_slices} slices of this "
            f"volume along the {view.plane} axis (expected 0 <= start < stop <= "
            f"{num_slices})",
            "slice_range", [start, stop],
        )
    if view.slice_axis_flipped:
        return num_slices - stop, num_slices - start
    return start, stop
