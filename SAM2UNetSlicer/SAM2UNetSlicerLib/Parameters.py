"""Run parameters of the Segment button and their mapping to ``sam2unet-predict`` flags.

The enums are shared with the module's ``@parameterNodeWrapper`` (a ``QComboBox`` shows
``label()``; the parameter node stores ``.name``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "Device",
    "SliceAxis",
    "RunParameters",
    "buildPredictArgs",
    "sliceCountAlongAxis",
    "processEnvironment",
]


class Device(enum.Enum):
    """Where the network runs; ``auto`` lets the CLI pick cuda, then mps, then cpu."""

    auto = "auto"
    cuda = "cuda"
    cpu = "cpu"
    mps = "mps"

    def label(self) -> str:
        return {"auto": "auto (best found)", "cuda": "CUDA GPU", "cpu": "CPU", "mps": "Apple MPS"}[self.name]


class SliceAxis(enum.Enum):
    """Anatomical axis the 2D model slices along (whatever the array order of the volume)."""

    axial = "axial"
    coronal = "coronal"
    sagittal = "sagittal"

    def label(self) -> str:
        return self.name.capitalize()


# RAS axis (0=R, 1=A, 2=S) that is normal to the slices of each anatomical axis.
_NORMAL_RAS_AXIS = {SliceAxis.sagittal: 0, SliceAxis.coronal: 1, SliceAxis.axial: 2}


@dataclass
class RunParameters:
    """Everything ``sam2unet-predict`` needs besides the input and output paths.

    ``sliceRange`` is ``(first, last)``, 0-based and inclusive, counted along ``sliceAxis``;
    ``None`` segments every slice.
    """

    checkpointPath: Path
    device: Device = Device.auto
    sliceAxis: SliceAxis = SliceAxis.axial
    sliceRange: tuple[int, int] | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first unusable value."""
        if not self.checkpointPath.is_file():
            raise ValueError(f"model checkpoint {self.checkpointPath} is not a file")
        if self.sliceRange is not None:
            first, last = self.sliceRange
            if first < 0 or last < first:
                raise ValueError(f"slice range must satisfy 0 <= first <= last, got {first}..{last}")


def buildPredictArgs(python: str, inputPath: Path, outputDir: Path, params: RunParameters) -> list[str]:
    """Command line that runs our CLI in Slicer's Python with JSON-lines progress on stdout."""
    args = [
        python, "-m", "sam2unet_core.cli.predict",
        "-i", str(inputPath),
        "-o", str(outputDir),
        "-m", str(params.checkpointPath),
        "--device", params.device.value,
        "--axis", params.sliceAxis.value,
        "--format", "nii.gz",
        "--progress", "jsonl",
    ]
    if params.sliceRange is not None:
        args += ["--slice-range", str(params.sliceRange[0]), str(params.sliceRange[1])]
    return args


def processEnvironment(baseEnvironment: dict[str, str], device: Device) -> dict[str, str]:
    """Environment of the child process: unbuffered output (progress arrives per line) and,
    for ``cpu``, no visible GPU so nothing initialises CUDA. ``baseEnvironment`` is not changed."""
    env = dict(baseEnvironment)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    if device is Device.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def sliceCountAlongAxis(ijkToRas: np.ndarray, dimensionsIjk: tuple[int, int, int], axis: SliceAxis) -> int:
    """Number of slices of a volume along an anatomical axis.

    ``ijkToRas`` is the 4x4 IJK-to-RAS matrix, ``dimensionsIjk`` the size along I, J, K (VTK
    order, not the KJI order of numpy arrays). The voxel axis whose direction is closest to the
    axis normal (S for axial, A for coronal, R for sagittal) counts the slices; this also works
    for oblique volumes.
    """
    directions = np.asarray(ijkToRas, dtype=float)[:3, :3]
    directions = directions / np.linalg.norm(directions, axis=0, keepdims=True)  # unit column per IJK axis
    voxelAxis = int(np.argmax(np.abs(directions[_NORMAL_RAS_AXIS[axis], :])))
    return int(dimensionsIjk[voxelAxis])
