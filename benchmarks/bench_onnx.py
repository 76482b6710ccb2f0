"""Torch vs ONNX Runtime on the CPU, side by side on the same volume and threads.

    python benchmarks/bench_onnx.py [--size 128] [--slices 24] [--threads 2]

Builds a random-weight hiera_t (1 channel, input ``--size``), exports it with
``sam2unet_core.export.onnx.export_onnx``, segments the same random volume
(``--slices`` x size x size) with the ``Predictor`` over ``TorchRunner`` (fp32) and over
``OnnxRunner`` (ORT_ENABLE_ALL), alternating 3 rounds, and prints the median slices/s of
process CPU time and wall time of each, and the label Dice between them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sam2unet_core.checkpoint import build_model  # noqa: E402
from sam2unet_core.export.onnx import export_onnx  # noqa: E402
from sam2unet_core.inference.engine import Predictor  # noqa: E402
from sam2unet_core.inference.onnx_runner import OnnxRunner  # noqa: E402
from sam2unet_core.inference.torch_runner import TorchRunner  # noqa: E402
from sam2unet_core.io.volume import Volume  # noqa: E402
from sam2unet_core.metadata import Architecture, ModelMetadata  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--slices", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(ModelMetadata(architecture=Architecture("hiera_t", 1, 1), input_size=args.size,
                                      intensity={"kind": "scale", "divisor": 1.0}, mean=[0.0], std=[1.0])).eval()
    volume = Volume(np.random.default_rng(0).normal(size=(args.slices, args.size, args.size)).astype(np.float32))
    with tempfile.TemporaryDirectory() as folder:
        path = export_onnx(model, Path(folder) / "model.onnx")
        predictors = {"torch": Predictor(TorchRunner(model, device="cpu", mixed_precision=False)),
                      "onnxruntime": Predictor(OnnxRunner(path, device="cpu", threads=args.threads))}
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in predictors}
        labels = {}
        for _ in range(3):
            for name, predictor in predictors.items():
                cpu, wall = time.process_time(), time.perf_counter()
                labels[name] = predictor.predict(volume, axis="axial").labels.array_kji
                times[name].append((time.process_time() - cpu, time.perf_counter() - wall))
    a, b = labels["torch"] > 0, labels["onnxruntime"] > 0
    dice = 1.0 if a.sum() + b.sum() == 0 else 2 * (a & b).sum() / (a.sum() + b.sum())
    print(f"hiera_t {args.size}x{args.size}, {args.slices} slices, {args.threads} threads (median of 3)")
    for name, pairs in times.items():
        cpu = statistics.median(p[0] for p in pairs)
        wall = statistics.median(p[1] for p in pairs)
        print(f"{name:12s} {args.slices / cpu:7.2f} slices/s of CPU time  {args.slices / wall:7.2f} slices/s wall")
    print(f"label Dice torch vs onnxruntime: {dice:.5f}")


if __name__ == "__main__":
    main()
