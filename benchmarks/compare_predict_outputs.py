"""Run an older ``sam2unet-predict`` (a git commit) and this tree's on the same folder and
model, and compare every output file byte for byte (``predict_summary.json`` aside: it holds
timings). The model is written by the old code, so the new code also shows it reads
format-1 checkpoints (no ``plane``: axial).

    python benchmarks/compare_predict_outputs.py --old 53ecdf7

Inputs: nibabel's bundled anatomical NIfTI scans, pydicom's CT series and PNG frames of
one size and of mixed sizes. Exit code 0 when every file is identical.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = {  # name -> extra arguments
    "default": [],
    "probabilities_tta": ["--save-probabilities", "--tta"],
    "segnrrd_postprocess": ["--format", "seg.nrrd", "--postprocess", "largest_component", "fill_holes"],
    "sagittal_range": ["--axis", "sagittal", "--slice-range", "2:6", "--format", "nii"],
}
MAKE_INPUTS = r"""
import shutil, sys
from pathlib import Path
import nibabel as nib, numpy as np
from PIL import Image
root = Path(sys.argv[1]); root.mkdir(parents=True)
data = Path(nib.__file__).parent / "tests" / "data"
for name in ("anatomical.nii", "reoriented_anat_moved.nii"):
    shutil.copy(data / name, root / name)
from pydicom.data import get_testdata_file
ct = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" / "98892001" / "CT5N"
shutil.copytree(ct, root / "ctseries")
rng = np.random.default_rng(0)
for index, size in enumerate([(40, 48), (40, 48), (40, 48), (31, 17), (64, 50, 3)]):
    Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)).save(root / f"frame{index}.png")
"""
MAKE_MODEL = r"""
import sys, torch
from sam2unet_core import SAM2UNet, save_model
from sam2unet_core.metadata import Architecture, ModelMetadata, default_labels
torch.manual_seed(0)
kind = sys.argv[2]
channels = 3 if kind == "rgb" else 1
model = SAM2UNet("hiera_t", num_classes=3, in_channels=channels)
for p in model.parameters():
    torch.nn.init.normal_(p, std=0.05)
meta = ModelMetadata(architecture=Architecture("hiera_t", 3, channels), labels=default_labels(3, ["a", "b"]),
                     input_size=64, intensity={"kind": "percentile", "lower": 1, "upper": 99},
                     mean=[], std=[])
save_model(model, sys.argv[1], meta)
"""


def python(code_root: Path, args: list[str], allowed: tuple[int, ...] = (0,)) -> int:
    """Run Python with ``code_root`` first on the path; returns the exit code."""
    env = {**os.environ, "PYTHONPATH": str(code_root)}
    done = subprocess.run([sys.executable, *args], cwd=code_root, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode not in allowed:
        raise RuntimeError(f"{args[:3]} with {code_root} exited {done.returncode}: {done.stderr[-2000:]}")
    return done.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", default="53ecdf7", help="git commit of the old code")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="compare-predict-"))
    try:
        old = work / "old"
        old.mkdir()
        archive = subprocess.run(["git", "archive", args.old, "sam2unet_core"], cwd=REPO,
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        python(REPO, ["-c", MAKE_INPUTS, str(work / "inputs")])
        python(old, ["-c", MAKE_MODEL, str(work / "model.safetensors"), "grey"])
        differences = 0
        for name, extra in RUNS.items():
            outputs, codes = {}, {}
            for label, root in (("old", old), ("new", REPO)):
                outputs[label] = work / f"{name}_{label}"
                codes[label] = python(root, [  # 1: the RGB frame fails for a grey model
                    "-m", "sam2unet_core.cli.predict", "-i", str(work / "inputs"), "-o",
                    str(outputs[label]), "-m", str(work / "model.safetensors"), "--device",
                    "cpu", "--progress", "none", *extra], allowed=(0, 1))
            differences += codes["old"] != codes["new"]
            files = sorted(p.relative_to(outputs["old"]) for p in outputs["old"].rglob("*")
                           if p.is_file() and p.name != "predict_summary.json")
            new_files = sorted(p.relative_to(outputs["new"]) for p in outputs["new"].rglob("*")
                               if p.is_file() and p.name != "predict_summary.json")
            same = [f for f in files if f in new_files
                    and filecmp.cmp(outputs["old"] / f, outputs["new"] / f, shallow=False)]
            differ = sorted(set(files) ^ set(new_files) | (set(files) - set(same)))
            differences += len(differ)
            print(f"{name:<22} exit {codes['old']}/{codes['new']}, {len(same)} of {len(files)} files identical"
                  + (f"; differ: {[str(f) for f in differ]}" if differ else ""))
        return 1 if differences else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
