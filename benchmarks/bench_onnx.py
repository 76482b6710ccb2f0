"""The CPU paths side by side on the same model, volumes and threads: torch fp32, torch at
``--precision auto``, ONNX Runtime fp32 and ONNX Runtime int8 (7-bit weights, the export's
setting, and 8-bit weights for comparison), OpenVINO f32 and bf16 when the ``openvino``
package is installed, and ``sam2unet-predict``'s default (``--backend auto``, whichever
backend it picks on this CPU); which is fastest and agrees with fp32, what the default's
one-off export costs and after how many slices it has paid for itself.

    python benchmarks/bench_onnx.py --model demo_output/model/best.safetensors \\
        --images demo_output/Dataset001_MNIBrain/imagesTs/brain_008_0000.nii.gz [--threads 2]
    python benchmarks/bench_onnx.py --size 352 --slices 4     # random-weight model, random volume

With ``--model`` (a trained checkpoint, e.g. ``make demo``'s) the volumes are ``--images``
(real scans, files or folders of NIfTI). Without it: a random-weight ``--backbone``
(hiera_t) binary model with input ``--size`` and a random volume of ``--slices`` x size x
size. The model is exported with ``sam2unet_core.export.onnx.export_onnx`` and quantised with
``sam2unet_core.export.quantize.quantize_unchecked`` (dynamic int8 MatMul weights; here
without its agreement gate, to measure it). The same ``Predictor`` segments the volumes
with each path, alternating ``--rounds`` rounds; prints the median slices/s of process CPU
time and of wall time, the wall-time ratio to torch fp32, the per-label Dice of each path's
label maps against torch fp32 (lowest over the volumes), and the fastest path whose labels
agree with fp32 (every label's Dice >= 0.999) on this CPU. Torch, ONNX Runtime and OpenVINO
use ``--threads`` intra-op threads. The default's export into an empty cache folder is timed
(process CPU and wall seconds); its break-even is that CPU time over the CPU seconds per
slice it saves against torch at ``--precision auto``.
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
from benchmarks.common import machine_description  # noqa: E402
from sam2unet_core.export.quantize import MIN_DICE, compare_label_maps, quantize_unchecked  # noqa: E402
from sam2unet_core.checkpoint import save_model  # noqa: E402
from sam2unet_core.export.cache import cached_export_path, export_to_cache  # noqa: E402
from sam2unet_core.inference.acceleration import cpu_has_native_bf16  # noqa: E402
from sam2unet_core.inference.backend import load_predictor  # noqa: E402
from sam2unet_core.inference.engine import Predictor  # noqa: E402
from sam2unet_core.inference.onnx_runner import OnnxRunner, cpu_features  # noqa: E402
from sam2unet_core.inference.torch_runner import TorchRunner  # noqa: E402
from sam2unet_core.io import read_volume  # noqa: E402
from sam2unet_core.io.volume import Volume  # noqa: E402
from sam2unet_core.metadata import Architecture, ModelMetadata  # noqa: E402


def _volumes(paths: list[Path]) -> list[Volume]:
    files = [f for p in paths for f in (sorted(p.glob("*.nii*")) if p.is_dir() else [p])]
    if not files:
        raise SystemExit(f"no images in {', '.join(map(str, paths))}")
    return [read_volume(f) for f in files]


class OpenVinoRunner(OnnxRunner):
    """The ONNX Runtime runner's steps around an OpenVINO CPU model compiled from the same
    fp32 ONNX file, at ``precision`` (``f32``; ``bf16`` runs bf16 only where the CPU has
    native bf16, f32 elsewhere)."""

    def __init__(self, path: Path, threads: int, precision: str) -> None:
        import openvino as ov

        super().__init__(path, device="cpu", threads=threads)  # metadata and checks
        core = ov.Core()
        compiled = core.compile_model(core.read_model(str(path)), "CPU", {
            "INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads})
        ran = compiled.get_property("INFERENCE_PRECISION_HINT")
        self.session = _OpenVinoSession(compiled)
        self.description = f"openvino {ov.__version__} cpu ({threads} threads), {precision} asked, {ran} runs"


class _OpenVinoSession:
    """``session.run(None, feeds)`` of ONNX Runtime over an OpenVINO compiled model."""

    def __init__(self, compiled) -> None:
        self.compiled = compiled

    def run(self, _outputs, feeds: dict) -> list[np.ndarray]:
        return [self.compiled(feeds)[0]]


def _openvino_installed() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="trained checkpoint (default: random weights)")
    parser.add_argument("--images", type=Path, nargs="+", default=[], help="with --model: volumes or folders")
    parser.add_argument("--backbone", default="hiera_t", help="random model's backbone (default hiera_t)")
    parser.add_argument("--size", type=int, default=128, help="random model's input size")
    parser.add_argument("--slices", type=int, default=24, help="slices of the random volume")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
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
        checkpoint = args.model or save_model(model, Path(folder) / "model.safetensors")
        cache = Path(folder) / "cache"
        cpu, wall = time.process_time(), time.perf_counter()
        export_to_cache(checkpoint, cached_export_path(checkpoint, cache))
        export_cpu, export_wall = time.process_time() - cpu, time.perf_counter() - wall
        fp32 = export_onnx(model, Path(folder) / "model.onnx")
        int8 = {bits: Path(folder) / f"model_int8_{bits}.onnx" for bits in (7, 8)}
        for bits, path in int8.items():
            quantize_unchecked(fp32, path, reduce_range=bits == 7)
        runners = {"torch fp32": TorchRunner(model, device="cpu", precision="fp32"),
                   "torch auto": TorchRunner(model, device="cpu", precision="auto"),
                   "onnxruntime fp32": OnnxRunner(fp32, device="cpu", threads=args.threads),
                   "onnxruntime int8": OnnxRunner(int8[7], device="cpu", threads=args.threads),
                   "ort int8 8-bit w": OnnxRunner(int8[8], device="cpu", threads=args.threads)}
        if _openvino_installed():
            runners["openvino f32"] = OpenVinoRunner(fp32, args.threads, "f32")
            runners["openvino bf16"] = OpenVinoRunner(fp32, args.threads, "bf16")
        predictors = {name: Predictor(runner) for name, runner in runners.items()}
        default = load_predictor(checkpoint, device="cpu", cache_folder=cache)
        if isinstance(default.runner, OnnxRunner):  # the cached export, at --threads
            default = Predictor(OnnxRunner(cached_export_path(checkpoint, cache), device="cpu",
                                           threads=args.threads, note=default.description.split("; ", 1)[1]))
        predictors["default (auto)"], runners["default (auto)"] = default, default.runner
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in predictors}
        labels: dict[str, list[np.ndarray]] = {}
        for _ in range(args.rounds):
            for name, predictor in predictors.items():
                cpu, wall = time.process_time(), time.perf_counter()
                labels[name] = [predictor.predict(v).labels.array_kji for v in volumes]
                times[name].append((time.process_time() - cpu, time.perf_counter() - wall))
    print(f"# {what}: {len(volumes)} volume(s), {slices} slices, {args.threads} threads, "
          f"median of {args.rounds} alternating rounds")
    print(f"# machine: {machine_description(torch.device('cpu'))}; CPU features {list(cpu_features())}; "
          f"native bf16: {cpu_has_native_bf16()}; torch {torch.__version__}")
    for name, runner in runners.items():
        print(f"# {name}: {runner.description}")
    wall_of = {name: statistics.median(p[1] for p in pairs) for name, pairs in times.items()}
    agreeing = []
    print(f"{'path':17s} {'CPU slices/s':>12s} {'wall slices/s':>13s} {'x torch fp32':>12s}  label Dice vs torch fp32")
    for name, pairs in times.items():
        cpu = statistics.median(p[0] for p in pairs)
        report = compare_label_maps(labels["torch fp32"], labels[name], model.metadata.labels)
        if report.worst >= MIN_DICE:
            agreeing.append(name)
        print(f"{name:17s} {slices / cpu:12.2f} {slices / wall_of[name]:13.2f} "
              f"{wall_of['torch fp32'] / wall_of[name]:12.2f}  {report.describe()}")
    fastest = min(agreeing, key=wall_of.__getitem__)
    print(f"# fastest path whose labels agree with fp32 (Dice >= {MIN_DICE}) on this CPU: {fastest}")
    cpu_of = {name: statistics.median(p[0] for p in pairs) / slices for name, pairs in times.items()}
    saved = cpu_of["torch auto"] - cpu_of["default (auto)"]
    print(f"# default's one-off export: {export_cpu:.1f} s CPU, {export_wall:.1f} s wall; "
          + (f"break-even after {export_cpu / saved:.0f} slices ({saved * 1000:.1f} ms CPU saved a slice "
             f"against torch auto)" if saved > 0 else "no CPU time saved a slice against torch auto"))

if __name__ == "__main__":
    main()
