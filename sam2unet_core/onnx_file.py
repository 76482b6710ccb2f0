"""Open an exported ONNX file with ONNX Runtime and read the model metadata it holds.

Used by the model layer (``metadata.read_metadata``, for the CLIs and the Slicer module)
and by the ONNX runner (``inference.onnx_runner``). Importing it imports no torch, and no
onnxruntime until a file is opened.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import OptionError
from .metadata import METADATA_KEY, CheckpointError, ModelMetadata

__all__ = ["ONNX_DEVICES", "create_session", "read_onnx_metadata", "session_metadata"]

ONNX_DEVICES = {"auto": ("CUDAExecutionProvider", "CPUExecutionProvider"),
                "cpu": ("CPUExecutionProvider",), "cuda": ("CUDAExecutionProvider",)}


def create_session(path: str | os.PathLike, device: str = "auto", threads: int | None = None,
                   optimize: bool = True) -> Any:
    """An ``onnxruntime.InferenceSession`` of ``path`` with all graph optimisations
    (``ORT_ENABLE_ALL``; ``optimize=False``: none, for reading metadata). ``device``:
    ``auto`` (CUDA where ``onnxruntime-gpu`` offers it, else CPU), ``cpu`` or ``cuda``.
    ``threads``: intra-op CPU threads (None: ONNX Runtime's default). Raises
    :class:`CheckpointError` naming the file when it is missing or not a readable ONNX model,
    :class:`OptionError` for a device it cannot run on (both ``ValueError``)."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: ONNX model file not found")
    if device not in ONNX_DEVICES:
        raise OptionError(f"device {device!r} is not available for ONNX models; use one of {sorted(ONNX_DEVICES)}",
                          "device", device)
    providers = [name for name in ONNX_DEVICES[device] if name in ort.get_available_providers()]
    if not providers:
        raise OptionError(f"device {device!r}: this onnxruntime has no CUDA provider "
                          f"(install onnxruntime-gpu)", "device", device)
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own kinds for bad bytes
        raise CheckpointError(f"{path}: not a readable ONNX model: {type(err).__name__}: {err}") from err


def session_metadata(session: Any, source: str) -> ModelMetadata:
    """The :class:`ModelMetadata` an ONNX Runtime ``session`` of ``source`` holds;
    :class:`CheckpointError` naming ``source`` when it holds none or an invalid one."""
    props = session.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in props:
        raise CheckpointError(f"{source}: ONNX model without '{METADATA_KEY}' metadata; was it "
                         f"written by sam2unet-export?")
    try:
        return ModelMetadata.from_json(props[METADATA_KEY])
    except (ValueError, TypeError, KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{source}: invalid model metadata in the ONNX file: {err}") from err


def read_onnx_metadata(path: str | os.PathLike) -> ModelMetadata:
    """The :class:`ModelMetadata` stored in an exported ONNX file (labels, colours,
    preprocessing, plane), read with ONNX Runtime without graph optimisation; no torch."""
    return session_metadata(create_session(path, "cpu", optimize=False), str(path))
