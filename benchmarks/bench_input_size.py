"""Held-out Dice of trained models predicted at several input sizes, without retraining.

A model's ``input_size`` (its metadata) is the side every slice is resized to before the
network. When a volume dataset is trained with ``augment.train_size`` set, training never
sees ``data.input_size`` (slices are resized to ``train_size``; only the validation at the
end uses ``input_size``; 2D pictures are cached at ``input_size`` first), so the trained
weights are the same whatever ``input_size`` is, and the best one can be chosen afterwards
on the held-out cases of the demo data::

    python benchmarks/bench_quality.py --models sam2unet --steps 300 --seeds 0 --work runs/a
    python benchmarks/bench_input_size.py runs/a/sam2unet-300steps-seed0/model/best.safetensors \\
        --data runs/a/Dataset001_MNIBrain_2mm_8_3 --sizes 192 224 256

Prints one row per model and size (Dice and HD95 per class, inference CPU seconds per slice;
``--tta``: predictions averaged over flips, as ``sam2unet-predict --tta``)
and writes them as JSON under ``benchmarks/results/``. Grey matter is label 1, white matter 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` and the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_quality import RESULTS, evaluate_predictions, predict_cases  # noqa: E402
from benchmarks.common import machine_description  # noqa: E402

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path, help="trained checkpoints (best.safetensors)")
    parser.add_argument("--data", type=Path, required=True,
                        help="the demo dataset the models were trained on (imagesTs, labelsTs)")
    parser.add_argument("--sizes", nargs="+", type=int, required=True, help="input sizes (multiples of 32)")
    parser.add_argument("--tta", action="store_true", help="average each prediction over flips (3 passes per slice)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--work", type=Path, default=Path("bench_input_size_runs"), help="predictions, evaluations")
    parser.add_argument("--json", type=Path, default=None,
                        help="result file (default benchmarks/results/input_size_<date>.json)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from sam2unet_core import load_model
    from sam2unet_core.inference.engine import Predictor

    parser = build_parser()
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    images = sorted((args.data / "imagesTs").glob("*_0000.nii.gz"))
    if not images:
        parser.error(f"--data {args.data}: no held-out images (imagesTs/*_0000.nii.gz)")
    models = [load_model(path, device="cpu") for path in args.models]
    for path, model in zip(args.models, models):  # every size checked before any prediction
        for size in args.sizes:
            try:
                dataclasses.replace(model.metadata, input_size=size).validate()
            except ValueError as error:
                parser.error(f"--sizes {size} for {path}: {error}")
    rows = []
    for index, (path, model) in enumerate(zip(args.models, models)):
        checkpoint_size = model.metadata.input_size
        for size in args.sizes:
            model.metadata = dataclasses.replace(model.metadata, input_size=size)
            out = args.work.resolve() / f"model{index}_{size}"
            row = {"model": str(path), "checkpoint_input_size": checkpoint_size, "input_size": size, "tta": args.tta}
            row.update(predict_cases(Predictor(model, device="cpu", batch_size=8), images, out / "predictions",
                                     model.metadata.trained_planes, tta=args.tta))
            row.update(evaluate_predictions(out / "predictions", args.data / "labelsTs", out / "evaluation"))
            rows.append(row)
            scores = (f"Dice GM {row['Dice_1']:.4f} WM {row['Dice_2']:.4f}  "
                      f"HD95 GM {row['HD95_1']:.2f} WM {row['HD95_2']:.2f}")
            print(f"model {index} ({path}) at {size:>4d} px{' with TTA' if args.tta else ''}: {scores}  "
                  f"infer CPU s/slice {row['infer_cpu_s_per_slice']:.3f}", flush=True)
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python benchmarks/bench_input_size.py "
                         + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine_description(torch.device("cpu")), "data": str(args.data), "rows": rows}
    result_path = args.json or RESULTS / f"input_size_{datetime.date.today().isoformat()}.json"
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(report, indent=2))
    print(f"results: {result_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
