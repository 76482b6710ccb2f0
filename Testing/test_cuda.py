"""CUDA paths, run only where a GPU is (``pytest -m cuda``; ``benchmarks/gpu_suite.sh`` runs
them on the GPU machine): fp16 inference against fp32, a bf16 training step and its resume,
``sam2unet-predict --device cuda`` and ``--device auto`` on real NIfTI files, and a
one-process NCCL ``torchrun`` start. Skipped without CUDA, so CI stays green.

Only public entry points are used (the CLIs, ``sam2unet_core.train``, ``load_model``/
``save_model``), so these tests do not depend on the engine's internals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from train_data import write_polyp_folder

from sam2unet_core import build_model, load_model, save_model
from sam2unet_core.cli import predict
from sam2unet_core.metadata import Architecture, ModelMetadata
from sam2unet_core.metrics import mask_dice
from sam2unet_core.train.config import load_config
from sam2unet_core.train.resume import load_resume_state
from sam2unet_core.train.trainer import train

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `benchmarks` is a folder of the repository, not installed
from benchmarks.common import fit_head, phantom_batch  # noqa: E402

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
TINY_TRAIN = ["model.backbone=hiera_t", "data.input_size=64", "data.num_workers=0",
              "optim.batch_size=2", "run.resume_every_minutes=0", "run.log_every_steps=1",
              "data.val_fraction=0.25", "run.device=cuda"]


def _predict(image: Path, model: Path, out: Path, *extra: str) -> tuple[np.ndarray, dict]:
    """One ``sam2unet-predict`` run; returns the label array and the run summary."""
    code = predict.main(["-i", str(image), "-o", str(out), "-m", str(model), "--progress", "none",
                         "--overwrite", *extra])
    assert code == 0
    summary = json.loads((out / "predict_summary.json").read_text())
    labels = np.asarray(nib.load(summary["cases"][0]["output"]).dataobj)
    return labels, summary


@pytest.fixture(scope="module")
def fitted_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A hiera_t model whose head is fitted (ridge regression) to segment the bright ellipses
    of a phantom, and that phantom as a 128x128x16 float32 NIfTI: a model with confident,
    meaningful label maps, as a trained one has, in seconds."""
    folder = tmp_path_factory.mktemp("fitted")
    images, _ = phantom_batch(16, 1, 128, seed=3)
    bright = F.avg_pool2d(images, 5, stride=1, padding=2) > 1.0  # the brighter ellipses
    torch.manual_seed(0)
    model = build_model(ModelMetadata(architecture=Architecture("hiera_t"), input_size=128,
                                      intensity={"kind": "scale", "divisor": 1.0}, mean=[], std=[]))
    model = model.cuda().eval()
    # every orientation the engine may hand the slices in
    views = torch.cat([images, images.transpose(2, 3), images.flip(2), images.flip(3)])
    masks = torch.cat([bright, bright.transpose(2, 3), bright.flip(2), bright.flip(3)]).float()
    fit_head(model, views.repeat(1, 3, 1, 1).cuda(), masks.cuda())
    model_path = folder / "fitted.safetensors"
    save_model(model.cpu(), model_path)
    volume = images[:, 0].permute(2, 1, 0).numpy().astype(np.float32)  # (I, J, K)
    image_path = folder / "phantom.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), image_path)
    return model_path, image_path


def test_fp16_inference_agrees_with_fp32(fitted_case: tuple[Path, Path], tmp_path: Path) -> None:
    model, image = fitted_case
    mixed, summary = _predict(image, model, tmp_path / "fp16", "--device", "cuda")
    full, _ = _predict(image, model, tmp_path / "fp32", "--device", "cuda", "--precision", "fp32")
    assert "cuda" in summary["device"].lower()
    foreground = float((full > 0).mean())
    assert 0.05 < foreground < 0.6, f"the fitted model should segment the ellipses, got {foreground:.3f}"
    assert mask_dice(mixed > 0, full > 0) >= 0.999


def test_device_auto_picks_cuda(fitted_case: tuple[Path, Path], tmp_path: Path) -> None:
    model, image = fitted_case
    _, summary = _predict(image, model, tmp_path / "auto", "--device", "auto")
    assert "cuda" in summary["device"].lower(), summary["device"]


@pytest.mark.parametrize("name", ["anatomical.nii", "reoriented_anat_moved.nii"])
def test_predict_on_cuda_reads_and_writes_a_real_nifti(name: str, fitted_case: tuple[Path, Path],
                                                       tmp_path: Path) -> None:
    model, _ = fitted_case
    image = NIBABEL_DATA / name
    labels, summary = _predict(image, model, tmp_path / "out", "--device", "cuda")
    assert labels.shape == nib.load(image).shape[:3]
    assert summary["cases"][0]["slices"] > 0


def test_bf16_training_step_and_resume_on_cuda(tmp_path: Path) -> None:
    root = write_polyp_folder(tmp_path / "TrainDataset", 8)
    common = [f"data.root={root}", *TINY_TRAIN, "run.amp=bf16", "optim.epochs=2",
              f"run.output={tmp_path / 'run'}", "run.resume_every_steps=1"]
    first = train(load_config(None, [*common, "run.stop_after_steps=2"]))
    assert first.stopped_early
    state = load_resume_state(tmp_path / "run" / "resume.pt")
    assert state["global_step"] == 1  # stop_after_steps stops as if killed: step 2 is unsaved
    resumed = train(load_config(None, common))
    assert resumed.epochs_done == 2 and not resumed.stopped_early
    state = load_resume_state(tmp_path / "run" / "resume.pt")
    assert state["global_step"] == 6  # 2 epochs of 6 training images in batches of 2
    model = load_model(tmp_path / "run" / "last.safetensors")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert 0.0 <= model.metadata.provenance["val_dice"] <= 1.0


NCCL_SCRIPT = """
import os, sys
import torch, torch.distributed as dist
dist.init_process_group("nccl")
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
value = torch.ones(4, device="cuda")
dist.all_reduce(value)
print("nccl all_reduce", dist.get_backend(), dist.get_world_size(), value.tolist(), flush=True)
dist.destroy_process_group()
from sam2unet_core.cli.train import main
raise SystemExit(main(sys.argv[1:]))
"""


def test_one_process_nccl_torchrun_start(tmp_path: Path) -> None:
    root = write_polyp_folder(tmp_path / "TrainDataset", 4)
    script = tmp_path / "nccl_train.py"
    script.write_text(NCCL_SCRIPT)
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(script), f"data.root={root}", *TINY_TRAIN, "optim.epochs=1", f"run.output={out}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nccl all_reduce nccl 1 [1.0, 1.0, 1.0, 1.0]" in proc.stdout
    assert proc.stdout.count("training done") == 1
    assert load_model(out / "best.safetensors").metadata.provenance["epoch"] == 1
