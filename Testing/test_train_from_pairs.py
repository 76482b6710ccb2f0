"""Training from volume pairs without a config (``sam2unet_core.train.from_pairs``, the Slicer
Train section's library) and continuing from a model (``model.init_from``): requests are
checked before training, events tell the progress, the model carries the request's labels,
fine-tuning keeps labels and adds new ones, and a cancelled run leaves nothing behind."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from train_data import AXIAL_AFFINE, blob_volume, write_msd_dataset

from sam2unet_core import build_model, load_model, save_model
from sam2unet_core.metadata import Architecture, Code, LabelInfo, ModelMetadata, default_labels
from sam2unet_core.train.config import load_config
from sam2unet_core.train.from_pairs import TrainingPair, TrainingRequest, train_from_pairs
from sam2unet_core.train.init_from import read_base_model
from sam2unet_core.train.trainer import train

LIVER = LabelInfo(1, "box", (221, 130, 101), Code("SCT", "123037004", "Anatomical Structure"),
                  Code("SCT", "10200004", "Liver"))
BALL = LabelInfo(2, "ball", (30, 200, 40))


def write_pairs(folder: Path, count: int, seed: int = 0, labels: int = 2) -> list[TrainingPair]:
    """Blob volumes as NIfTI pairs; ``labels == 1`` keeps the box only."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    for n in range(count):
        image, label = blob_volume(rng)
        if labels == 1:
            label = (label == 1).astype(np.uint8)
        nib.save(nib.Nifti1Image(image.transpose(2, 1, 0), AXIAL_AFFINE), folder / f"image_{n}.nii.gz")
        nib.save(nib.Nifti1Image(label.transpose(2, 1, 0), AXIAL_AFFINE), folder / f"label_{n}.nii.gz")
        pairs.append(TrainingPair(folder / f"image_{n}.nii.gz", folder / f"label_{n}.nii.gz", f"case {n}"))
    return pairs


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict], Path]:
    """A model trained from scratch on two pairs for 3 s: (model file, events, work folder)."""
    root = tmp_path_factory.mktemp("from_pairs")
    request = TrainingRequest(write_pairs(root / "pairs", 2), [LIVER, BALL], root / "models" / "blobs.safetensors",
                              minutes=0.05, device="cpu")
    events: list[dict] = []
    (root / "work").mkdir()
    train_from_pairs(request, events.append, work_folder=root / "work")
    return request.output, events, root / "work"


def test_request_round_trips_through_json(tmp_path: Path) -> None:
    request = TrainingRequest(write_pairs(tmp_path, 1), [LIVER, BALL], tmp_path / "m.safetensors", base="scratch",
                              plane="coronal", minutes=2.5, seed=3)
    again = TrainingRequest.from_json(request.to_json())
    assert again == request
    with pytest.raises(ValueError, match="not a training request"):
        TrainingRequest.from_json(json.dumps({"pairs": [], "labels": [], "output": "x", "colour": 1}))


def test_bad_pairs_are_refused_before_training_naming_the_file(tmp_path: Path) -> None:
    pairs = write_pairs(tmp_path, 2)
    shifted = tmp_path / "shifted_label.nii.gz"
    image = nib.load(pairs[1].label)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), AXIAL_AFFINE @ np.diag([1, 1, 2, 1])), shifted)
    off_grid = [pairs[0], TrainingPair(pairs[1].image, shifted, "case 1")]
    with pytest.raises(ValueError, match=r"shifted_label\.nii\.gz: pair 'case 1': the label map is not on the image"):
        train_from_pairs(TrainingRequest(off_grid, [LIVER, BALL], tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match=r"label_0\.nii\.gz: pair 'case 0': label values \[0, 1, 2\]; the request declares 1..1"):
        train_from_pairs(TrainingRequest(pairs, [LIVER], tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match="base_path: .*missing.safetensors: file not found"):
        train_from_pairs(TrainingRequest(pairs, [LIVER, BALL], tmp_path / "m.safetensors", base="model",
                                         base_path=str(tmp_path / "missing.safetensors")))
    assert not (tmp_path / "m.safetensors").exists()


def test_model_from_pairs_carries_the_request_labels_and_reports_events(trained) -> None:
    path, events, work = trained
    model = load_model(path)
    labels = model.metadata.labels
    assert [(lab.name, lab.color) for lab in labels] == [("box", LIVER.color), ("ball", BALL.color)]
    assert (labels[0].category, labels[0].type) == (LIVER.category, LIVER.type)
    names = [e["event"] for e in events]
    assert names[0] == "train_start" and names[-1] == "train_done" and "validation" in names
    assert events[0]["pairs"] == 2 and events[0]["held_out"] is False and events[0]["budget_s"] == pytest.approx(3.0)
    steps = [e for e in events if e["event"] == "train_step"]
    assert steps and all(e["loss"] > 0 for e in steps) and steps[-1]["eta_s"] is not None
    assert events[-1]["model"] == str(path.resolve()) and events[-1]["steps"] == len(steps)
    assert list(work.iterdir()) == []  # the temporary dataset and run folders are gone


def test_fine_tuning_keeps_labels_and_adds_a_new_one(trained, tmp_path: Path) -> None:
    path, _, _ = trained
    pairs = write_pairs(tmp_path / "pairs", 1, seed=5)
    extra = LabelInfo(3, "cyst", (0, 0, 250))
    # a third label: the box's lower half becomes "cyst"
    label = nib.load(pairs[0].label)
    array = np.asarray(label.dataobj).copy()
    box = np.argwhere(array == 1)
    array[tuple(box[box[:, 2] < box[:, 2].mean()].T)] = 3
    nib.save(nib.Nifti1Image(array, label.affine), pairs[0].label)
    events: list[dict] = []
    request = TrainingRequest(pairs, [LIVER, BALL, extra], tmp_path / "tuned.safetensors", base="model",
                              base_path=str(path), minutes=0.03, device="cpu")
    train_from_pairs(request, events.append)
    tuned = load_model(request.output).metadata
    assert tuned.class_names == ["box", "ball", "cyst"] and tuned.labels[2].color == (0, 0, 250)
    base = load_model(path).metadata
    assert tuned.architecture == Architecture(**{**base.architecture.__dict__, "num_classes": 4})
    assert (tuned.input_size, tuned.intensity, tuned.plane) == (base.input_size, base.intensity, base.plane)


def _binary_model(tmp_path: Path) -> Path:
    arch = Architecture("hiera_t", 1, 3, freeze_encoder=False, window_spec=(8, 4, 6, 3), full_res_channels=8)
    meta = ModelMetadata(architecture=arch, labels=default_labels(1, ["box"]), input_size=64, context_slices=1,
                         mean=[], std=[], intensity={"kind": "percentile", "lower": 0.5, "upper": 99.5})
    model = build_model(meta)
    torch.manual_seed(0)
    for p in model.parameters():  # trained-looking weights: the decoder is not all zero
        p.data.normal_(0, 0.05)
    return save_model(model, tmp_path / "binary.safetensors")


def test_a_binary_model_extended_to_softmax_starts_where_it_was(tmp_path: Path) -> None:
    base_path = _binary_model(tmp_path)
    base = read_base_model(base_path)
    arch = dataclasses.replace(base.metadata.architecture, num_classes=3)
    meta = ModelMetadata(architecture=arch, labels=default_labels(3, ["ball", "box"]), input_size=64,
                         context_slices=1, mean=[], std=[], intensity=base.metadata.intensity)
    new = build_model(meta)
    base.initialise(new, meta)
    old = load_model(base_path).eval()
    new.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        z, logits = old(x)[:, 0], new(x)
    # background logit 0, "box" (channel 2) = the binary logit: softmax(0, z) == sigmoid(z)
    assert torch.equal(logits[:, 0], torch.zeros_like(z))
    torch.testing.assert_close(logits[:, 2], z, rtol=0, atol=1e-6)


def test_init_from_refuses_another_network_or_missing_labels_naming_both_sides(tmp_path: Path) -> None:
    base_path = _binary_model(tmp_path)
    root = write_msd_dataset(tmp_path / "ds", 2, classes=3)
    common = [f"data.root={root}", "data.kind=volume", f"run.output={tmp_path / 'run'}", f"model.init_from={base_path}",
              "data.num_workers=0", "data.val_fraction=0"]
    with pytest.raises(ValueError, match=r"backbone: hiera_t in the model, hiera_s in the config"):
        train(load_config(None, [*common, "model.backbone=hiera_s"]))
    with pytest.raises(ValueError, match=r"input channels \(data.context_slices\): 3 in the model, 5 in the config"):
        train(load_config(None, [*common, "data.context_slices=2"]))
    # the model's settings stand in for the keys the config does not set ...
    config = load_config(None, common)
    assert (config.model.backbone, config.data.input_size, config.model.full_res_channels) == ("hiera_t", 64, 8)
    # ... and data without the model's label "box" are refused before any step
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "ball": 1, "cyst": 2},
                                                   "channel_names": {"0": "MR"}, "file_ending": ".nii.gz"}))
    with pytest.raises(ValueError, match=r"segments \['box'\]; the training data has no label named \['box'\]"):
        train(config)
    assert not (tmp_path / "run").exists()


def _cli(args: list[str], env: dict[str, str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sam2unet_core.cli.train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kwargs)


def test_cli_request_jsonl_bad_request_and_sigterm(tmp_path: Path) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    # torch keeps its compile cache under TMPDIR unless told otherwise: a cache, not a leftover
    env = {**os.environ, "TMPDIR": str(temp), "OMP_NUM_THREADS": "1",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "torch-cache")}
    bad = tmp_path / "bad.json"
    bad.write_text(TrainingRequest([], [LIVER], tmp_path / "m.safetensors").to_json())
    out, err = _cli(["--request", str(bad), "--progress", "jsonl"], env).communicate(timeout=120)
    assert "pairs: no training pairs given" in err
    assert json.loads(out.splitlines()[-1])["event"] == "train_error"

    request = TrainingRequest(write_pairs(tmp_path / "pairs", 2, labels=1), [LIVER], tmp_path / "m.safetensors",
                              minutes=5, device="cpu")
    good = tmp_path / "request.json"
    good.write_text(request.to_json())
    process = _cli(["--request", str(good), "--progress", "jsonl"], env)
    first = json.loads(process.stdout.readline())  # training has started
    assert first["event"] == "train_start" and first["labels"] == ["box"]
    time.sleep(1)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=120)
    assert process.returncode == 143
    assert not request.output.exists() and list(temp.iterdir()) == []
