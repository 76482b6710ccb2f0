"""The PyTorch model runner: all torch work of inference happens here.

:class:`TorchRunner` implements the :class:`~sam2unet_core.inference.engine.ModelRunner`
contract for a loaded ``SAM2UNet`` (another ``nn.Module``, or any callable ``(B, C, S, S)``
tensor -> logits ``(B, N, S, S)`` with its metadata, e.g. in tests). A batch goes: raw values -> tensor
(pinned, asynchronous copy on CUDA) -> intensity mapping -> resize to the model input ->
mean/std -> forward passes (TTA flips) -> sigmoid/softmax -> resize back -> labels; the
copies back to the host are queued asynchronously on CUDA and ``result()`` synchronises,
so the engine prepares the next batch on the CPU meanwhile.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..device import describe_device, resolve_device
from ..io.volume import model_label_dtype
from ..metadata import ModelMetadata
from ..preprocessing import TTA_FLIPS, IntensityMapping, apply_intensity, normalize_channels, resize_batch, to_tensor
from . import acceleration

__all__ = ["TorchRunner", "TorchPendingBatch", "TTA_FLIPS"]

logger = logging.getLogger(__name__)

ForwardFn = Callable[[torch.Tensor], torch.Tensor]  # (B, C, S, S) -> logits (B, N, S, S)


class TorchPendingBatch:
    """A batch queued by :meth:`TorchRunner.submit`; :meth:`result` waits for it."""

    def __init__(self, device: torch.device, labels: torch.Tensor, probabilities: torch.Tensor | None,
                 dtype: np.dtype) -> None:
        self._device = device
        self._labels = labels
        self._probabilities = probabilities
        self._dtype = dtype

    def result(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Labels ``(B, H, W)`` (uint8, or uint16 past 255 labels) and float32 probabilities
        ``(B, H, W)`` (binary foreground) or ``(B, H, W, N)``, or None when not asked for."""
        if self._device.type == "cuda":
            torch.cuda.current_stream(self._device).synchronize()
        labels = self._labels.numpy().astype(self._dtype, copy=False)
        probabilities = None if self._probabilities is None else self._probabilities.numpy()
        return labels, probabilities


class TorchRunner:
    """Run a SAM2-UNet (or another network, or an injected forward function) with PyTorch.

    Args:
        model: a loaded ``SAM2UNet`` (``sam2unet_core.load_model``), another ``nn.Module``
            (e.g. a MONAI network), or any callable ``(B, C, S, S)`` float tensor on
            ``device`` -> logits ``(B, N, S, S)``. A module is never changed: the runner
            works on its own inference copy (``acceleration.prepare_model``).
        metadata: preprocessing, labels and plane; defaults to ``model.metadata``;
            required for other networks and plain callables.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (``acceleration.PRECISIONS``;
            ``auto``: fp16 autocast on CUDA, bf16 Hiera stages 3-4 on CPUs with native bf16,
            else fp32). ``description`` says what runs.
        note: said at the end of ``description`` (e.g. why this backend runs).
        native_bf16: whether the CPU has native bf16 (None: ask it; see
            ``acceleration.prepare_model``).
    """

    def __init__(self, model: nn.Module | ForwardFn, metadata: ModelMetadata | None = None,
                 device: str | torch.device = "auto", precision: str = "auto", note: str = "",
                 native_bf16: bool | None = None) -> None:
        self.device = resolve_device(device)
        if isinstance(model, nn.Module):
            metadata = metadata or getattr(model, "metadata", None)
            model, self.plan = acceleration.prepare_model(model, self.device, precision, native_bf16)
        else:
            self.plan = acceleration.plan_precision(precision, self.device, sam2unet=False,
                                                    native_bf16=native_bf16)
        if metadata is None:
            raise ValueError("TorchRunner needs the model's metadata: pass a loaded SAM2UNet "
                             "(it carries .metadata) or metadata= with a forward function")
        metadata.validate()
        self.model = model
        self.metadata = metadata
        self.description = f"{describe_device(self.device)}, {self.plan.describe()}" + (f"; {note}" if note else "")
        self._label_dtype = model_label_dtype(metadata.architecture.num_classes)
        logger.info("TorchRunner on %s", self.description)

    @property
    def num_classes(self) -> int:
        return self.metadata.architecture.num_classes

    @torch.inference_mode()
    def submit(self, raw_batch: np.ndarray, mapping: IntensityMapping, out_size: tuple[int, int],
               tta: bool, probabilities: bool) -> TorchPendingBatch:
        """Queue ``(B, C, H, W)`` raw voxel values (view order of ``io.orientation.PlaneView``)
        through preprocessing, the network and the label rule; see ``engine.ModelRunner``."""
        probs = resize_batch(self._probabilities(self._prepare(raw_batch, mapping), tta), out_size)
        labels = self._to_host(self._labels(probs))
        kept = None
        if probabilities:
            kept = self._to_host(probs[:, 0] if self.num_classes == 1 else probs.permute(0, 2, 3, 1))
        return TorchPendingBatch(self.device, labels, kept, self._label_dtype)

    def _prepare(self, raw_batch: np.ndarray, mapping: IntensityMapping) -> torch.Tensor:
        """Raw ``(B, C, H, W)`` -> model input ``(B, C, S, S)`` on the device: copy of the raw
        values (pinned, asynchronous on CUDA), then intensity, resize and mean/std there."""
        meta = self.metadata
        batch = to_tensor(raw_batch)  # raw values (e.g. int16 HU)
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        else:
            batch = batch.to(self.device)
        batch = apply_intensity(batch, mapping)  # float32 on the device
        batch = resize_batch(batch, (meta.input_size, meta.input_size))
        return normalize_channels(batch, meta.mean, meta.std)

    def _probabilities(self, batch: torch.Tensor, tta: bool) -> torch.Tensor:
        """``(B, C, S, S)`` model input -> float32 probabilities ``(B, N, S, S)``;
        N = 1 (foreground) for binary models, else the softmax over all classes."""
        flips = TTA_FLIPS if tta else ((),)
        autocast = (torch.autocast(self.device.type, dtype=self.plan.autocast)
                    if self.plan.autocast is not None else nullcontext())
        total = None
        with autocast:
            for dims in flips:
                x = torch.flip(batch, dims) if dims else batch
                logits = self.model(x)
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

    def _labels(self, probs: torch.Tensor) -> torch.Tensor:
        """``(B, N, H, W)`` probabilities -> ``(B, H, W)`` integer labels: foreground > 0.5
        for a binary model, else ``argmax`` over the classes (the first maximum wins, NaN
        counts as the maximum), computed without ``argmax(1)``, whose CPU kernel over the
        strided class axis of a contiguous tensor is 10-50x slower than these."""
        if self.num_classes == 1:
            return (probs[:, 0] > 0.5).to(torch.uint8)
        if self.num_classes == 2:  # one comparison: class 1 only where it is strictly larger
            background, foreground = probs[:, 0], probs[:, 1]
            return ((foreground > background) | (foreground.isnan() & ~background.isnan())).to(torch.uint8)
        # a narrow type before the copy to the host: 1 byte a pixel up to 256 classes
        return probs.max(1).indices.to(torch.uint8 if self.num_classes <= 256 else torch.int32)

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """Queue a copy to the CPU; on CUDA it is asynchronous (pinned memory), so
        :meth:`TorchPendingBatch.result` synchronises the stream before reading it."""
        return tensor.to("cpu", non_blocking=self.device.type == "cuda")
