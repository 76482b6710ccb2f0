"""Which compute devices torch sees, probed in a child process so Slicer never blocks on it.

Run as a script (``PythonSlicer DeviceProbe.py``) it prints one JSON line; the module parses
it with ``parseProbeOutput``. Importing torch in the child also catches broken installs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

__all__ = ["DeviceReport", "parseProbeOutput", "probe", "main"]

_MARKER = "sam2unet-device-probe"


@dataclass
class DeviceReport:
    """Result of a probe; ``torchVersion`` is empty when torch cannot be imported."""

    torchVersion: str = ""
    cudaDevices: list[str] = field(default_factory=list)
    mps: bool = False
    error: str = ""

    def summary(self) -> str:
        """Human text for the panel, e.g. ``torch 2.5.1: CUDA NVIDIA A100 (80 GB), CPU``."""
        if not self.torchVersion:
            return f"PyTorch not usable: {self.error}" if self.error else "PyTorch not installed"
        found = [f"CUDA {name}" for name in self.cudaDevices]
        if self.mps:
            found.append("Apple MPS")
        found.append("CPU")
        return f"torch {self.torchVersion}: " + ", ".join(found)

    def bestDevice(self) -> str:
        """What ``--device auto`` resolves to: cuda, then mps, then cpu."""
        return "cuda" if self.cudaDevices else "mps" if self.mps else "cpu"


def probe() -> DeviceReport:
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


def parseProbeOutput(lines: list[str]) -> DeviceReport:
    """The report in the probe's output lines; an error report when there is none."""
    for line in lines:
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and data.get("probe") == _MARKER:
            return DeviceReport(torchVersion=data.get("torch", ""), cudaDevices=list(data.get("cuda", [])),
                                mps=bool(data.get("mps", False)), error=data.get("error", ""))
    tail = " | ".join(lines[-3:]) if lines else "no output"
    return DeviceReport(error=f"device probe failed: {tail}")


def main() -> int:
    report = probe()
    print(json.dumps({"probe": _MARKER, "torch": report.torchVersion, "cuda": report.cudaDevices,
                      "mps": report.mps, "error": report.error}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
