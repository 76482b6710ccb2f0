"""int8 dynamic quantisation of an exported SAM2-UNet ONNX file, kept only behind an
agreement check on real volumes.

``quantize_int8`` quantises the weights of the graph's ``MatMul`` nodes (Hiera's attention
and MLP layers; ONNX Runtime's ``quantize_dynamic``: int8 weights, activations quantised
per batch at run time) and then segments the given check volumes with the fp32 file and
with the int8 one through the same :class:`~sam2unet_core.inference.engine.Predictor`.
The int8 file is written only when every label's Dice against the fp32 label maps is at
least ``min_dice`` (0.999, the bar the ONNX export meets against torch) on every volume;
otherwise :class:`AgreementError` says by how much it missed and nothing is written.
Convolutions stay fp32: ONNX Runtime's dynamic ``ConvInteger`` made the model slower on
an AVX2 CPU (``benchmarks/bench_onnx.py``).

Same result on every x86-64 CPU: the weights use 7 of their 8 bits (``reduce_range``).
ONNX Runtime's u8 x s8 kernels on CPUs without VNNI (AVX2, AVX-512F) add pairs of products
in 16 bits (``vpmaddubsw``), which saturates with full-range weights, while VNNI CPUs
(``vpdpbusd``) add in 32 bits: the same file then gives different labels on the two kinds.
With 7-bit weights no pair can saturate, so both compute the same integers.

The accepted file records its check in its metadata (``CHECK_KEY``: the bar, the Dice per
label, the number of volumes, the quantisation settings, the onnxruntime version and the
CPU features it was measured with, :func:`cpu_features`); ``OnnxRunner`` logs it on load.

No torch: onnxruntime and numpy only. Volumes are :class:`~sam2unet_core.io.volume.Volume`
(KJI arrays, LPS geometry); label maps compared are ``(K, J, I)`` integer arrays.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..inference.engine import Predictor
from ..inference.onnx_runner import CHECK_KEY, PRECISION_KEY, OnnxRunner, cpu_features
from ..io.atomic import atomic_write
from ..io.volume import Volume
from ..metadata import LabelInfo
from ..metrics import mask_dice

__all__ = ["MIN_DICE", "PRECISION_KEY", "CHECK_KEY", "INT8_PRECISION", "QUANTIZED_OPS", "AgreementError",
           "AgreementReport", "label_dice", "compare_label_maps", "compare_predictors", "quantize_unchecked",
           "quantize_int8", "cpu_features"]

MIN_DICE = 0.999  # per label, int8 against fp32 label maps
INT8_PRECISION = "int8 dynamic (MatMul weights, 7-bit)"
QUANTIZED_OPS = ("MatMul",)
REDUCE_RANGE = True  # 7-bit weights: the same integers with and without VNNI (module docstring)


class AgreementError(ValueError):
    """The quantised model's label maps differ from the fp32 model's beyond ``MIN_DICE``."""


@dataclass(frozen=True)
class AgreementReport:
    """Per label name, the lowest Dice over the check volumes of a candidate's label maps
    against a reference's; ``worst``: the lowest of them."""

    dice: dict[str, float]

    @property
    def worst(self) -> float:
        return min(self.dice.values())

    def describe(self) -> str:
        return ", ".join(f"{name} {value:.5f}" for name, value in self.dice.items())


def label_dice(reference: np.ndarray, candidate: np.ndarray, label: int) -> float:
    """Dice of ``label`` between two label arrays of one shape; 1.0 when both lack it."""
    return mask_dice(reference == label, candidate == label)


def compare_label_maps(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray],
                       labels: Sequence[LabelInfo]) -> AgreementReport:
    """The lowest Dice per label over pairs of label maps (``reference[i]`` against
    ``candidate[i]``, each ``(K, J, I)``) of one set of volumes."""
    return AgreementReport({label.name: min(label_dice(expected, got, label.value)
                                            for expected, got in zip(reference, candidate))
                            for label in labels})


def compare_predictors(reference: Predictor, candidate: Predictor, volumes: Sequence[Volume]) -> AgreementReport:
    """Segment each volume with both predictors (the model's plane, no TTA) and report the
    lowest Dice per label of ``reference.metadata.labels`` over the volumes."""
    if not volumes:
        raise ValueError("no check volumes: give at least one volume to compare the models on")
    return compare_label_maps([reference.predict(volume).labels.array_kji for volume in volumes],
                              [candidate.predict(volume).labels.array_kji for volume in volumes],
                              reference.metadata.labels)


def quantize_unchecked(fp32_path: Path, int8_path: Path, reduce_range: bool = REDUCE_RANGE) -> None:
    """ONNX Runtime's dynamic quantisation of the ``QUANTIZED_OPS`` weights of ``fp32_path``
    into ``int8_path``, our metadata kept and the precision recorded under ``PRECISION_KEY``.
    No agreement check and not atomic: for measuring (``benchmarks/bench_onnx.py``, which
    also measures ``reduce_range=False``, 8-bit weights); a file for users comes from
    :func:`quantize_int8`."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8,
                     op_types_to_quantize=list(QUANTIZED_OPS), reduce_range=reduce_range)
    source = onnx.load(str(fp32_path), load_external_data=False)
    proto = onnx.load(str(int8_path))
    del proto.metadata_props[:]
    for prop in source.metadata_props:
        proto.metadata_props.add(key=prop.key, value=prop.value)
    precision = INT8_PRECISION if reduce_range else "int8 dynamic (MatMul weights, 8-bit)"
    proto.metadata_props.add(key=PRECISION_KEY, value=precision)
    proto.doc_string = source.doc_string
    onnx.save(proto, str(int8_path))


def quantize_int8(onnx_path: str | os.PathLike, output: str | os.PathLike, check_volumes: Sequence[Volume],
                  threads: int | None = None, min_dice: float = MIN_DICE) -> AgreementReport:
    """Write the int8 version of the fp32 ONNX file ``onnx_path`` (``sam2unet-export``'s)
    to ``output``, atomically, if it passes the agreement check on ``check_volumes``.

    Args:
        onnx_path: fp32 ONNX file written by :func:`sam2unet_core.export.onnx.export_onnx`.
        output: the int8 ``.onnx`` file to write.
        check_volumes: real volumes of the model's kind (e.g. a few of the user's scans).
        threads: ONNX Runtime CPU threads for the check (None: its default).
        min_dice: the lowest per-label Dice against the fp32 label maps that is accepted.

    Returns the :class:`AgreementReport` of the accepted file, which is also stored in its
    metadata under ``CHECK_KEY`` with the CPU features it was measured with. Raises
    :class:`AgreementError` (nothing written) when a label's Dice is below ``min_dice``
    (a bar above 1 refuses every file), ``ValueError`` naming the file when ``onnx_path``
    is not a readable model.
    """
    onnx_path, output = Path(onnx_path), Path(output)
    reference = Predictor(OnnxRunner(onnx_path, device="cpu", threads=threads))
    with tempfile.TemporaryDirectory(prefix="sam2unet-int8-") as folder:
        candidate_path = Path(folder) / "int8.onnx"
        quantize_unchecked(onnx_path, candidate_path)
        candidate = Predictor(OnnxRunner(candidate_path, device="cpu", threads=threads))
        report = compare_predictors(reference, candidate, check_volumes)
        if report.worst < min_dice:
            raise AgreementError(
                f"int8 quantisation of {onnx_path.name} refused: label Dice against the fp32 model "
                f"{report.describe()} on {len(check_volumes)} check volume(s), below {min_dice}; "
                f"keep the fp32 file")
        _record_check(candidate_path, report, min_dice, len(check_volumes))
        atomic_write(output, lambda tmp: shutil.copyfile(candidate_path, tmp))
    return report


def _record_check(path: Path, report: AgreementReport, min_dice: float, volumes: int) -> None:
    """Store the agreement check of the int8 file ``path`` in its metadata (in place)."""
    import onnx
    import onnxruntime

    record = {"min_dice": min_dice, "dice": report.dice, "volumes": volumes,
              "settings": {"weights": "int8", "reduce_range": REDUCE_RANGE, "ops": list(QUANTIZED_OPS)},
              "onnxruntime": onnxruntime.__version__, "cpu": {"machine": platform.machine(),
                                                                "features": list(cpu_features())}}
    proto = onnx.load(str(path))
    proto.metadata_props.add(key=CHECK_KEY, value=json.dumps(record, sort_keys=True))
    onnx.save(proto, str(path))
