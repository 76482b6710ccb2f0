"""Where a run's time goes besides the model, old code and new side by side in one run.

Each measurement runs in a fresh child process whose ``sam2unet_core`` is either this
checkout (``new``) or an older checkout of the project (``old``, a folder given with
``--old``, e.g. ``git worktree add --detach /tmp/old 8a1e55e``), alternating old and new on
every repeat, so both see the same load of a shared machine. Measured:

* ``ct``: one 512x512x300 (``--ct-shape``) int16 CT phantom (``.nii.gz``) through ``predict_from_files``, split
  into import, model load, read, preprocess, model, postprocess and write, with the peak
  resident memory of the process and its growth from reading on (in multiples of the CT's
  decoded size);
* ``io``: reading that CT and writing a label map of it (``read_volume``/``write_labels``),
  wall and CPU seconds; the label files of old and new must hold the same voxels and geometry;
* ``folder``: a folder of ``--cases`` smaller CTs: wall time against the sum of the stages
  (reading, model and writing overlap in the new code);
* ``load``: ``import sam2unet_core`` and ``load_model`` of a Hiera-L ``.safetensors``;
* ``labels``: the runner's label rule (``TorchRunner._labels``) on one batch of probabilities
  ``(8, N, 512, 512)`` for N = 2, 4 and 14 classes, CPU seconds on one thread (medians of 5 calls).

The model of ``ct`` and ``folder`` is a two-class Hiera-T at a 32 px input (random weights, a
CT window), so that the network is not what is measured (its ``model`` stage still holds the
resizing back to the slice grid and the label rule). Medians over ``--repeats`` and new/old ratios are printed
and written to ``--json``::

    python benchmarks/bench_io.py --old /tmp/old --repeats 3 --json benchmarks/results/cpu_io_old_vs_new.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MEASUREMENTS = ("ct", "io", "folder", "load", "labels")


# --------------------------------------------------------------------------- children
def _peak_rss() -> int:
    """Peak resident bytes of this process (``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    except OSError:
        pass


def child_run(image: Path, model: Path, out: Path) -> dict:
    """``ct``/``folder``: import, model load, then ``predict_from_files`` on ``image`` (a file or
    a folder); stage seconds from its summary; peak memory from reading on."""
    started = time.perf_counter()
    from sam2unet_core.checkpoint import load_model
    from sam2unet_core.inference import Predictor
    from sam2unet_core.inference.batch import PredictOptions, predict_from_files

    imported = time.perf_counter()
    predictor = Predictor(load_model(model), batch_size=8, device="cpu")
    loaded = time.perf_counter()
    base = _rss()
    _reset_peak()
    run = predict_from_files(predictor, image, out, PredictOptions(overwrite=True))
    finished = time.perf_counter()
    cases = json.loads(run.summary_path.read_text())["cases"]  # the same in old and new code
    failed = [case for case in cases if case["status"] != "ok"]
    if failed:
        raise RuntimeError(f"cases failed: {failed}")
    stages = {stage: sum(case["timings"].get(stage, 0.0) for case in cases)
              for stage in ("read", "preprocess", "model", "postprocess", "write")}
    return {"import_s": imported - started, "load_s": loaded - imported, **{f"{k}_s": v for k, v in stages.items()},
            "run_wall_s": finished - loaded, "total_s": finished - started, "cases": len(cases),
            "peak_rss_mb": _peak_rss() / 2**20, "growth_mb": (_peak_rss() - base) / 2**20}


def child_io(image: Path, out: Path) -> dict:
    """``io``: read the CT, threshold it (> 100 HU) into a uint8 label map, write it."""
    import numpy as np

    from sam2unet_core.io.readers import read_volume
    from sam2unet_core.io.writers import write_labels

    base = _rss()
    _reset_peak()
    wall, cpu = time.perf_counter(), time.process_time()
    volume = read_volume(image)
    read_s, read_cpu_s = time.perf_counter() - wall, time.process_time() - cpu
    labels = volume.with_array((volume.array_kji > 100).astype(np.uint8))
    wall, cpu = time.perf_counter(), time.process_time()
    write_labels(labels, out)
    return {"read_s": read_s, "read_cpu_s": read_cpu_s, "write_s": time.perf_counter() - wall,
            "write_cpu_s": time.process_time() - cpu, "read_write_s": read_s + time.perf_counter() - wall,
            "decoded_mb": volume.array_kji.nbytes / 2**20, "growth_mb": (_peak_rss() - base) / 2**20,
            "output_mb": out.stat().st_size / 2**20}


def child_load(model: Path) -> dict:
    """``load``: ``import sam2unet_core`` and ``load_model`` of a Hiera-L checkpoint."""
    started = time.perf_counter()
    import sam2unet_core

    imported = time.perf_counter()
    sam2unet_core.load_model(model)
    loaded = time.perf_counter()
    return {"import_s": imported - started, "load_s": loaded - imported, "total_s": loaded - started,
            "peak_rss_mb": _peak_rss() / 2**20}


def child_labels() -> dict:
    """``labels``: CPU seconds of the label rule on random probabilities (with ties), on one
    torch thread (process CPU time of several threads counts their waiting too)."""
    import torch

    torch.set_num_threads(1)

    from sam2unet_core.inference.torch_runner import TorchRunner
    from sam2unet_core.metadata import Architecture, ModelMetadata

    result = {}
    for classes in (2, 4, 14):
        metadata = ModelMetadata(architecture=Architecture("hiera_t", num_classes=classes), input_size=32)
        runner = TorchRunner(lambda batch: batch, metadata, device="cpu")
        probs = torch.randint(0, 50, (8, classes, 512, 512), generator=torch.Generator().manual_seed(0)) / 50.0
        seconds = []
        for _ in range(6):
            started = time.process_time()
            runner._labels(probs)
            seconds.append(time.process_time() - started)
        result[f"classes{classes}_cpu_s"] = statistics.median(seconds[1:])
    return result


def child_main(argv: list[str]) -> int:
    kind, *paths = argv
    paths = [Path(p) for p in paths]
    result = {"ct": child_run, "folder": child_run, "io": child_io, "load": child_load,
              "labels": child_labels}[kind](*paths)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------- parent
def make_inputs(folder: Path, cases: int, case_shape: tuple[int, int, int], ct_shape: tuple[int, int, int],
                large_backbone: str, measures: list[str]) -> dict[str, Path]:
    """The CT, the folder of cases, the small model and the Hiera-L checkpoint (each built
    once in ``folder``, the models only for the measurements that use them)."""
    sys.path.insert(0, str(REPO))
    import torch

    from benchmarks.bench_volume import write_ct_phantom
    from sam2unet_core import ModelMetadata, SAM2UNet, save_model

    paths = {"ct": folder / "ct" / "ct_0000.nii.gz", "cases": folder / "cases",
             "small": folder / "hiera_t_32_2classes.safetensors", "large": folder / f"{large_backbone}.safetensors"}
    paths["ct"].parent.mkdir(parents=True, exist_ok=True)
    paths["cases"].mkdir(parents=True, exist_ok=True)
    if not paths["ct"].exists():
        write_ct_phantom(paths["ct"], ct_shape)
    for index in range(cases):
        case = paths["cases"] / f"case{index:02d}_0000.nii.gz"
        if not case.exists():
            write_ct_phantom(case, case_shape, seed=index + 1)
    torch.manual_seed(0)
    window = {"kind": "ct_window", "center": 40, "width": 400}
    for key, backbone, classes, size in (("small", "hiera_t", 2, 32), ("large", large_backbone, 1, 352)):
        used = {"small": ("ct", "folder"), "large": ("load",)}[key]
        if not paths[key].exists() and set(used) & set(measures):
            model = SAM2UNet(backbone, num_classes=classes)
            save_model(model, paths[key], ModelMetadata(architecture=model.architecture, input_size=size,
                                                        intensity=window))
    return paths


def run_child(tree: Path, argv: list[str]) -> dict:
    """Run this script's child mode with ``tree``'s ``sam2unet_core`` first on the path."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", *argv],
                          capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    results = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not results:
        raise RuntimeError(f"{tree}: {argv} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(results[-1][len("RESULT "):])


def same_labels(old: Path, new: Path) -> dict:
    """Voxels, affine, qform/sform and their codes of two label files."""
    import nibabel as nib
    import numpy as np

    a, b = nib.load(old), nib.load(new)
    return {"voxels_equal": bool(np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))),
            "dtype_equal": a.get_data_dtype() == b.get_data_dtype(),
            "geometry_equal": bool(np.array_equal(a.affine, b.affine)
                                   and np.array_equal(a.header.get_qform(), b.header.get_qform())
                                   and np.array_equal(a.header.get_sform(), b.header.get_sform())
                                   and a.header["qform_code"] == b.header["qform_code"]
                                   and a.header["sform_code"] == b.header["sform_code"])}


def summarise(runs: list[dict]) -> dict:
    """Medians per measurement, tree and figure; new/old ratios (old / new: > 1 is faster)."""
    summary: dict = {}
    for kind in {run["kind"] for run in runs}:
        medians = {}
        for tree in ("old", "new"):
            mine = [run["result"] for run in runs if run["kind"] == kind and run["tree"] == tree]
            medians[tree] = {key: statistics.median(r[key] for r in mine) for key in mine[0]}
        ratios = {key: medians["old"][key] / medians["new"][key]
                  for key in medians["new"] if key.endswith("_s") and medians["new"][key] > 0}
        summary[kind] = {"old": medians["old"], "new": medians["new"], "speedup": ratios}
    return summary


def print_table(summary: dict) -> None:
    for kind in MEASUREMENTS:
        if kind not in summary:
            continue
        print(f"\n## {kind}")
        print(f"{'figure':<16} {'old':>10} {'new':>10} {'old/new':>8}")
        for key, old in summary[kind]["old"].items():
            new = summary[kind]["new"][key]
            ratio = summary[kind]["speedup"].get(key)
            print(f"{key:<16} {old:>10.3f} {new:>10.3f} {'' if ratio is None else f'{ratio:8.2f}'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--old", type=Path, required=True, help="checkout of the old code (its root folder)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement per tree")
    parser.add_argument("--cases", type=int, default=20, help="cases in the folder")
    parser.add_argument("--case-shape", type=int, nargs=3, default=[192, 192, 24], metavar=("I", "J", "K"))
    parser.add_argument("--ct-shape", type=int, nargs=3, default=[512, 512, 300], metavar=("I", "J", "K"))
    parser.add_argument("--load-backbone", default="hiera_l", help="the checkpoint that `load` loads")
    parser.add_argument("--measure", nargs="+", choices=MEASUREMENTS, default=list(MEASUREMENTS))
    parser.add_argument("--workdir", type=Path, default=None, help="inputs are kept here (default: temporary)")
    parser.add_argument("--json", type=Path, default=None, help="also write all results here")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(argv[1:])
    args = build_parser().parse_args(argv)
    trees = {"old": args.old.resolve(), "new": REPO}
    header = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()} {platform.processor()}, {os.cpu_count()} cores",
              "old": str(trees["old"]), "command": " ".join(["bench_io.py", *argv])}
    for key, value in header.items():
        print(f"# {key}: {value}", flush=True)
    runs: list[dict] = []
    checks: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="sam2unet_bench_io_") as tmp:
        workdir = args.workdir or Path(tmp)
        paths = make_inputs(workdir, args.cases, tuple(args.case_shape), tuple(args.ct_shape), args.load_backbone,
                            args.measure)
        for repeat in range(args.repeats):
            order = ("old", "new") if repeat % 2 == 0 else ("new", "old")
            for kind in args.measure:
                outputs = {}
                for tree in order:
                    out = workdir / f"out_{kind}_{tree}"
                    argv_child = {"ct": ["ct", str(paths["ct"]), str(paths["small"]), str(out)],
                                  "folder": ["folder", str(paths["cases"]), str(paths["small"]), str(out)],
                                  "io": ["io", str(paths["ct"]), str(out / "labels.nii.gz")],
                                  "load": ["load", str(paths["large"])], "labels": ["labels"]}[kind]
                    out.mkdir(parents=True, exist_ok=True)
                    result = run_child(trees[tree], argv_child)
                    runs.append({"kind": kind, "tree": tree, "repeat": repeat, "result": result})
                    print(f"{kind:<7} {tree:<4} run {repeat}: " + ", ".join(
                        f"{k} {v:.2f}" for k, v in result.items()), flush=True)
                    outputs[tree] = out
                if kind in ("io", "ct"):
                    name = "labels.nii.gz" if kind == "io" else "ct.nii.gz"
                    checks.append({"kind": kind, **same_labels(outputs["old"] / name, outputs["new"] / name)})
    summary = summarise(runs)
    summary["outputs_identical"] = all(c["voxels_equal"] and c["dtype_equal"] and c["geometry_equal"]
                                       for c in checks)
    print_table(summary)
    print(f"\n# label files of old and new: identical voxels, type and geometry in every run: "
          f"{summary['outputs_identical']}")
    if args.json:
        args.json.write_text(json.dumps({"header": header, "runs": runs, "checks": checks,
                                         "summary": summary}, indent=2))
    return 0 if summary["outputs_identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
