"""Input preparation shared by inference and training: intensity normalisation, 2.5D slice
stacks, per-channel mean/std and resizing. Pure functions on numpy arrays / torch tensors.

The ``intensity`` specs are those of :class:`sam2unet_core.metadata.ModelMetadata`. Per-volume
statistics (percentiles, mean/std) are computed once with :func:`fit_intensity` and then
applied batch by batch with :func:`apply_intensity`, so a large volume is never copied to
float as a whole.

numpy-only functions (``fit_intensity``, ``stack_slices``, the numpy path of
``apply_intensity``) import no torch: the backend-neutral ``Predictor`` uses them. The
tensor functions import torch when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "TTA_FLIPS",
    "labels_from_probabilities",
    "IntensityMapping",
    "fit_intensity",
    "apply_intensity",
    "to_tensor",
    "normalize_intensity",
    "context_indices",
    "stack_slices",
    "normalize_channels",
    "resize_batch",
]

MAX_STATISTICS_SAMPLES = 4_000_000  # voxels used for percentiles / mean / std


@dataclass(frozen=True)
class IntensityMapping:
    """``y = (x - offset) / scale``, then clipped to [0, 1] when ``clip``."""

    offset: float
    scale: float
    clip: bool


def _sample(array: np.ndarray) -> np.ndarray:
    """A deterministic, evenly strided subset of at most MAX_STATISTICS_SAMPLES finite
    values (NaN padding of resampled MR is left out)."""
    flat = array.ravel(order="K")  # a view for transposed (nibabel) arrays
    step = max(1, flat.size // MAX_STATISTICS_SAMPLES)
    values = flat[::step].astype(np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError("the image holds no finite values (all NaN or infinite)")
    return values


def fit_intensity(array: np.ndarray, intensity: dict[str, Any]) -> IntensityMapping:
    """Derive the mapping of one volume (any shape) from an ``intensity`` spec.

    * ``ct_window`` (center c, width w): ``(x - (c - w/2)) / w``, clipped.
    * ``percentile`` (lower, upper in %): the volume's percentiles map to 0 and 1, clipped.
    * ``zscore``: ``(x - mean) / std`` of the volume, not clipped.
    * ``scale`` (divisor): ``x / divisor``, not clipped.
    """
    kind = intensity.get("kind")
    if kind == "ct_window":
        center, width = float(intensity["center"]), float(intensity["width"])
        if width <= 0:
            raise ValueError(f"ct_window width must be > 0, got {width}")
        return IntensityMapping(center - width / 2, width, clip=True)
    if kind == "percentile":
        low, high = np.percentile(
            _sample(array), [float(intensity["lower"]), float(intensity["upper"])]
        )
        return IntensityMapping(float(low), float(max(high - low, 1e-6)), clip=True)
    if kind == "zscore":
        values = _sample(array)
        return IntensityMapping(float(values.mean()), float(max(values.std(), 1e-6)), clip=False)
    if kind == "scale":
        return IntensityMapping(0.0, float(intensity["divisor"]), clip=False)
    raise ValueError(f"unknown intensity kind {kind!r}; expected ct_window, percentile, "
                     "zscore or scale")


def apply_intensity(
    array: np.ndarray | torch.Tensor, mapping: IntensityMapping
) -> np.ndarray | torch.Tensor:
    """Apply ``mapping`` to a numpy array or a torch tensor (on any device) of any shape;
    returns float32 of the same shape and kind. Non-finite voxels (NaN, +-Inf: no
    measurement) become 0, the low end; unclipped mappings would otherwise pass +-3e38 on."""
    if not isinstance(array, np.ndarray):  # a torch tensor
        import torch

        out = torch.nan_to_num_((array.float() - mapping.offset) / mapping.scale,
                                nan=0.0, posinf=0.0, neginf=0.0)
        return out.clamp_(0.0, 1.0) if mapping.clip else out
    out = (np.asarray(array, dtype=np.float32) - np.float32(mapping.offset)) / np.float32(
        mapping.scale
    )
    np.nan_to_num(out, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    if mapping.clip:
        np.clip(out, 0.0, 1.0, out=out)
    return out


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """numpy -> CPU tensor without a float copy where torch has the dtype (int16 CT stays
    2 bytes a voxel on its way to the GPU); big-endian and unsigned 16/32/64-bit data are
    converted to native types torch supports."""
    import torch

    dtype = array.dtype.newbyteorder("=")
    if dtype.kind == "u" and dtype.itemsize > 1:  # uint64 as float64: int64 would wrap
        dtype = np.dtype({2: np.int32, 4: np.int64}.get(dtype.itemsize, np.float64))
    elif dtype.kind not in "uif" or dtype == np.float16:
        dtype = np.dtype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(array, dtype=dtype))


def normalize_intensity(array: np.ndarray, intensity: dict[str, Any]) -> np.ndarray:
    """Fit and apply in one call (for slices or small volumes); float32, same shape."""
    return apply_intensity(array, fit_intensity(array, intensity))


def context_indices(centers: Sequence[int], context: int, num_slices: int) -> np.ndarray:
    """Slice indices ``(B, 2*context+1)`` around each center, clamped at the volume edges
    (edge slices are repeated), ordered from ``center - context`` to ``center + context``."""
    offsets = np.arange(-context, context + 1)
    return np.clip(np.asarray(centers)[:, np.newaxis] + offsets, 0, num_slices - 1)


def stack_slices(
    slices: np.ndarray, centers: Sequence[int], context: int, in_channels: int
) -> np.ndarray:
    """Build model channels from a stack of 2D slices.

    Args:
        slices: ``(S, H, W)`` grey slices, or ``(S, H, W, C)`` colour images.
        centers: indices of the B slices to predict.
        context: c neighbours on each side (2.5D); the channels are slices
            ``center-c .. center+c``.
        in_channels: channels the model expects. Grey input with ``2c+1 == 1`` and
            ``in_channels == 3`` repeats the slice three times.

    Returns:
        ``(B, in_channels, H, W)`` array of the slices' dtype.
    """
    if slices.ndim == 4:  # colour: channels come from the pixels
        if slices.shape[3] != 3:
            raise ValueError(
                f"the voxels have {slices.shape[3]} components (a complex-valued image, such as "
                "MR real/imaginary data, or a multi-channel image), not one grey value or RGB "
                "colour; save one channel or the magnitude as a grey image"
            )
        if context != 0 or slices.shape[3] != in_channels:
            raise ValueError(
                f"colour images have {slices.shape[3]} channels; the model takes "
                f"in_channels={in_channels} with context_slices={context} (a colour model "
                f"needs in_channels=3 and context_slices=0)"
            )
        return np.moveaxis(slices[np.asarray(centers)], 3, 1)  # (B, H, W, C) -> (B, C, H, W)
    stack = slices[context_indices(centers, context, slices.shape[0])]  # (B, 2c+1, H, W)
    if stack.shape[1] == in_channels:
        return stack
    if stack.shape[1] == 1 and in_channels == 3:
        return np.repeat(stack, 3, axis=1)
    raise ValueError(
        f"{2 * context + 1} stacked slices cannot feed a model with {in_channels} channels"
    )


def normalize_channels(
    batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """``(batch - mean) / std`` per channel of a ``(B, C, H, W)`` tensor; no-op when empty."""
    if not mean:
        return batch
    import torch

    shape = (1, len(mean), 1, 1)
    mean_t = torch.as_tensor(mean, dtype=batch.dtype, device=batch.device).view(shape)
    std_t = torch.as_tensor(std, dtype=batch.dtype, device=batch.device).view(shape)
    return (batch - mean_t) / std_t


def resize_batch(batch: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``(B, C, H, W)`` to ``(B, C, *size)`` (align_corners=False);
    returns the input unchanged when it already has that size."""
    if tuple(batch.shape[-2:]) == tuple(size):
        return batch
    import torch.nn.functional as F

    return F.interpolate(batch, size=size, mode="bilinear", align_corners=False)


TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (3,), (2,))  # of (B, C, H, W): none, left-right, up-down


def labels_from_probabilities(probabilities: np.ndarray, num_classes: int) -> np.ndarray:
    """The label rule in numpy: ``(B, N, H, W)`` probabilities -> ``(B, H, W)`` labels,
    foreground > 0.5 for binary models (N = 1), else the argmax; uint8, or uint16 past
    255 labels."""
    from .io.volume import model_label_dtype

    if num_classes == 1:
        return (probabilities[:, 0] > 0.5).astype(np.uint8)
    return probabilities.argmax(1).astype(model_label_dtype(num_classes))
