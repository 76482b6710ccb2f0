"""Shared helpers of the benchmark scripts: timing, peak memory, peak FLOP/s, test input,
a non-degenerate head for random weights, and the agreement check of two outputs.

Tensors are ``(B, C, H, W)``; label maps ``(B, H, W)``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sam2unet_core.inference.acceleration import _onednn_linear_forward  # the engine's rule
from sam2unet_core.model.hiera import backbone_config

__all__ = [
    "H100_BF16_PEAK_FLOPS",
    "PRECISIONS",
    "Setting",
    "parse_setting",
    "deep_stage_autocast",
    "onednn_linear",
    "synchronize",
    "reset_peak_memory",
    "peak_memory_bytes",
    "time_calls",
    "measure_matmul_flops",
    "phantom_batch",
    "fit_head",
    "label_map",
    "agreement",
    "machine_description",
]

H100_BF16_PEAK_FLOPS = 790e12  # dense bf16 matmul, measured on one H100 (see the issue)
# precision name -> (autocast dtype or None, TF32 matmuls allowed, autocast only the deep
# Hiera stages 3-4 (stride 16 and 32) while patch embedding, stages 1-2 and decoder stay fp32)
PRECISIONS: dict[str, tuple[torch.dtype | None, bool, bool]] = {
    "fp32": (None, False, False),
    "tf32": (None, True, False),
    "bf16": (torch.bfloat16, False, False),
    "fp16": (torch.float16, False, False),
    "bf16deep": (torch.bfloat16, False, True),
    "fp16deep": (torch.float16, False, True),
}
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class Setting:
    """One way of running the model: ``fp32``, ``bf16-cl``, ``fp16-cl-compile``, ``fp32-b1`` ...

    ``precision`` is a key of ``PRECISIONS`` (bf16/fp16 use autocast, tf32 allows TF32
    matmuls, bf16deep/fp16deep autocast only Hiera stages 3-4), ``channels_last`` the memory
    format of model and input, ``onednn`` runs fp32 linear layers with oneDNN on CPU
    (:func:`onednn_linear`), ``compile`` wraps the model in ``torch.compile``, ``batch``
    overrides the script's batch size (None: default).
    """

    name: str
    precision: str
    channels_last: bool
    compile: bool
    batch: int | None
    onednn: bool = False

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return PRECISIONS[self.precision][0]

    @property
    def tf32(self) -> bool:
        return PRECISIONS[self.precision][1]

    @property
    def deep_only(self) -> bool:
        return PRECISIONS[self.precision][2]


class _AutocastBlock(nn.Module):
    """Runs one Hiera block under autocast and returns fp32 (a stage's first block, whose
    shortcut is a projection, would otherwise return 16-bit features)."""

    def __init__(self, block: nn.Module, device_type: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.block, self.device_type, self.dtype = block, device_type, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.block(x).float()


@contextlib.contextmanager
def deep_stage_autocast(model: nn.Module, device_type: str, dtype: torch.dtype) -> Iterator[None]:
    """Within the block, the blocks of Hiera stages 3 and 4 of ``model`` (a SAM2UNet) run
    under autocast; the rest stays fp32. The stride-4/8 features that shape the label
    boundaries keep full precision while most FLOPs (82% for hiera_l) run in 16 bits."""
    stages = backbone_config(model.architecture.backbone)["stages"]
    blocks = model.encoder.blocks
    originals = list(blocks)
    for index in range(stages[0] + stages[1], len(blocks)):
        blocks[index] = _AutocastBlock(originals[index], device_type, dtype)
    try:
        yield
    finally:
        for index, block in enumerate(originals):
            blocks[index] = block


def parse_setting(name: str) -> Setting:
    """Parse ``<precision>[-cl][-onednn][-compile][-b<N>]`` (any order after the precision)."""
    precision, *flags = name.split("-")
    if precision not in PRECISIONS:
        raise ValueError(f"setting {name!r}: precision {precision!r} is not one of {list(PRECISIONS)}")
    batch = None
    for flag in flags:
        if flag in ("cl", "compile", "onednn"):
            continue
        if flag.startswith("b") and flag[1:].isdigit() and int(flag[1:]) > 0:
            batch = int(flag[1:])
        else:
            raise ValueError(
                f"setting {name!r}: unknown part {flag!r}; expected 'cl', 'onednn', 'compile' "
                "or 'b<N>' (N > 0)"
            )
    return Setting(name, precision, "cl" in flags, "compile" in flags, batch, "onednn" in flags)


@contextlib.contextmanager
def onednn_linear(model: nn.Module) -> Iterator[None]:
    """Within the block, fp32 ``nn.Linear`` layers of ``model`` run on CPU through oneDNN
    (``torch.ops.mkldnn._linear_pointwise``) instead of MKL's sgemm.

    On AMD CPUs MKL's sgemm takes its AVX2 path (about 90 GFLOP/s per Zen 5 core here)
    while oneDNN uses AVX-512 (about 200): same fp32 arithmetic, 1.4-2.3x faster matmuls.
    Training, autocast and other devices keep ``F.linear``.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for layer in layers:
        layer.forward = functools.partial(_onednn_linear_forward, layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # back to nn.Linear.forward


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA allocator statistics, or the process peak RSS on Linux."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif _CLEAR_REFS.exists():
        try:
            _CLEAR_REFS.write_text("5")  # 5 resets the peak RSS (VmHWM) of this process
        except OSError:
            pass  # not permitted: the peak then covers the whole process life


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    """Peak memory since ``reset_peak_memory`` and what it measures.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors only). CPU: the peak resident set
    size of the whole process (weights, activations, Python) from ``/proc/self/status``
    (``VmHWM``, reset per setting), else ``resource.getrusage`` (peak of the process life).
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "cpu_peak_rss"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_peak_rss_process"


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, iters: int,
               repeats: int) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds per call of ``fn``: ``warmup`` untimed calls, then
    ``repeats`` timings, each the mean over ``iters`` calls (the device is synchronised around
    each timing). On a shared CPU the CPU seconds vary less than the wall seconds."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(iters):
            fn()
        synchronize(device)
        wall.append((time.perf_counter() - start) / iters)
        cpu.append((time.process_time() - start_cpu) / iters)
    return wall, cpu


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 2048,
                         repeats: int = 5) -> float:
    """Achieved FLOP/s of an ``n x n`` matmul in ``dtype``: a practical peak of the device.

    On CPU the rate of one thread is measured in process CPU time (robust on a shared
    machine) and multiplied by the number of torch threads."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    if device.type != "cpu":
        seconds, _ = time_calls(lambda: a @ b, device, warmup=2, iters=3, repeats=repeats)
        return 2 * n**3 / min(seconds)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, cpu_seconds = time_calls(lambda: a @ b, device, warmup=1, iters=1, repeats=repeats)
    finally:
        torch.set_num_threads(threads)
    return threads * 2 * n**3 / min(cpu_seconds)


def phantom_batch(batch: int, in_channels: int, size: int, seed: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic image-like batch and its target: ``(B, C, size, size)`` float input
    (ellipses of random brightness on a dark background plus noise, about zero mean and unit
    variance, the grey image repeated on the C channels) and ``(B, 1, size, size)`` {0, 1}
    masks of every other ellipse."""
    gen = torch.Generator().manual_seed(seed)
    axis = torch.linspace(-1.0, 1.0, size)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    images = torch.zeros(batch, size, size)
    masks = torch.zeros(batch, size, size)
    for b in range(batch):
        for k in range(6):
            cx, cy = (torch.rand(2, generator=gen) * 1.4 - 0.7).tolist()
            ax, ay = (torch.rand(2, generator=gen) * 0.35 + 0.08).tolist()
            inside = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 < 1.0
            images[b][inside] = 0.3 + torch.rand(1, generator=gen).item()
            masks[b][inside] = float(k % 2 == 0)
    images = images + 0.05 * torch.randn(images.shape, generator=gen)
    images = (images - images.mean()) / images.std()
    return images[:, None].repeat(1, in_channels, 1, 1), masks[:, None]


@torch.no_grad()
def fit_head(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, scale: float = 4.0) -> None:
    """Give a randomly initialised model a meaningful output: fit its 1x1 ``head`` by ridge
    regression on the decoder features so that the logits separate ``masks`` (target
    +-``scale``; for K classes one-vs-rest of label 1 against background).

    Without this the random head gives near-constant logits (std ~0.01), where agreement
    of label maps measures nothing. Inputs: ``images (B, C, H, W)``, ``masks (B, 1, H, W)``.
    """
    captured: list[torch.Tensor] = []
    hook = model.head.register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0]))
    was_training = model.training
    model.eval()
    try:
        model(images)
    finally:
        hook.remove()
        model.train(was_training)
    features = captured[0].double()  # (B, 64, H/4, W/4)
    width = features.shape[1]
    target = F.interpolate(masks.to(features), size=features.shape[-2:], mode="area")
    design = features.permute(0, 2, 3, 1).reshape(-1, width)  # (B*h*w, 64)
    design = torch.cat([design, torch.ones_like(design[:, :1])], dim=1)
    sign = target.reshape(-1, 1) * 2.0 - 1.0
    num_classes = model.head.out_channels
    if num_classes == 1:
        wanted = scale * sign
    else:  # background channel 0 up where the mask is 0, channel 1 up inside, others low
        wanted = torch.full((sign.shape[0], num_classes), -scale, dtype=sign.dtype,
                            device=sign.device)
        wanted[:, :2] = scale * torch.cat([-sign, sign], dim=1)
    gram = design.T @ design + 1e-3 * torch.eye(width + 1, dtype=design.dtype, device=design.device)
    solution = torch.linalg.solve(gram, design.T @ wanted)  # (65, K)
    model.head.weight.copy_(solution[:width].T.reshape(num_classes, width, 1, 1))
    model.head.bias.copy_(solution[width])


def label_map(logits: torch.Tensor) -> torch.Tensor:
    """``(B, K, H, W)`` logits -> ``(B, H, W)`` labels: p > 0.5 for K = 1, argmax for K > 1."""
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).long()
    return logits.argmax(dim=1)


def agreement(output: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Dice of the label maps (mean over the label values present in either; 1 when both are
    empty), fraction of differing pixels and the largest absolute logit difference."""
    out = output.float().cpu()
    ref = reference.float().cpu()
    labels_out, labels_ref = label_map(out), label_map(ref)
    values = sorted(set(torch.unique(labels_out).tolist()) | set(torch.unique(labels_ref).tolist()))
    dices = []
    for value in (v for v in values if v != 0):
        a, b = labels_out == value, labels_ref == value
        dices.append(2.0 * (a & b).sum().item() / (a.sum() + b.sum()).item())
    return {
        "dice": statistics.mean(dices) if dices else 1.0,
        "pixels_differ": (labels_out != labels_ref).float().mean().item(),
        "max_abs_logit_diff": (out - ref).abs().max().item(),
        "finite": bool(torch.isfinite(out).all()),
    }


def machine_description(device: torch.device) -> str:
    """``NVIDIA H100 80GB HBM3`` or ``CPU x86_64, 2 cores (2 torch threads)``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (f"CPU {platform.machine()} {platform.processor() or ''}".strip()
            + f", {os.cpu_count()} cores ({torch.get_num_threads()} torch threads)")


def foreground_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of the foregrounds (label > 0) of two label maps; 1.0 when both are empty."""
    fa, fb = a > 0, b > 0
    total = int(fa.sum() + fb.sum())
    return 1.0 if total == 0 else 2.0 * int((fa & fb).sum()) / total
