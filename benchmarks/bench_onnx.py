"""Torch vs ONNX Runtime fp32 vs ONNX Runtime int8 on the CPU, side by side on the same
volumes and threads.

    python benchmarks/bench_onnx.py --model demo_output/model/best.safetensors \\
        --images demo_output/Dataset001_MNIBrain/imagesTs/brain_008_0000.nii.gz [--threads 2]
    python benchmarks/bench_onnx.py --size 352 --slices 4     # random-weight model, random volume

With ``--model`` (a trained checkpoint, e.g. ``make demo``'s) the volumes are ``--images``
(real scans, files or folders of NIfTI). Without it: a random-weight ``--backbone``
(hiera_t) binary model with input ``--size`` and a random volume of ``--slices`` x size x
size. The model is exported with ``sam2unet_core.export.onnx.export_onnx`` and quantised with
``sam2unet_core.export.quantize`` (dynamic int8 MatMul weights; here without its agreement
gate, to measure it). The same ``Predictor`` segments the volumes over ``TorchRunner``
(fp32), ``OnnxRunner`` on the fp32 file and on the int8 file (ORT_ENABLE_ALL), alternating
``--rounds`` rounds; prints the median slices/s of process CPU time and of wall time of
each, and the per-label Dice of ONNX Runtime fp32 vs torch and of int8 vs fp32 (lowest over
the volumes). Torch and ONNX Runtime use ``--threads`` intra-op threads.
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
from sam2unet_core.checkpoint import build_model, load_model  # noqa: E402
from sam2unet_core.export.onnx import export_onnx  # noqa: E402
from sam2unet_core.export.quantize import compare_label_maps, quantize_unchecked  # noqa: E402
from sam2unet_core.inference.engine import Predictor  # noqa: E402
from sam2unet_core.inference.onnx_runner import OnnxRunner  # noqa: E402
from sam2unet_core.inference.torch_runner import TorchRunner  # noqa: E402
from sam2unet_core.io import read_volume  # noqa: E402
from sam2unet_core.io.volume import Volume  # noqa: E402
from sam2unet_core.metadata import Architecture, ModelMetadata  # noqa: E402


def _volumes(paths: list[Path]) -> list[Volume]:
    files = [f for p in paths for f in (sorted(p.glob("*.nii*")) if p.is_dir() else [p])]
    if not files:
        raise SystemExit(f"no images in {', '.join(map(str, paths))}")
    return [read_volume(f) for f in files]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="trained checkpoint (default: random weights)")
    parser.add_argument("--images", type=Path, nargs="+", default=[], help="with --model: volumes or folders")
    parser.add_argument("--backbone", default="hiera_t", help="random model's backbone (default hiera_t)")
    parser.add_argument("--size", type=int, default=128, help="random model's input size")
    parser.add_argument("--slices", type=int, default=24, help="slices of the random volume")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if bool(args.model) != bool(args.images):
        parser.error("--model and --images go together")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model:
        model = load_model(args.model).eval()
        volumes = _volumes(args.images)
        what = f"{args.model} ({model.metadata.architecture.backbone}, input {model.metadata.input_size} px)"
    else:
        model = build_model(ModelMetadata(architecture=Architecture(args.backbone, 1, 1), input_size=args.size,
                                          intensity={"kind": "scale", "divisor": 1.0}, mean=[0.0], std=[1.0])).eval()
        volumes = [Volume(np.random.default_rng(0).normal(size=(args.slices, args.size, args.size)).astype(np.float32))]
        what = f"random-weight {args.backbone}, input {args.size} px"
    slices = sum(v.shape_kji[0] for v in volumes)
    with tempfile.TemporaryDirectory() as folder:
        fp32 = export_onnx(model, Path(folder) / "model.onnx")
        int8 = Path(folder) / "model_int8.onnx"
        quantize_unchecked(fp32, int8)
        predictors = {"torch": Predictor(TorchRunner(model, device="cpu", precision="fp32")),
                      "onnxruntime fp32": Predictor(OnnxRunner(fp32, device="cpu", threads=args.threads)),
                      "onnxruntime int8": Predictor(OnnxRunner(int8, device="cpu", threads=args.threads))}
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in predictors}
        labels: dict[str, list[np.ndarray]] = {}
        for _ in range(args.rounds):
            for name, predictor in predictors.items():
                cpu, wall = time.process_time(), time.perf_counter()
                labels[name] = [predictor.predict(v).labels.array_kji for v in volumes]
                times[name].append((time.process_time() - cpu, time.perf_counter() - wall))
    print(f"{what}: {len(volumes)} volume(s), {slices} slices, {args.threads} threads, "
          f"median of {args.rounds} alternating rounds")
    for name, pairs in times.items():
        cpu = statistics.median(p[0] for p in pairs)
        wall = statistics.median(p[1] for p in pairs)
        print(f"{name:17s} {slices / cpu:7.2f} slices/s of CPU time  {slices / wall:7.2f} slices/s wall")
    for candidate, reference in (("onnxruntime fp32", "torch"), ("onnxruntime int8", "onnxruntime fp32")):
        report = compare_label_maps(labels[reference], labels[candidate], model.metadata.labels)
        print(f"label Dice {candidate} vs {reference}: {report.describe()}")


if __name__ == "__main__":
    main()
