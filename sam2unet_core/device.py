"""Pick the torch device and the autocast precision, and describe what is available.

``resolve_device("auto")`` prefers CUDA, then Apple MPS, then CPU. Asking for a device that
is not there raises ``ValueError`` explaining why (CPU-only torch build, no GPU found).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["PRECISIONS", "DeviceInfo", "available_devices", "resolve_device", "autocast_dtype", "describe_device"]

DEVICE_CHOICES = ("auto", "cuda", "cpu", "mps")
# inference precisions of the torch runner; see sam2unet_core.inference.acceleration
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class DeviceInfo:
    """One usable device: ``name`` for torch (``cuda:0``), a human ``description``."""

    name: str
    kind: str
    description: str
    memory_gb: float | None = None


def _mps_available() -> bool:
    import torch  # lazy: importing this module costs no torch
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def available_devices() -> list[DeviceInfo]:
    """Every device this torch build can use, GPUs first, CPU last."""
    import torch  # lazy: importing this module costs no torch
    found = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            memory = props.total_memory / 1024**3
            found.append(DeviceInfo(
                f"cuda:{index}", "cuda", f"{props.name} ({memory:.1f} GB, CUDA {torch.version.cuda})",
                memory,
            ))
    if _mps_available():
        found.append(DeviceInfo("mps", "mps", "Apple GPU (MPS)"))
    found.append(DeviceInfo("cpu", "cpu", f"CPU ({torch.get_num_threads()} threads)"))
    return found


def resolve_device(requested: str | torch.device = "auto") -> torch.device:
    """Turn ``auto``/``cuda``/``cuda:N``/``mps``/``cpu`` into an available torch.device."""
    import torch  # lazy: importing this module costs no torch
    name = str(requested).lower()
    if name == "auto":
        return torch.device(available_devices()[0].name)
    kind = name.split(":")[0]
    if kind == "cuda":
        if not torch.cuda.is_available():
            cause = ("this torch build has no CUDA support (CPU-only wheel)"
                     if torch.version.cuda is None else "no CUDA GPU is visible to the driver")
            raise ValueError(f"device {requested!r} requested but {cause}; choose the CPU device")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {requested!r}: only {torch.cuda.device_count()} CUDA device(s) found"
            )
        return device
    if kind == "mps":
        if not _mps_available():
            raise ValueError(f"device {requested!r} requested but Apple MPS is not available")
        return torch.device("mps")
    if kind == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown device {requested!r}; expected one of {DEVICE_CHOICES} or cuda:N")


def autocast_dtype(device: torch.device, training: bool = False) -> torch.dtype | None:
    """The autocast precision on ``device``; None (fp32) on CPU and MPS.

    Inference on CUDA uses fp16: bf16 autocast of the whole model fails the agreement bar
    with fp32 (Dice of the label maps >= 0.999; measured 0.993-0.9986 in
    ``benchmarks/bench_model.py``, see benchmarks/RESULTS.md) while fp16 passes. Training
    uses bf16 where the GPU has it, for its range (no loss scaling), else fp16.
    """
    import torch  # lazy: importing this module costs no torch
    if device.type != "cuda":
        return None
    if training and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def describe_device(device: torch.device) -> str:
    """One line for logs and the Slicer panel, e.g. ``cuda:0: NVIDIA H100 (79.1 GB, CUDA 12.8)``;
    the runner adds the precision it runs (``TorchRunner.description``)."""
    for info in available_devices():
        if info.name == str(device) or (device.type == "cuda" and device.index is None
                                        and info.name == "cuda:0"):
            return f"{info.name}: {info.description}"
    return str(device)
