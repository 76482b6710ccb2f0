"""The CPU engine before and after ``sam2unet_core.inference.acceleration``, side by side:
the same volume through the real ``sam2unet-predict``, old settings (the model as loaded,
fp32 eager) and new (``prepare_model``: channels_last, oneDNN fp32 linear and, with
``--precision auto``, bf16 Hiera stages 3-4 where the CPU has native bf16), alternating runs,
medians of wall time and of process CPU time per slice, and the Dice of the two label
volumes (must be >= 0.999).

The model is Hiera-T with its 1x1 head fitted by ridge regression (``common.fit_head``) to
segment the bright ellipses of a phantom, so that the label maps are confident and
meaningful as a trained model's are; the volume is that phantom (float32 ``.nii.gz``).

Robust figure on a shared machine: CPU s/slice at ``--threads 1``::

    python benchmarks/bench_cpu_engine.py --threads 1 --slices 24 --size 256 --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make `benchmarks` and the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import fit_head, foreground_dice, machine_description, phantom_batch  # noqa: E402
from sam2unet_core import build_model, save_model  # noqa: E402
from sam2unet_core.cli import predict  # noqa: E402
from sam2unet_core.inference import acceleration  # noqa: E402
from sam2unet_core.metadata import Architecture, ModelMetadata  # noqa: E402

DICE_REQUIRED = 0.999


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--backbone", default="hiera_t")
    parser.add_argument("--size", type=int, default=256, help="model input side (multiple of 32)")
    parser.add_argument("--side", type=int, default=512, help="slice side of the volume")
    parser.add_argument("--slices", type=int, default=24, help="axial slices in the volume")
    parser.add_argument("--batch-size", type=int, default=8, help="slices per forward pass")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting (alternating)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--precision", choices=("auto", "fp32"), default="auto",
                        help="the new engine's --precision (fp32: the speed-ups alone)")
    parser.add_argument("--json", type=Path, default=None, help="also write all results here")
    return parser


def write_fitted_case(folder: Path, backbone: str, size: int, side: int, slices: int
                      ) -> tuple[Path, Path]:
    """The phantom volume ``(side, side, slices)`` float32 .nii.gz and a model fitted to it."""
    images, _ = phantom_batch(slices, 1, side, seed=5)
    small = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
    bright = F.avg_pool2d(small, 5, stride=1, padding=2) > 1.0
    torch.manual_seed(0)
    model = build_model(ModelMetadata(architecture=Architecture(backbone), input_size=size,
                                      intensity={"kind": "scale", "divisor": 1.0}, mean=[], std=[])).eval()
    views = torch.cat([small, small.transpose(2, 3), small.flip(2), small.flip(3)])
    masks = torch.cat([bright, bright.transpose(2, 3), bright.flip(2), bright.flip(3)]).float()
    fit_head(model, views.repeat(1, 3, 1, 1), masks)
    model_path = folder / "fitted.safetensors"
    save_model(model, model_path)
    image_path = folder / "phantom_0000.nii.gz"
    nib.save(nib.Nifti1Image(images[:, 0].permute(2, 1, 0).numpy(), np.eye(4)), image_path)
    return model_path, image_path


def _unaccelerated(model: torch.nn.Module, device: torch.device | str, precision: str = "auto",
                   native_bf16=None) -> tuple[torch.nn.Module, acceleration.PrecisionPlan]:
    """The old engine: the model as loaded, fp32."""
    return model.to(device).eval(), acceleration.PrecisionPlan("fp32", None, False, "old engine settings")


def run_once(setting: str, image: Path, model: Path, out: Path, batch_size: int, precision: str) -> dict:
    """One ``sam2unet-predict`` run on CPU in this process: wall and CPU seconds, labels."""
    argv = ["-i", str(image), "-o", str(out), "-m", str(model), "--device", "cpu",
            "--batch-size", str(batch_size), "--progress", "none", "--overwrite", "--precision", precision]
    patch = (mock.patch.object(acceleration, "prepare_model", _unaccelerated)
             if setting == "old" else contextlib.nullcontext())
    with patch:
        wall, cpu = time.perf_counter(), time.process_time()
        code = predict.main(argv)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if code != 0:
        raise RuntimeError(f"sam2unet-predict returned {code} ({argv})")
    case = json.loads((out / "predict_summary.json").read_text())["cases"][0]
    labels = np.asarray(nib.load(case["output"]).dataobj)
    return {"setting": setting, "wall_s": wall, "cpu_s": cpu, "slices": case["slices"],
            "model_s": case["timings"].get("model"), "labels": labels}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    header = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_description(torch.device("cpu")), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "native_bf16": acceleration.cpu_has_native_bf16(),
        "precision": args.precision,
        "command": " ".join(sys.argv if argv is None else ["bench_cpu_engine.py", *argv]),
    }
    for key, value in header.items():
        print(f"# {key}: {value}", flush=True)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="sam2unet_cpu_engine_") as tmp:
        folder = Path(tmp)
        model, image = write_fitted_case(folder, args.backbone, args.size, args.side, args.slices)
        labels: dict[str, np.ndarray] = {}
        for repeat in range(args.repeats):
            for setting in ("old", "new") if repeat % 2 == 0 else ("new", "old"):
                run = run_once(setting, image, model, folder / setting, args.batch_size, args.precision)
                labels[setting] = run.pop("labels")
                run["repeat"] = repeat
                runs.append(run)
                print(f"{setting:<4} run {repeat}: wall {run['wall_s']:.2f} s, CPU "
                      f"{run['cpu_s'] / run['slices']:.3f} s/slice", flush=True)
    summary = {}
    for setting in ("old", "new"):
        mine = [r for r in runs if r["setting"] == setting]
        summary[setting] = {"wall_s": statistics.median(r["wall_s"] for r in mine),
                            "cpu_s_per_slice": statistics.median(r["cpu_s"] / r["slices"] for r in mine),
                            "slices_per_s": statistics.median(r["slices"] / r["wall_s"] for r in mine)}
    summary["speedup_cpu"] = summary["old"]["cpu_s_per_slice"] / summary["new"]["cpu_s_per_slice"]
    summary["speedup_wall"] = summary["old"]["wall_s"] / summary["new"]["wall_s"]
    summary["dice_new_vs_old"] = foreground_dice(labels["new"], labels["old"])
    summary["foreground_fraction"] = float((labels["old"] > 0).mean())
    summary["agreement_passed"] = summary["dice_new_vs_old"] >= DICE_REQUIRED
    for setting in ("old", "new"):
        s = summary[setting]
        print(f"# median {setting}: {s['cpu_s_per_slice']:.3f} CPU s/slice, wall {s['wall_s']:.2f} s "
              f"({s['slices_per_s']:.2f} slices/s)")
    print(f"# new vs old: {summary['speedup_cpu']:.2f}x by CPU time, {summary['speedup_wall']:.2f}x "
          f"by wall time; label Dice {summary['dice_new_vs_old']:.5f} "
          f"({'passes' if summary['agreement_passed'] else 'FAILS'} >= {DICE_REQUIRED}); "
          f"foreground {100 * summary['foreground_fraction']:.1f}% of the voxels")
    if args.json:
        args.json.write_text(json.dumps({"header": header, "runs": runs, "summary": summary}, indent=2))
    return 0 if summary["agreement_passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
