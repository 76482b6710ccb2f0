"""First and second Segment press on Slicer's real core (slicer-core), today's child process
per press against the warm worker (``SAM2UNetSlicerLib.WarmWorker``), side by side.

A 512x512x``--slices`` int16 CT phantom is loaded into a real MRML scene
(``vtkSlicerVolumesLogic``); ``SegmentationLogic`` segments it ``--presses`` times with each
runner (the same two-class Hiera-T at 32 px as ``bench_io.py``, so that the network is not
what is measured). For each press: its wall seconds, the stages the CLI reports in its
``case_done`` event (read, preprocess, model, postprocess, write) and the rest (start-up:
process, imports, model load; plus Slicer's export of the input and import of the labels).
The export alone is timed too. Medians over ``--repeats``::

    python benchmarks/bench_slicer_worker.py --repeats 3 --json benchmarks/results/cpu_slicer_worker.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "Testing"), str(REPO / "SAM2UNetSlicer")]

from benchmarks.bench_volume import write_ct_phantom  # noqa: E402
from slicer_core_app import SlicerCore, exportNode, slicer, vtk  # noqa: E402

from sam2unet_core import ModelMetadata, SAM2UNet, save_model  # noqa: E402
from SAM2UNetSlicerLib.Parameters import Device, RunParameters, SliceAxis  # noqa: E402
from SAM2UNetSlicerLib.ProcessRunner import SubprocessRunner  # noqa: E402
from SAM2UNetSlicerLib.SegmentationLogic import RunStatus, SegmentationLogic  # noqa: E402
from SAM2UNetSlicerLib.WarmWorker import WarmPredictRunner  # noqa: E402

STAGES = ("read", "preprocess", "model", "postprocess", "write")


def press(logic: SegmentationLogic, volume, params: RunParameters) -> dict:
    """One Segment press: wall seconds, the CLI's stages, the rest."""
    events: list[dict] = []
    logic.onLog = lambda line: events.append(json.loads(line)) if line.startswith('{"event": "case_done"') else None
    started = time.perf_counter()
    result = logic.runAndWait(volume, None, params, timeoutSeconds=1800)
    wall = time.perf_counter() - started
    if result.status is not RunStatus.succeeded:
        raise RuntimeError(result.message)
    slicer.mrmlScene.RemoveNode(result.segmentationNode)
    stages = {stage: events[-1]["timings"].get(stage, 0.0) for stage in STAGES}
    return {"wall_s": wall, **{f"{k}_s": v for k, v in stages.items()},
            "rest_s": wall - sum(stages.values())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--presses", type=int, default=2, help="Segment presses per runner and repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    header = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()} {platform.processor()}, {os.cpu_count()} cores",
              "volume": [512, 512, args.slices], "command": " ".join(["bench_slicer_worker.py", *(argv or sys.argv[1:])])}
    for key, value in header.items():
        print(f"# {key}: {value}", flush=True)
    core = SlicerCore()
    slicer.modules = core.modules()
    slicer.util.exportNode = exportNode
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    runs = []
    with tempfile.TemporaryDirectory(prefix="sam2unet_bench_slicer_") as tmp:
        folder = Path(tmp)
        image = write_ct_phantom(folder / "ct.nii.gz", (512, 512, args.slices))
        model = SAM2UNet("hiera_t", num_classes=2)
        checkpoint = save_model(model, folder / "small.safetensors", ModelMetadata(
            architecture=model.architecture, input_size=32, intensity={"kind": "ct_window", "center": 40, "width": 400}))
        slicer.mrmlScene = core.newScene()
        volume = core.loadVolume(image, "CT")
        started = time.perf_counter()
        exportNode(volume, str(folder / "export.nrrd"))
        exportSeconds = time.perf_counter() - started
        params = RunParameters(checkpoint, Device.cpu, SliceAxis.axial)
        for repeat in range(args.repeats):
            for kind in (("child", "warm") if repeat % 2 == 0 else ("warm", "child")):
                worker = WarmPredictRunner(cwd=str(REPO)) if kind == "warm" else None
                logic = SegmentationLogic(slicer, vtk, SubprocessRunner(cwd=str(REPO)), pythonExecutable=sys.executable,
                                          baseEnvironment=environment, predictRunner=worker)
                try:
                    for number in range(1, args.presses + 1):
                        run = {"runner": kind, "repeat": repeat, "press": number, **press(logic, volume, params)}
                        runs.append(run)
                        print(f"{kind:<5} repeat {repeat} press {number}: " + ", ".join(
                            f"{k} {v:.2f}" for k, v in run.items() if k.endswith("_s")), flush=True)
                finally:
                    if worker is not None:
                        worker.stop()
    summary: dict = {"export_s": exportSeconds}
    for kind in ("child", "warm"):
        for number in range(1, args.presses + 1):
            mine = [r for r in runs if r["runner"] == kind and r["press"] == number]
            summary[f"{kind}_press{number}"] = {k: statistics.median(r[k] for r in mine) for k in mine[0] if k.endswith("_s")}
    second = summary["warm_press2"]
    summary["warm_second_vs_child_second"] = summary["child_press2"]["wall_s"] / second["wall_s"]
    summary["warm_second_overhead_s"] = second["rest_s"] - exportSeconds  # beyond model, I/O and the export
    print(f"\n{'press':<13} " + " ".join(f"{k[:-2]:>11}" for k in second))
    for key, values in summary.items():
        if isinstance(values, dict):
            print(f"{key:<13} " + " ".join(f"{v:>11.2f}" for v in values.values()))
    print(f"# export of the input by Slicer: {exportSeconds:.2f} s")
    print(f"# second press, warm worker vs a child process: {summary['warm_second_vs_child_second']:.2f}x faster; "
          f"beyond the CLI's stages and the export it costs {summary['warm_second_overhead_s']:.2f} s "
          "(label import into the scene, process hand-over)")
    if args.json:
        args.json.write_text(json.dumps({"header": header, "runs": runs, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
