"""Prepare a network for inference on one device at one precision, on a copy of it.

:func:`prepare_model` returns a copy of the caller's network, set up for inference, and a
:class:`PrecisionPlan` saying what runs and why. The caller's module is never changed:
its parameters, buffers, memory format, forward methods, dtype, device and train/eval
mode stay as they were, so it can still be trained, saved or exported. The copy is made
of new modules whose parameters share the caller's storage (no second copy of the
weights), except where the device, dtype or memory format asks for new tensors.

Precision (``PRECISIONS``; ``auto`` is the default of ``sam2unet-predict``):

* ``fp32``: everything in float32 (the reference; backend comparisons run at it).
* ``fp16``: the whole network under float16 autocast.
* ``bf16``: for a SAM2-UNet, Hiera stages 3-4 under bfloat16 autocast; the stride-4/8
  features that place the label boundaries keep fp32 (label Dice 0.9998 vs fp32,
  benchmarks/RESULTS.md). On a CPU without native bf16 it is emulated (correct, slower).
  Other networks: the whole network under bfloat16 autocast.
* ``auto``: CUDA: fp16 autocast of the whole network (``device.autocast_dtype``); CPU:
  ``bf16`` for a SAM2-UNet where oneDNN has native bf16 (AVX512_BF16 or AMX), else fp32;
  Apple MPS: fp32.

CPU speed-ups, for a SAM2-UNet only (other networks, e.g. MONAI's, run as they are):

* ``channels_last`` weights (the convolutions of the patch embedding, decoder and head then
  run NHWC through oneDNN; exact up to summation order);
* fp32 ``nn.Linear`` layers through oneDNN (``torch.ops.mkldnn._linear_pointwise``) instead
  of MKL's sgemm, which takes its AVX2 path on AMD CPUs: same fp32 arithmetic, 1.4-2.3x faster
  matmuls where oneDNN may use AVX-512, near equal on AVX2-only CPUs (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..device import PRECISIONS, autocast_dtype
from ..model.hiera import backbone_config
from ..model.sam2unet import SAM2UNet

__all__ = ["PRECISIONS", "PrecisionPlan", "cpu_has_native_bf16", "plan_precision", "prepare_model"]

DEEP_BF16 = "bf16 Hiera stages 3-4"
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class PrecisionPlan:
    """What runs, decided by :func:`plan_precision` and applied by :func:`prepare_model`.

    ``autocast``: dtype of an autocast around the whole forward pass (None: none);
    ``deep_bf16``: Hiera stages 3-4 under bf16 autocast (SAM2-UNet only);
    ``speed_ups``: the CPU speed-ups applied (e.g. ``channels_last``); ``reason``: why
    this precision, e.g. ``auto: CPU without native bf16``.
    """

    requested: str
    autocast: torch.dtype | None
    deep_bf16: bool
    reason: str
    speed_ups: tuple[str, ...] = ()

    @property
    def precision(self) -> str:
        """What ran, e.g. ``fp32``, ``fp16 autocast``, ``bf16 Hiera stages 3-4``."""
        if self.deep_bf16:
            return DEEP_BF16
        if self.autocast is not None:
            return f"{_DTYPE_NAMES[self.autocast]} autocast"
        return "fp32"

    def describe(self) -> str:
        """One line for logs and run summaries, e.g.
        ``fp32 (auto: CPU without native bf16; channels_last, oneDNN linear)``."""
        details = "; ".join([self.reason, *([", ".join(self.speed_ups)] if self.speed_ups else [])])
        return f"{self.precision} ({details})"


def cpu_has_native_bf16() -> bool:
    """True when oneDNN runs bf16 matmuls natively on this CPU (AVX512_BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def plan_precision(requested: str, device: torch.device | str, sam2unet: bool,
                   native_bf16: bool | None = None) -> PrecisionPlan:
    """The precision ``requested`` (one of ``PRECISIONS``) means on ``device`` for a network
    that is (``sam2unet``) or is not a SAM2-UNet; see the module docstring. ``native_bf16``:
    whether the CPU has native bf16 (None: ask it, :func:`cpu_has_native_bf16`)."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r} is not one of {PRECISIONS}")
    device = torch.device(device)
    if requested == "fp32":
        return PrecisionPlan(requested, None, False, "fp32 asked")
    if requested == "fp16":
        return PrecisionPlan(requested, torch.float16, False, "fp16 asked")
    if requested == "bf16":
        if not sam2unet:
            return PrecisionPlan(requested, torch.bfloat16, False, "bf16 asked")
        emulated = device.type == "cpu" and not _native_bf16(native_bf16)
        return PrecisionPlan(requested, None, True,
                             "bf16 asked, emulated: CPU without native bf16" if emulated else "bf16 asked")
    if device.type == "cuda":
        return PrecisionPlan(requested, autocast_dtype(device), False, "auto on CUDA")
    if device.type != "cpu":
        return PrecisionPlan(requested, None, False, f"auto on {device.type}")
    if not sam2unet:
        return PrecisionPlan(requested, None, False, "auto on CPU, not a SAM2-UNet")
    if _native_bf16(native_bf16):
        return PrecisionPlan(requested, None, True, "auto: CPU with native bf16")
    return PrecisionPlan(requested, None, False, "auto: CPU without native bf16 (no AVX512_BF16/AMX)")


def _native_bf16(native_bf16: bool | None) -> bool:
    return cpu_has_native_bf16() if native_bf16 is None else native_bf16


def prepare_model(model: nn.Module, device: torch.device | str, precision: str = "auto",
                  native_bf16: bool | None = None) -> tuple[nn.Module, PrecisionPlan]:
    """An inference copy of ``model`` on ``device`` and the :class:`PrecisionPlan` it runs.

    Args:
        model: the network, ``(B, C, S, S)`` float32 -> logits; left unchanged.
        device: where the copy runs.
        precision: one of ``PRECISIONS`` (see the module docstring).
        native_bf16: whether the CPU has native bf16 (None: ask it); tests pass it to
            exercise both ``auto`` paths on any CPU.
    Returns:
        the copy (eval mode, no gradients, float32 weights on ``device``) and the plan. The
        oneDNN linear layers and bf16 stages act under ``torch.no_grad``/``inference_mode``
        (as the runner calls it); with gradients on, every layer takes its usual fp32 path.
    """
    device = torch.device(device)
    sam2unet = isinstance(model, SAM2UNet)
    plan = plan_precision(precision, device, sam2unet, native_bf16)
    prepared = _inference_copy(model).to(device=device, dtype=torch.float32).eval()
    speed_ups: list[str] = []
    if sam2unet and device.type == "cpu" and torch.backends.mkldnn.is_available():
        prepared.to(memory_format=torch.channels_last)
        for layer in prepared.modules():
            if isinstance(layer, nn.Linear):
                layer.forward = functools.partial(_onednn_linear_forward, layer)
        speed_ups = ["channels_last", "oneDNN linear"]
    if plan.deep_bf16:
        _autocast_deep_stages(prepared)
    return prepared, PrecisionPlan(plan.requested, plan.autocast, plan.deep_bf16, plan.reason, tuple(speed_ups))


def _inference_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``'s modules whose parameters are new ``Parameter`` objects
    (no gradient) on the caller's storage, and whose buffers are the caller's tensors. Moving,
    casting or re-formatting the copy replaces its tensors and never writes the caller's."""
    memo: dict[int, object] = {id(p): nn.Parameter(p.detach(), requires_grad=False) for p in model.parameters()}
    memo.update({id(b): b for b in model.buffers()})
    return copy.deepcopy(model, memo)


def _onednn_linear_forward(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``: fp32 CPU inference through oneDNN, everything else through ``F.linear``."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or layer.weight.dtype != torch.float32
            or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu")):
        return F.linear(x, layer.weight, layer.bias)
    return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "none", [], "")


def _autocast_block_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``block(x)`` (one Hiera block) under bf16 autocast on ``x``'s device, returning fp32
    (a stage's first block would otherwise hand 16-bit features to the next); with
    gradients on, plain fp32."""
    forward = type(block).forward.__get__(block)
    if torch.is_grad_enabled():
        return forward(x)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        return forward(x).float()


def _autocast_deep_stages(model: SAM2UNet) -> None:
    """Run the blocks of Hiera stages 3 and 4 of ``model`` under bf16 autocast."""
    stages = backbone_config(model.architecture.backbone)["stages"]
    blocks = model.encoder.blocks
    for block in list(blocks)[stages[0] + stages[1]:]:
        block.forward = functools.partial(_autocast_block_forward, block)
