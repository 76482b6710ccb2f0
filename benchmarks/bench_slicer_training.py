"""Dice on held-out volumes after training in the Slicer module's Train section with 1, 2 and 4
labelled volumes at the same time budget, side by side.

Cases: the demo's brain volumes (``benchmarks.brain_data.build_brain_dataset``: variants of
nilearn's MNI152 template, grey and white matter). Each run starts a fresh scene of Slicer's
real core (slicer-core): the first N training cases are loaded (``AddArchetypeVolume``), each
with a segmentation of two segments, "grey matter" and "white matter", made from its label
map; ``TrainingLogic.runAndWait`` exports them and runs ``sam2unet-train --request ...
--progress jsonl`` in a child process for ``--minutes`` wall minutes, from scratch (Hiera-T),
or on a frozen SAM 2 trunk with ``--sam2 CHECKPOINT``; then ``SegmentationLogic`` segments each
held-out volume with the new model and its segments are compared with the held-out label
maps on the volume's grid (Dice per label; median over the held-out volumes)::

    nice -n 5 python benchmarks/bench_slicer_training.py --minutes 2 --threads 1 \\
        --json benchmarks/results/cpu_slicer_training.json
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

from slicer_core_app import SlicerCore, exportNode, slicer, vtk  # noqa: E402

from benchmarks.brain_data import build_brain_dataset  # noqa: E402
from sam2unet_core.metrics import mask_dice  # noqa: E402
from SAM2UNetSlicerLib.Parameters import Device, RunParameters, SliceAxis, TrainingBase, TrainingSettings  # noqa: E402
from SAM2UNetSlicerLib.ProcessRunner import SubprocessRunner  # noqa: E402
from SAM2UNetSlicerLib.SegmentationLogic import RunStatus, SegmentationLogic  # noqa: E402
from SAM2UNetSlicerLib.TrainingLogic import TrainingLogic, TrainingPair  # noqa: E402

NAMES = ["grey matter", "white matter"]


def run(core: SlicerCore, data: Path, labelled: int, held_out: list[str], args: argparse.Namespace,
        environment: dict[str, str], folder: Path) -> dict:
    """Train on the first ``labelled`` cases in a fresh scene, segment the held-out ones."""
    core.newScene()
    slicer.mrmlScene = core.scene
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (data / "imagesTr").glob("*_0000.nii.gz"))[:labelled]
    pairs = [TrainingPair(*core.loadSegmentedCase(data / "imagesTr" / f"{case}_0000.nii.gz",
                                                  data / "labelsTr" / f"{case}.nii.gz", NAMES, case))
             for case in cases]
    base = TrainingBase.sam2 if args.sam2 else TrainingBase.scratch
    settings = TrainingSettings(folder / f"model_{labelled}.safetensors", base, args.sam2, minutes=args.minutes,
                                device=Device(args.device))
    training = TrainingLogic(slicer, vtk, SubprocessRunner(cwd=str(REPO)), pythonExecutable=sys.executable,
                             baseEnvironment=environment)
    started = time.perf_counter()
    result = training.runAndWait(pairs, NAMES, settings, timeoutSeconds=args.minutes * 60 + 1800)
    train_seconds = time.perf_counter() - started
    if result.status is not RunStatus.succeeded:
        raise SystemExit(f"training on {labelled} volume(s) {result.status.value}: {result.message}")
    segmentation = SegmentationLogic(slicer, vtk, SubprocessRunner(cwd=str(REPO)), pythonExecutable=sys.executable,
                                     baseEnvironment=environment)
    scores: dict[str, list[float]] = {name: [] for name in NAMES}
    for case in held_out:
        volume, truth = core.loadSegmentedCase(data / "imagesTs" / f"{case}_0000.nii.gz",
                                               data / "labelsTs" / f"{case}.nii.gz", NAMES, case)
        segmented = segmentation.runAndWait(volume, None, RunParameters(result.modelPath, Device(args.device),
                                                                         SliceAxis.model), timeoutSeconds=1800)
        if segmented.status is not RunStatus.succeeded:
            raise SystemExit(f"segmenting {case} {segmented.status.value}: {segmented.message}")
        for name, segmentId in zip(NAMES, segmented.segmentIds):
            truthId = truth.GetSegmentation().GetSegmentIdBySegmentName(name)
            predicted = slicer.util.arrayFromSegmentBinaryLabelmap(segmented.segmentationNode, segmentId, volume) > 0
            expected = slicer.util.arrayFromSegmentBinaryLabelmap(truth, truthId, volume) > 0
            scores[name].append(mask_dice(predicted, expected))
    return {"labelled": labelled, "base": base.value, "steps": result.steps, "train_seconds": round(train_seconds, 1),
            "validation_dice": result.bestDice,
            **{f"dice_{name.replace(' ', '_')}": round(statistics.median(values), 4) for name, values in scores.items()},
            "per_case": scores}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labelled", type=int, nargs="+", default=[1, 2, 4], help="numbers of labelled volumes")
    parser.add_argument("--held-out", type=int, default=3, help="held-out volumes segmented and scored")
    parser.add_argument("--minutes", type=float, default=2.0, help="wall-clock training budget of each run")
    parser.add_argument("--resolution-mm", type=int, default=2, help="voxel size of the demo volumes")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of the training and segmenting processes")
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda, mps")
    parser.add_argument("--sam2", type=Path, default=None, metavar="CHECKPOINT",
                        help="SAM 2 / 2.1 hiera checkpoint: train adapters and decoder on its frozen trunk")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.sam2 is not None and not args.sam2.is_file():
        print(f"--sam2 {args.sam2}: no such file", file=sys.stderr)
        return 2
    threads = str(args.threads)
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    core = SlicerCore()
    slicer.modules = core.modules()
    slicer.util.exportNode = exportNode
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_slicer_training-") as tmp:
        folder = Path(tmp)
        data = build_brain_dataset(folder / "data", max(args.labelled), args.held_out, seed=0,
                                   resolution_mm=args.resolution_mm)
        held_out = sorted(p.name[: -len("_0000.nii.gz")] for p in (data / "imagesTs").glob("*_0000.nii.gz"))
        for labelled in args.labelled:
            row = run(core, data, labelled, held_out, args, environment, folder)
            rows.append(row)
            print(f"{labelled} labelled volume(s): {row['steps']} steps in {row['train_seconds']:.0f} s, held-out Dice "
                  f"grey matter {row['dice_grey_matter']:.4f}, white matter {row['dice_white_matter']:.4f}", flush=True)
    print("\n| labelled volumes | base | steps | train + export s | held-out Dice grey matter | white matter |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['labelled']} | {row['base']} | {row['steps']} | {row['train_seconds']:.0f} | "
              f"{row['dice_grey_matter']:.4f} | {row['dice_white_matter']:.4f} |")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "minutes": args.minutes, "threads": args.threads,
            "resolution_mm": args.resolution_mm, "held_out": held_out, "sam2": str(args.sam2 or ""), "rows": rows},
            indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
