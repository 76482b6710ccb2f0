"""Tiny end-to-end training runs: checkpoints, frozen/unfrozen encoder, exact resume after an
interruption mid-epoch, and a 2-process torchrun (DDP on gloo)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_data import write_msd_dataset, write_polyp_folder

from sam2unet_core import load_model, read_metadata
from sam2unet_core.cli.train import main
from sam2unet_core.train.config import load_config
from sam2unet_core.train.resume import load_resume_state
from sam2unet_core.train.trainer import train

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.backbone=hiera_t", "data.input_size=64", "data.num_workers=0", "optim.batch_size=2",
        "run.resume_every_minutes=0", "run.log_every_steps=1"]


@pytest.fixture(scope="module")
def polyp_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_polyp_folder(tmp_path_factory.mktemp("polyp") / "TrainDataset", 8)


def test_one_epoch_with_sam2_weights_keeps_the_trunk_frozen(polyp_root: Path, sam2_checkpoint: Path,
                                                            tmp_path: Path) -> None:
    out = tmp_path / "run"
    rc = main([f"data.root={polyp_root}", *TINY, "optim.epochs=1", "data.val_fraction=0.25",
               f"model.sam2_checkpoint={sam2_checkpoint}", f"run.output={out}"])
    assert rc == 0
    model = load_model(out / "best.safetensors")
    meta = model.metadata
    assert meta.architecture.backbone == "hiera_t" and meta.architecture.freeze_encoder
    assert meta.class_names == ["polyp"] and meta.input_size == 64
    assert meta.provenance["epoch"] == 1 and 0.0 <= meta.provenance["val_dice"] <= 1.0
    assert meta.provenance["config"]["optim"]["lr"] == 1e-3  # the paper's defaults
    assert len(meta.provenance["val_cases"]) == 2
    # Frozen trunk: the Hiera weights are still those of the SAM 2 file.
    sam2 = torch.load(sam2_checkpoint, weights_only=True)["model"]
    trained = load_file(out / "last.safetensors")
    key = "blocks.3.block.attn.qkv.weight"
    assert torch.equal(trained[f"encoder.{key}"], sam2[f"image_encoder.trunk.{key.replace('block.', '')}"])
    state = load_resume_state(out / "resume.pt")  # weights_only=True
    assert state["epoch"] == 1 and state["batches_done"] == 0
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_multiclass_volume_run_without_weights_trains_the_whole_encoder(tmp_path: Path, caplog) -> None:
    root = write_msd_dataset(tmp_path / "Dataset002", 3)
    config = load_config(None, [f"data.root={root}", "data.kind=volume", *TINY, "optim.epochs=1",
                                "data.mean=[]", "data.std=[]", "data.context_slices=2",
                                "data.intensity={kind: zscore}", "data.samples_per_epoch=4",
                                "run.amp=bf16", f"run.output={tmp_path / 'run'}"])
    with caplog.at_level(logging.WARNING):
        result = train(config)
    assert "no SAM 2 checkpoint given" in caplog.text
    meta = load_model(result.output / "last.safetensors").metadata
    assert not meta.architecture.freeze_encoder
    assert meta.architecture.num_classes == 3 and meta.architecture.in_channels == 5
    assert meta.class_names == ["box", "ball"] and meta.context_slices == 2
    assert meta.intensity == {"kind": "zscore"} and meta.provenance["plane"] == "axial"


def _kill_mid_epoch(cmd: list[str], resume_path: Path, timeout: float = 240.0) -> dict:
    """Start a training process and SIGKILL it once its resume state is inside epoch 2."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline, seen = time.monotonic() + timeout, 0.0
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            stamp = resume_path.stat().st_mtime if resume_path.exists() else 0.0
            if stamp != seen:  # a new state was written (atomically): look inside
                seen = stamp
                state = load_resume_state(resume_path)
                if state["epoch"] == 1 and state["batches_done"] >= 1:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, "training ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return load_resume_state(resume_path)


def test_resume_after_a_kill_mid_epoch_is_exact(polyp_root: Path, sam2_checkpoint: Path, tmp_path: Path) -> None:
    # Frozen trunk (SAM 2 weights): adapters and decoder train; small optimiser state.
    common = [f"data.root={polyp_root}", *TINY, "optim.epochs=2", "data.val_fraction=0.25",
              "augment.rotate_deg=10", "augment.multiscale=[1.0,1.5]", f"model.sam2_checkpoint={sam2_checkpoint}"]
    # Every run in a fresh process, as users run it: the numerics of this pytest process
    # depend on what earlier tests loaded (native libraries, thread pools).
    script = [sys.executable, str(REPO / "training" / "train.py")]
    # Reference: 2 epochs of 3 steps in one go.
    subprocess.run([*script, *common, f"run.output={tmp_path / 'a'}"], check=True, capture_output=True)
    # The same run in another process, saving its state every step, killed (SIGKILL)
    # inside epoch 2, then resumed.
    out = tmp_path / "b"
    again = [*common, f"run.output={out}", "run.resume_every_steps=1"]
    state = _kill_mid_epoch([*script, *again], out / "resume.pt")
    assert state["epoch"] == 1 and 1 <= state["batches_done"] < 3
    assert read_metadata(out / "last.safetensors").provenance["epoch"] == 1
    subprocess.run([*script, *again], check=True, capture_output=True)
    reference, resumed = (read_metadata(folder / "best.safetensors").provenance for folder in (tmp_path / "a", out))
    assert resumed["epoch"] == reference["epoch"] and resumed["val_dice"] == reference["val_dice"]
    assert read_metadata(out / "last.safetensors").provenance["epoch"] == 2
    ref_w, res_w = load_file(tmp_path / "a" / "last.safetensors"), load_file(out / "last.safetensors")
    assert ref_w.keys() == res_w.keys()
    for key in ref_w:
        assert torch.equal(ref_w[key], res_w[key]), key
    ref_state, res_state = load_resume_state(tmp_path / "a" / "resume.pt"), load_resume_state(out / "resume.pt")
    assert ref_state["history"] == res_state["history"]
    assert ref_state["optimizer"]["param_groups"] == res_state["optimizer"]["param_groups"]  # learning rates
    for ref_opt, res_opt in zip(ref_state["optimizer"]["state"].values(), res_state["optimizer"]["state"].values()):
        assert torch.equal(ref_opt["exp_avg"], res_opt["exp_avg"]) and torch.equal(ref_opt["step"], res_opt["step"])


def test_resume_refuses_a_different_config(polyp_root: Path, sam2_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    base = [f"data.root={polyp_root}", *TINY, "data.val_fraction=0.25", f"run.output={out}",
            f"model.sam2_checkpoint={sam2_checkpoint}"]
    train(load_config(None, [*base, "optim.epochs=1", "run.stop_after_steps=2", "run.resume_every_steps=1"]))
    assert (out / "resume.pt").exists()
    with pytest.raises(ValueError, match=r"other \['optim'\] settings"):
        train(load_config(None, [*base, "optim.epochs=1", "optim.lr=0.01"]))


def test_two_process_torchrun_on_gloo(polyp_root: Path, sam2_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "training" / "train.py"), f"data.root={polyp_root}", *TINY, "optim.epochs=1",
           "optim.batch_size=1", "data.val_fraction=0.25", f"run.output={out}", f"model.sam2_checkpoint={sam2_checkpoint}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stderr  # rank 0 logs the world size
    assert proc.stdout.count("training done") == 1  # only rank 0 reports
    state = load_resume_state(out / "resume.pt")
    assert state["global_step"] == 3  # 6 training images / 2 processes / batch 1
    assert load_model(out / "best.safetensors").metadata.provenance["epoch"] == 1
