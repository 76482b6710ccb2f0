"""Faster CPU inference for a loaded SAM2-UNet, applied once, in place, before predicting.

:func:`accelerate_model` picks what the CPU supports and returns what it chose:

* ``channels_last`` weights (the convolutions of the patch embedding, decoder and head then
  run NHWC through oneDNN; exact up to summation order);
* fp32 ``nn.Linear`` layers through oneDNN (``torch.ops.mkldnn._linear_pointwise``) instead
  of MKL's sgemm, which takes its AVX2 path on AMD CPUs: same fp32 arithmetic, 1.4-2.3x faster
  matmuls where oneDNN may use AVX-512, near equal on AVX2-only CPUs (benchmarks/RESULTS.md);
* bf16 autocast of Hiera stages 3-4 only, where oneDNN has native bf16
  (``torch.ops.mkldnn._is_mkldnn_bf16_supported()``: AVX512_BF16 or AMX). The stride-4/8
  features that place the label boundaries keep fp32 (label Dice 0.9998 vs fp32, measured);
  elsewhere bf16 would be emulated and slower, so the model stays fp32.

Other devices are left unchanged (CUDA uses autocast in the engine). Parameters, buffers
and the state dict keep their names and values: the model can still be saved or trained,
except that the bf16 stages and oneDNN layers apply to inference only (``torch.no_grad``;
with gradients on, the layers take the usual path).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..model.hiera import backbone_config

__all__ = ["AccelerationInfo", "accelerate_model", "cpu_has_native_bf16"]


@dataclass(frozen=True)
class AccelerationInfo:
    """What :func:`accelerate_model` applied to a model."""

    channels_last: bool
    onednn_linear: bool
    deep_bf16: bool  # Hiera stages 3-4 under bf16 autocast
    reason: str  # one line: why, e.g. "CPU without native bf16: fp32"

    def describe(self) -> str:
        """One line for logs, e.g. ``channels_last, oneDNN linear, fp32 (CPU without ...)``."""
        parts = [name for name, on in (("channels_last", self.channels_last),
                                       ("oneDNN linear", self.onednn_linear)) if on]
        parts.append("bf16 Hiera stages 3-4" if self.deep_bf16 else "fp32")
        return f"{', '.join(parts)} ({self.reason})"


def cpu_has_native_bf16() -> bool:
    """True when oneDNN runs bf16 matmuls natively on this CPU (AVX512_BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def accelerate_model(model: nn.Module, device: torch.device | str,
                     native_bf16: bool | None = None) -> AccelerationInfo:
    """Speed up inference of ``model`` (a ``SAM2UNet``, in eval mode) on ``device``, in place.

    Args:
        model: the network; its inputs stay ``(B, C, S, S)`` float32 in any memory format.
        device: where the model runs; only ``cpu`` changes anything.
        native_bf16: whether to use bf16 for Hiera stages 3-4; None asks the CPU
            (:func:`cpu_has_native_bf16`). Tests pass it to exercise both paths.
    Returns:
        what was applied, and why.
    """
    device = torch.device(device)
    if device.type != "cpu":
        return AccelerationInfo(False, False, False, f"{device.type}: unchanged")
    if not torch.backends.mkldnn.is_available():
        return AccelerationInfo(False, False, False, "torch without oneDNN: unchanged")
    model.to(memory_format=torch.channels_last)
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            layer.forward = functools.partial(_onednn_linear_forward, layer)
    bf16 = cpu_has_native_bf16() if native_bf16 is None else native_bf16
    if bf16:
        _autocast_deep_stages(model)
        reason = "CPU with native bf16"
    else:
        reason = "CPU without native bf16 (no AVX512_BF16/AMX): fp32"
    return AccelerationInfo(True, True, bf16, reason)


def _onednn_linear_forward(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``: fp32 CPU inference through oneDNN, everything else through ``F.linear``."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or layer.weight.dtype != torch.float32
            or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu")):
        return F.linear(x, layer.weight, layer.bias)
    return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "none", [], "")


def _autocast_block_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``block(x)`` (one Hiera block) under bf16 autocast, returning fp32 (a stage's first
    block would otherwise hand 16-bit features to the next); with gradients on, plain fp32."""
    forward = type(block).forward.__get__(block)
    if torch.is_grad_enabled():
        return forward(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return forward(x).float()


def _autocast_deep_stages(model: nn.Module) -> None:
    """Run the blocks of Hiera stages 3 and 4 of ``model`` under bf16 autocast."""
    stages = backbone_config(model.architecture.backbone)["stages"]
    blocks = model.encoder.blocks
    for block in list(blocks)[stages[0] + stages[1]:]:
        block.forward = functools.partial(_autocast_block_forward, block)
