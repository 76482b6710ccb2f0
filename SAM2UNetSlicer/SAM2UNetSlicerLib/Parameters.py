"""Run parameters of the Segment and Train buttons and their mapping to the command lines of
``sam2unet-predict`` and ``sam2unet-train --request``.

The enums are shared with the module's ``@parameterNodeWrapper`` (a ``QComboBox`` shows
``label()``; the parameter node stores ``.name``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .InstallLogic import ModelRoute, routeOf

__all__ = [
    "Device",
    "ONNX_DEVICES",
    "offeredDevices",
    "SliceAxis",
    "Precision",
    "RunParameters",
    "buildPredictArgs",
    "sliceCountAlongAxis",
    "processEnvironment",
    "TrainingBase",
    "TrainingPlane",
    "TrainingSettings",
    "buildTrainArgs",
]


class Device(enum.Enum):
    """Where the network runs; ``auto`` lets the CLI pick cuda, then mps, then cpu."""

    auto = "auto"
    cuda = "cuda"
    cpu = "cpu"
    mps = "mps"

    def label(self) -> str:
        return {"auto": "auto (best found)", "cuda": "CUDA GPU", "cpu": "CPU", "mps": "Apple MPS"}[self.name]


ONNX_DEVICES = (Device.auto, Device.cuda, Device.cpu)  # what OnnxRunner runs on (no Apple MPS)


def offeredDevices(route: ModelRoute, report: Any) -> list[Device]:
    """The devices the Device choice offers for a model of ``route``, in ``Device`` order.

    ``report`` is the ``DeviceProbe.DeviceReport`` of the last probe (None: none yet). PyTorch
    route: auto and CPU, CUDA and Apple MPS when torch found them (all four while torch is not
    found: the run checks). ONNX route: auto and CPU, CUDA only when ONNX Runtime offers its
    CUDA provider (``onnxruntime-gpu``); never MPS.
    """
    known = report is not None and report.runtime == route.value and report.found()
    if route is ModelRoute.onnx:
        return [d for d in ONNX_DEVICES if d is not Device.cuda or (known and report.hasCuda())]
    if not known:
        return list(Device)
    return [d for d in Device if (d is not Device.cuda or report.cudaDevices) and (d is not Device.mps or report.mps)]


class SliceAxis(enum.Enum):
    """Anatomical plane the 2D model slices along (whatever the array order of the volume);
    ``model``: the plane the model was trained on, or every plane of a model trained on
    several, their predictions fused (its main plane alone with a slice range)."""

    model = "model"
    axial = "axial"
    coronal = "coronal"
    sagittal = "sagittal"

    def label(self) -> str:
        return "Model's plane" if self is SliceAxis.model else self.name.capitalize()


class Precision(enum.Enum):
    """``sam2unet-predict --precision`` for PyTorch models; ONNX files run at their own."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"

    def label(self) -> str:
        return {"auto": "auto (GPU: fp16, CPU: bf16 where native)", "fp32": "fp32 (full)",
                "bf16": "bf16 (deep encoder stages)", "fp16": "fp16"}[self.name]


@dataclass
class RunParameters:
    """Everything ``sam2unet-predict`` needs besides the input and output paths.

    ``sliceRange`` is ``(first, last)``, 0-based and inclusive voxel indices along the volume
    axis that ``sliceAxis`` selects; ``None`` segments every slice.
    """

    checkpointPath: Path
    device: Device = Device.auto
    sliceAxis: SliceAxis = SliceAxis.model
    sliceRange: tuple[int, int] | None = None
    batchSize: int = 8  # slices per forward pass; lower it when the GPU runs out of memory
    tta: bool = False  # average over flipped slices (sam2unet-predict --tta)
    keepLargestComponent: bool = False  # keep each label's largest 3D connected component
    allowUntrained: bool = False  # run a SAM 2 checkpoint (untrained decoder): smoke tests only
    precision: Precision = Precision.auto

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first unusable value."""
        if not self.checkpointPath.is_file():
            raise ValueError(f"model checkpoint {self.checkpointPath} is not a file")
        if self.sliceRange is not None:
            first, last = self.sliceRange
            if first < 0 or last < first:
                raise ValueError(f"slice range must satisfy 0 <= first <= last, got {first}..{last}")
        if self.batchSize < 1:
            raise ValueError(f"batch size must be at least 1, got {self.batchSize}")
        if routeOf(self.checkpointPath) is ModelRoute.onnx and self.device not in ONNX_DEVICES:
            raise ValueError(f"{self.device.label()} is not available for ONNX models "
                             f"({self.checkpointPath.name}); choose CPU, CUDA GPU or auto")
        if routeOf(self.checkpointPath) is ModelRoute.onnx and self.keepLargestComponent:
            raise ValueError(f"keeping the largest component runs on PyTorch and MONAI; an ONNX model "
                             f"({self.checkpointPath.name}) runs without them: untick it")
        if routeOf(self.checkpointPath) is ModelRoute.onnx and self.precision is not Precision.auto:
            raise ValueError(f"{self.checkpointPath.name} is an ONNX model, which runs at the precision it "
                             f"was written with; choose precision auto")


def buildPredictArgs(python: str, inputPath: Path, outputDir: Path, params: RunParameters) -> list[str]:
    """Command line that runs our CLI in Slicer's Python with JSON-lines progress on stdout."""
    args = [
        python, "-m", "sam2unet_core.cli.predict",
        "-i", str(inputPath),
        "-o", str(outputDir),
        "-m", str(params.checkpointPath),
        "--device", params.device.value,
        "--batch-size", str(params.batchSize),
        "--format", "nii.gz",
        "--progress", "jsonl",
    ]
    if params.sliceAxis is not SliceAxis.model:  # without --axis the CLI uses the model's plane
        args += ["--axis", params.sliceAxis.value]
    if params.precision is not Precision.auto:
        args += ["--precision", params.precision.value]
    if params.sliceRange is not None:
        first, last = params.sliceRange
        args += ["--slice-range", f"{first}:{last + 1}"]  # the CLI takes half-open START:STOP
    if params.tta:
        args.append("--tta")
    if params.keepLargestComponent:
        args += ["--postprocess", "largest_component"]
    if params.allowUntrained:
        args.append("--allow-untrained")
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


def sliceCountAlongAxis(ijkToRas: np.ndarray, dimensionsIjk: tuple[int, int, int], axis: SliceAxis,
                        planeView: Callable[[np.ndarray, str], Any], modelPlane: str = "axial") -> int:
    """Number of slices of a volume along an anatomical axis, as ``sam2unet-predict`` counts them.

    ``ijkToRas`` is the 4x4 IJK-to-RAS matrix, ``dimensionsIjk`` the size along I, J, K (VTK
    order, not the KJI order of numpy arrays). ``planeView`` is
    ``sam2unet_core.io.orientation.plane_view`` (passed in: the same rule as the CLI, also
    for oblique volumes); it takes the LPS direction matrix (columns i, j, k).
    ``modelPlane`` is the model's plane, used for ``SliceAxis.model``.
    """
    matrix = np.asarray(ijkToRas, dtype=float)[:3, :3]
    directionRas = matrix / np.linalg.norm(matrix, axis=0, keepdims=True)  # unit column per IJK axis
    directionLps = np.diag([-1.0, -1.0, 1.0]) @ directionRas
    shapeKji = tuple(int(d) for d in reversed(dimensionsIjk))
    plane = modelPlane if axis is SliceAxis.model else axis.value
    return shapeKji[planeView(directionLps, plane).slice_array_axis]


class TrainingBase(enum.Enum):
    """What a training starts from (``TrainingRequest.base`` of ``sam2unet_core.train.from_pairs``)."""

    scratch = "scratch"
    sam2 = "sam2"
    model = "model"

    def label(self) -> str:
        return {"scratch": "From scratch (Hiera-T)", "sam2": "SAM 2 / 2.1 checkpoint (frozen trunk)",
                "model": "Fine-tune a SAM2-UNet model"}[self.name]


class TrainingPlane(enum.Enum):
    """Anatomical plane of the 2D slices a new model learns from (a fine-tuned model keeps its own)."""

    axial = "axial"
    coronal = "coronal"
    sagittal = "sagittal"

    def label(self) -> str:
        return self.name.capitalize()


@dataclass
class TrainingSettings:
    """The Train section's settings besides the training pairs.

    ``output`` is the model file to write (``.safetensors``); ``basePath`` the SAM 2 / 2.1
    checkpoint (base ``sam2``) or the SAM2-UNet ``.safetensors`` model (base ``model``);
    ``minutes`` the wall-clock budget of the training.
    """

    output: Path
    base: TrainingBase = TrainingBase.scratch
    basePath: Path | None = None
    plane: TrainingPlane = TrainingPlane.axial
    minutes: float = 10.0
    device: Device = Device.auto
    seed: int = 0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first unusable value."""
        if self.output.suffix.lower() != ".safetensors":
            raise ValueError(f"the model file {self.output} must end in .safetensors")
        if self.minutes <= 0:
            raise ValueError(f"the time budget must be more than 0 minutes, got {self.minutes}")
        if self.base is not TrainingBase.scratch:
            if self.basePath is None or not self.basePath.is_file():
                raise ValueError(f"{self.base.label()}: {self.basePath or 'no file chosen'} is not a file")
        if self.base is TrainingBase.model and self.basePath.suffix.lower() != ".safetensors":
            raise ValueError(f"{self.basePath.name}: a model to fine-tune is a .safetensors file written by "
                             f"sam2unet-train or this module")


def buildTrainArgs(python: str, requestPath: Path) -> list[str]:
    """Command line that trains from a request file in Slicer's Python, with JSON-lines progress."""
    return [python, "-m", "sam2unet_core.cli.train", "--request", str(requestPath), "--progress", "jsonl"]
