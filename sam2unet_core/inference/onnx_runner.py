"""The ONNX Runtime model runner: SAM2-UNet without torch, MONAI or sam2.

An ONNX file written by ``sam2unet-export`` (:mod:`sam2unet_core.export.onnx`) holds the
per-slice model step (resize to the model input, mean/std, network, sigmoid/softmax, resize
back) and the model's metadata. :class:`OnnxRunner` implements the engine's ``ModelRunner``
contract around it with the numpy steps of :mod:`sam2unet_core.preprocessing` (intensity
mapping, test-time flips, label rule), so the ``Predictor`` segments with it as with the
torch runner. Importing this module imports numpy only; onnxruntime on first use.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..onnx_file import create_session, read_onnx_metadata, session_metadata
from ..preprocessing import TTA_FLIPS, IntensityMapping, apply_intensity, labels_from_probabilities

__all__ = ["OnnxRunner", "CompletedBatch", "read_onnx_metadata", "create_session", "cpu_features"]

logger = logging.getLogger(__name__)

PRECISION_KEY = "sam2unet_precision"  # written by export.quantize; absent: fp32
CHECK_KEY = "sam2unet_int8_check"  # written by export.quantize: the int8 file's agreement check (JSON)
# CPU flags (as Linux names them) that select integer and bf16 kernels of ONNX Runtime and oneDNN
KERNEL_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8",
                   "asimddp", "i8mm")
INPUT_NAME = "slices"


@dataclass(frozen=True)
class CompletedBatch:
    """A batch ONNX Runtime has already finished (its ``run`` is synchronous); the
    ``PendingBatch`` of the engine contract."""

    labels: np.ndarray  # (B, H, W) uint8 / uint16
    probabilities: np.ndarray | None  # (B, H, W) or (B, H, W, N) float32

    def result(self) -> tuple[np.ndarray, np.ndarray | None]:
        return self.labels, self.probabilities


def cpu_features() -> tuple[str, ...]:
    """The ``KERNEL_FEATURES`` of this CPU, from ``/proc/cpuinfo`` (Linux); () elsewhere."""
    try:
        lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        return ()
    flags = next((line.split(":", 1)[1].split() for line in lines
                  if line.startswith(("flags", "Features")) and ":" in line), [])
    return tuple(name for name in KERNEL_FEATURES if name in flags)


def _log_int8_check(props: dict[str, str], source: str) -> None:
    """Log the agreement check stored in an int8 file (``CHECK_KEY``) and whether this CPU
    has the integer kernels it was measured with."""
    if PRECISION_KEY not in props:
        return
    if CHECK_KEY not in props:
        logger.warning("%s: int8 file without an agreement check (not written by "
                       "sam2unet_core.export.quantize.quantize_int8)", source)
        return
    check = json.loads(props[CHECK_KEY])
    measured, here = set(check["cpu"]["features"]), set(cpu_features())
    logger.info("%s: int8 checked against fp32 on %d volume(s): label Dice %s (bar %s)", source,
                check["volumes"], ", ".join(f"{k} {v:.5f}" for k, v in check["dice"].items()), check["min_dice"])
    vnni = {"avx512_vnni", "avx_vnni", "amx_int8"}
    if bool(measured & vnni) != bool(here & vnni) and not check["settings"].get("reduce_range"):
        logger.warning("%s: checked on a CPU %s VNNI, this one has %s; its 8-bit weights may give other labels "
                       "here: check it again on this CPU (quantize it here: "
                       "sam2unet_core.export.quantize.quantize_int8)", source,
                       "with" if measured & vnni else "without", "it" if here & vnni else "none")


class OnnxRunner:
    """Run an exported SAM2-UNet ONNX file with ONNX Runtime (the engine's ``ModelRunner``).

    Args:
        path: a ``.onnx`` file written by ``sam2unet-export``.
        device: ``auto``, ``cpu`` or ``cuda`` (``onnxruntime-gpu``).
        threads: intra-op CPU threads (None: ONNX Runtime's default).
        note: said at the end of ``description`` (e.g. why this backend runs).

    Attributes:
        metadata: the :class:`ModelMetadata` stored in the file.
        description: one line for logs and run summaries, e.g. ``onnxruntime cpu:
            CPUExecutionProvider, fp32`` (the precision from the file's ``PRECISION_KEY``
            property; absent: fp32), then ``; note`` when given.
    """

    def __init__(self, path: str | os.PathLike, device: str = "auto", threads: int | None = None,
                 note: str = "") -> None:
        self.session = create_session(path, device, threads)
        self.metadata = session_metadata(self.session, str(path))
        self.metadata.validate()
        inputs = [i.name for i in self.session.get_inputs()]
        if inputs != [INPUT_NAME]:
            raise ValueError(f"{path}: the ONNX graph takes inputs {inputs}; a sam2unet-export "
                             f"graph takes ['{INPUT_NAME}']")
        provider = self.session.get_providers()[0]
        kind = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
        threads_text = f" ({threads} threads)" if threads else ""
        props = self.session.get_modelmeta().custom_metadata_map
        precision = props.get(PRECISION_KEY, "fp32")
        self.description = f"onnxruntime {kind}: {provider}{threads_text}, {precision}" + (f"; {note}" if note else "")
        _log_int8_check(props, str(path))

    @property
    def num_classes(self) -> int:
        return self.metadata.architecture.num_classes

    def submit(self, raw_batch: np.ndarray, mapping: IntensityMapping, out_size: tuple[int, int],
               tta: bool, probabilities: bool) -> CompletedBatch:
        """Segment ``(B, C, H, W)`` raw voxel values (view order of
        ``io.orientation.PlaneView``); see ``engine.ModelRunner``. The graph resizes back to
        the slice size, so ``out_size`` must be the batch's own ``(H, W)``."""
        if raw_batch.ndim != 4 or raw_batch.shape[1] != self.metadata.architecture.in_channels:
            raise ValueError(f"raw batch of shape {raw_batch.shape}; expected "
                             f"(B, {self.metadata.architecture.in_channels}, H, W)")
        if tuple(out_size) != tuple(raw_batch.shape[2:]):
            raise ValueError(f"the ONNX graph returns the slice size {tuple(raw_batch.shape[2:])}, "
                             f"not out_size {tuple(out_size)}")
        slices = apply_intensity(raw_batch, mapping)  # float32 (B, C, H, W)
        flips = TTA_FLIPS if tta else ((),)
        total = None
        for axes in flips:
            x = np.ascontiguousarray(np.flip(slices, axes)) if axes else slices
            probs = self.session.run(None, {INPUT_NAME: x})[0]
            probs = np.flip(probs, axes) if axes else probs
            total = probs if total is None else total + probs
        mean = total / len(flips)  # (B, N, H, W)
        labels = labels_from_probabilities(mean, self.num_classes)
        kept = None
        if probabilities:
            kept = mean[:, 0] if self.num_classes == 1 else np.moveaxis(mean, 1, 3)
            kept = np.ascontiguousarray(kept, dtype=np.float32)
        return CompletedBatch(labels, kept)
