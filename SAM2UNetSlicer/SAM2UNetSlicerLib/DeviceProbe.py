"""Which compute devices the model's runtime sees, probed in a child process so Slicer never
blocks on it.

Run as a script (``PythonSlicer DeviceProbe.py [torch|onnx]``) it prints one JSON line; the
module parses it with ``parseProbeOutput``. ``torch`` (the default, for ``.safetensors``/
``.pt``/``.pth`` models) imports torch in the child, which also catches broken installs;
``onnx`` (for ``.onnx`` models) asks ONNX Runtime for its execution providers and never
imports torch: ``CUDAExecutionProvider`` is there only with ``onnxruntime-gpu``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

__all__ = ["PROBE_RUNTIMES", "DeviceReport", "parseProbeOutput", "probe", "main"]

_MARKER = "sam2unet-device-probe"
PROBE_RUNTIMES = ("torch", "onnx")  # the values of InstallLogic.ModelRoute
CUDA_PROVIDER = "CUDAExecutionProvider"


@dataclass
class DeviceReport:
    """Result of a probe of ``runtime`` (``torch`` or ``onnx``). ``torchVersion`` (torch) or
    ``onnxruntimeVersion`` (onnx) is empty when that runtime cannot be imported."""

    torchVersion: str = ""
    cudaDevices: list[str] = field(default_factory=list)
    mps: bool = False
    error: str = ""
    runtime: str = "torch"
    onnxruntimeVersion: str = ""
    onnxProviders: list[str] = field(default_factory=list)  # e.g. ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def found(self) -> bool:
        """Whether the runtime was imported (False: not installed yet, or broken)."""
        return bool(self.onnxruntimeVersion if self.runtime == "onnx" else self.torchVersion)

    def hasCuda(self) -> bool:
        return CUDA_PROVIDER in self.onnxProviders if self.runtime == "onnx" else bool(self.cudaDevices)

    def summary(self) -> str:
        """Human text for the panel, e.g. ``torch 2.5.1: CUDA NVIDIA A100 (80 GB), CPU`` or
        ``onnxruntime 1.20.1: CUDA, CPU``."""
        if self.runtime == "onnx":
            if not self.onnxruntimeVersion:
                return f"ONNX Runtime not usable: {self.error}" if self.error else "ONNX Runtime not installed"
            return f"onnxruntime {self.onnxruntimeVersion}: " + ("CUDA, CPU" if self.hasCuda() else "CPU")
        if not self.torchVersion:
            return f"PyTorch not usable: {self.error}" if self.error else "PyTorch not installed"
        found = [f"CUDA {name}" for name in self.cudaDevices]
        if self.mps:
            found.append("Apple MPS")
        found.append("CPU")
        return f"torch {self.torchVersion}: " + ", ".join(found)

    def bestDevice(self) -> str:
        """What ``--device auto`` resolves to: cuda, then mps (torch only), then cpu."""
        return "cuda" if self.hasCuda() else "mps" if self.mps else "cpu"


def _probeTorch() -> DeviceReport:
    try:
        import torch
    except Exception as err:  # any import failure means torch is unusable
        return DeviceReport(error=f"{type(err).__name__}: {err}")
    cuda = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            cuda.append(f"{props.name} ({props.total_memory / 2**30:.0f} GB)")
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return DeviceReport(torchVersion=torch.__version__, cudaDevices=cuda, mps=mps)


def _probeOnnx() -> DeviceReport:
    try:
        import onnxruntime
    except Exception as err:  # any import failure means onnxruntime is unusable
        return DeviceReport(runtime="onnx", error=f"{type(err).__name__}: {err}")
    return DeviceReport(runtime="onnx", onnxruntimeVersion=onnxruntime.__version__,
                        onnxProviders=list(onnxruntime.get_available_providers()))


def probe(runtime: str = "torch") -> DeviceReport:
    """Probe ``runtime`` (one of ``PROBE_RUNTIMES``) in this process."""
    if runtime not in PROBE_RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; use one of {PROBE_RUNTIMES}")
    return _probeOnnx() if runtime == "onnx" else _probeTorch()


def parseProbeOutput(lines: list[str], runtime: str = "torch") -> DeviceReport:
    """The report in the probe's output lines; an error report of ``runtime`` when there is none."""
    for line in lines:
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and data.get("probe") == _MARKER:
            return DeviceReport(torchVersion=data.get("torch", ""), cudaDevices=list(data.get("cuda", [])),
                                mps=bool(data.get("mps", False)), error=data.get("error", ""),
                                runtime=data.get("runtime", "torch"),
                                onnxruntimeVersion=data.get("onnxruntime", ""),
                                onnxProviders=list(data.get("providers", [])))
    tail = " | ".join(lines[-3:]) if lines else "no output"
    return DeviceReport(runtime=runtime, error=f"device probe failed: {tail}")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    runtime = args[0] if args else "torch"
    if runtime not in PROBE_RUNTIMES:
        print(f"usage: DeviceProbe.py [{'|'.join(PROBE_RUNTIMES)}]; got {runtime!r}", file=sys.stderr)
        return 2
    report = probe(runtime)
    print(json.dumps({"probe": _MARKER, "runtime": report.runtime, "torch": report.torchVersion,
                      "cuda": report.cudaDevices, "mps": report.mps, "onnxruntime": report.onnxruntimeVersion,
                      "providers": report.onnxProviders, "error": report.error}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
