"""A CT-sized volume through ``sam2unet-predict``, with the time of each stage.

Writes a synthetic CT phantom (int16 HU, ``.nii.gz``) and a randomly initialised model
checkpoint, runs the library under ``sam2unet-predict`` (``predict_from_files``) on it ``--repeats``
times, and prints for each run: wall seconds, slices/s end to end, the stages that
``predict_summary.json`` reports (read, preprocess, model, postprocess, write), the part of
the wall time not covered by the model stage, and the peak memory. ``setup`` is the model
loading and ``other`` the rest of the case time (case bookkeeping, label volume set-up). With both precisions
(CUDA) the label volumes of the mixed-precision run are compared with the fp32 run (Dice).

CPU (default, about a minute on 2 cores)::

    python benchmarks/bench_volume.py

H100, the issue's CT-sized volume::

    python benchmarks/bench_volume.py --device cuda --backbone hiera_l --shape 512 512 300 \\
        --batch-size 64 --precision mixed fp32
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` and the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import foreground_dice, machine_description, peak_memory_bytes, reset_peak_memory  # noqa: E402
from sam2unet_core import ModelMetadata, SAM2UNet, save_model  # noqa: E402
from sam2unet_core.checkpoint import load_model  # noqa: E402
from sam2unet_core.inference import Predictor  # noqa: E402
from sam2unet_core.inference.batch import PredictOptions, predict_from_files  # noqa: E402
from sam2unet_core.device import resolve_device  # noqa: E402
from sam2unet_core.io.readers import read_volume  # noqa: E402
from sam2unet_core.io.writers import write_labels  # noqa: E402

__all__ = ["main", "write_ct_phantom", "run_predict"]

LOGGER = logging.getLogger(__name__)
STAGES = ("setup", "read", "preprocess", "model", "postprocess", "write", "other")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--backbone", default="hiera_t", help="hiera_t, hiera_s, hiera_b+, hiera_l")
    parser.add_argument("--size", type=int, default=352, help="model input side (slices are resized)")
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 24], metavar=("I", "J", "K"),
                        help="volume size in voxels (columns, rows, slices)")
    parser.add_argument("--batch-size", type=int, default=8, help="slices per forward pass")
    parser.add_argument("--precision", nargs="+", choices=("mixed", "fp32"), default=["mixed"],
                        help="runs to make: mixed = the engine's default (--precision auto: fp16 "
                             "autocast on CUDA, bf16 Hiera stages 3-4 on CPUs with native bf16), "
                             "fp32 = --precision fp32")
    parser.add_argument("--repeats", type=int, default=2, help="runs per precision (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="folder for the phantom, model and outputs (default: a temporary one)")
    parser.add_argument("--io-only", action="store_true",
                        help="time only reading the volume and writing a label volume (no model): "
                             "the end-to-end bound when the model is fast")
    parser.add_argument("--json", type=Path, default=None, help="also write all results here")
    return parser


def time_io(image: Path, output: Path, repeats: int) -> dict:
    """Median wall and process-CPU seconds of the engine's reader and label writer on
    ``image``: read the volume, threshold it (> 100 HU) into a uint8 label volume of the
    same grid, write it. On a shared machine the CPU seconds are the robust figure."""
    times: dict[str, list[float]] = {"read_s": [], "read_cpu_s": [], "write_s": [], "write_cpu_s": []}
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        volume = read_volume(image)
        times["read_s"].append(time.perf_counter() - started)
        times["read_cpu_s"].append(time.process_time() - started_cpu)
        labels = volume.with_array((volume.array_kji > 100).astype(np.uint8))
        started, started_cpu = time.perf_counter(), time.process_time()
        write_labels(labels, output)
        times["write_s"].append(time.perf_counter() - started)
        times["write_cpu_s"].append(time.process_time() - started_cpu)
    result = {key: statistics.median(values) for key, values in times.items()}
    result["slices"] = volume.shape_kji[0]
    result["io_bound_slices_per_s"] = result["slices"] / (result["read_s"] + result["write_s"])
    result["io_bound_slices_per_s_cpu"] = result["slices"] / (result["read_cpu_s"]
                                                              + result["write_cpu_s"])
    return result


def write_ct_phantom(path: Path, shape_ijk: tuple[int, int, int], seed: int = 0) -> Path:
    """Write an int16 CT-like ``.nii.gz`` of ``shape_ijk`` (I, J, K) voxels, 0.8 x 0.8 x 1.5 mm:
    air (-1000 HU) around an elliptic body (40 HU) with brighter ellipsoids and noise."""
    rng = np.random.default_rng(seed)
    ni, nj, nk = shape_ijk
    i, j = np.meshgrid(np.linspace(-1, 1, ni), np.linspace(-1, 1, nj), indexing="ij")  # (I, J)
    body = (i / 0.85) ** 2 + (j / 0.65) ** 2 < 1
    data = np.full(shape_ijk, -1000, dtype=np.int16)  # nibabel order (I, J, K)
    organs = [(rng.uniform(-0.5, 0.5), rng.uniform(-0.4, 0.4), rng.uniform(0.08, 0.2),
               rng.uniform(100, 300)) for _ in range(4)]
    for k in range(nk):
        plane = np.where(body, 40.0, -1000.0)
        for ci, cj, radius, hu in organs:
            shrink = 1.0 - abs(k / max(nk - 1, 1) - 0.5)  # organs largest mid-volume
            plane[(i - ci) ** 2 + (j - cj) ** 2 < (radius * shrink) ** 2] = hu
        data[:, :, k] = plane + rng.normal(0, 15, size=(ni, nj))
    affine = np.diag([-0.8, -0.8, 1.5, 1.0])  # LPS-aligned axes written as RAS
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _write_model(path: Path, backbone: str, size: int) -> Path:
    torch.manual_seed(0)
    model = SAM2UNet(backbone)
    save_model(model, path, ModelMetadata(architecture=model.architecture, input_size=size,
                                          intensity={"kind": "ct_window", "center": 40, "width": 400}))
    return path


def run_predict(image: Path, model: Path, output: Path, device: str, batch_size: int,
                precision: str) -> dict:
    """One library run as ``sam2unet-predict`` does it (load, ``predict_from_files``);
    returns wall seconds, stage seconds and peak memory."""
    torch_device = resolve_device(device)
    reset_peak_memory(torch_device)
    started = time.perf_counter()
    predictor = Predictor(load_model(model), batch_size=batch_size, device=torch_device,
                          precision="fp32" if precision == "fp32" else "auto")
    run = predict_from_files(predictor, image, output, PredictOptions(overwrite=True))
    wall = time.perf_counter() - started
    summary = json.loads(run.summary_path.read_text())
    case = summary["cases"][0]
    if case["status"] != "ok":
        raise RuntimeError(f"prediction of {image} failed: {case.get('error')}")
    peak, memory_kind = peak_memory_bytes(torch_device)
    stages = {stage: case["timings"].get(stage, 0.0) for stage in STAGES}
    stages["setup"] = wall - case["seconds"]  # model loading, case discovery, summary
    stages["other"] = max(0.0, case["seconds"] - sum(case["timings"].values()))  # >= rounding
    return {"precision": precision, "wall_s": wall, "slices": case["slices"], "stages_s": stages,
            "peak_memory_mb": peak / 2**20, "memory_kind": memory_kind,
            "device": summary["device"], "output": case["output"]}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="sam2unet_bench_") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        image = write_ct_phantom(workdir / "ct_0000.nii.gz", tuple(args.shape))
        model = _write_model(workdir / "model.safetensors", args.backbone, args.size)
        header = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_description(device), "torch": torch.__version__,
            "backbone": args.backbone, "size": args.size, "shape_ijk": args.shape,
            "batch_size": args.batch_size, "file_mb": image.stat().st_size / 2**20,
            "command": " ".join(sys.argv if argv is None else ["bench_volume.py", *argv]),
        }
        for key, value in header.items():
            print(f"# {key}: {value}")
        if args.io_only:
            io = time_io(image, workdir / "labels.nii.gz", args.repeats)
            print(f"# I/O only, median of {args.repeats}: read {io['read_s']:.2f} s "
                  f"(CPU {io['read_cpu_s']:.2f} s), write {io['write_s']:.2f} s "
                  f"(CPU {io['write_cpu_s']:.2f} s) for {io['slices']} slices: at most "
                  f"{io['io_bound_slices_per_s']:.0f} slices/s end to end "
                  f"({io['io_bound_slices_per_s_cpu']:.0f} by CPU time) unless I/O overlaps")
            if args.json:
                args.json.write_text(json.dumps({"header": header, "io": io}, indent=2))
            return 0
        runs, labels = [], {}
        for precision in args.precision:
            for repeat in range(args.repeats):
                run = run_predict(image, model, workdir / f"out_{precision}", args.device,
                                  args.batch_size, precision)
                run["repeat"] = repeat
                runs.append(run)
            labels[precision] = np.asarray(nib.load(run["output"]).dataobj)
        summary = _summarise(runs, labels)
    _print(runs, summary)
    if args.json:
        args.json.write_text(json.dumps({"header": header, "runs": runs, "summary": summary},
                                        indent=2))
    return 0


def _summarise(runs: list[dict], labels: dict[str, np.ndarray]) -> dict:
    """Median per precision of wall time, slices/s and each stage; Dice mixed vs fp32."""
    summary: dict = {}
    for precision in labels:
        mine = [r for r in runs if r["precision"] == precision]
        wall = statistics.median(r["wall_s"] for r in mine)
        model = statistics.median(r["stages_s"]["model"] for r in mine)
        summary[precision] = {
            "wall_s": wall, "slices_per_s": mine[0]["slices"] / wall,
            "model_slices_per_s": mine[0]["slices"] / model if model else float("nan"),
            "not_model_fraction": 1.0 - model / wall,
            "stages_s": {s: statistics.median(r["stages_s"][s] for r in mine) for s in STAGES},
        }
    if {"mixed", "fp32"} <= set(labels):
        summary["dice_mixed_vs_fp32"] = foreground_dice(labels["mixed"], labels["fp32"])
    return summary


def _print(runs: list[dict], summary: dict) -> None:
    print(f"{'precision':<9} {'run':>3} {'wall s':>8} {'slices/s':>9} "
          + " ".join(f"{s:>10}" for s in STAGES) + f" {'peak MB':>9}")
    for run in runs:
        stages = " ".join(f"{run['stages_s'][s]:>10.2f}" for s in STAGES)
        print(f"{run['precision']:<9} {run['repeat']:>3} {run['wall_s']:>8.2f} "
              f"{run['slices'] / run['wall_s']:>9.2f} {stages} {run['peak_memory_mb']:>9.0f}")
    for precision, values in summary.items():
        if isinstance(values, dict):
            print(f"# median {precision}: {values['slices_per_s']:.2f} slices/s end to end, "
                  f"model stage {values['model_slices_per_s']:.2f} slices/s, "
                  f"{100 * values['not_model_fraction']:.0f}% of the wall time outside the model")
    if "dice_mixed_vs_fp32" in summary:
        print(f"# Dice of the label volumes, mixed precision vs fp32: {summary['dice_mixed_vs_fp32']:.5f}")


if __name__ == "__main__":
    raise SystemExit(main())
