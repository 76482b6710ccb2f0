"""Training data: PraNet folder pairing, nnU-Net/MSD dataset.json parsing, seeded sampling,
and training inputs identical to what the inference engine feeds the model."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from train_data import SAGITTAL_AFFINE, write_msd_dataset, write_polyp_folder

from sam2unet_core.inference.engine import Predictor
from sam2unet_core.inference.torch_runner import TorchRunner
from sam2unet_core.io.readers import read_volume
from sam2unet_core.train.config import load_config
from sam2unet_core.train.datasets import find_polyp_cases, read_volume_dataset, split_cases
from sam2unet_core.train.pipeline import build_training_data
from sam2unet_core.train.trainer import _metadata

VOLUME_OVERRIDES = [
    "data.kind=volume", "data.input_size=64", "data.mean=[]", "data.std=[]", "data.num_workers=0",
    "data.intensity={kind: percentile, lower: 1, upper: 99}", "augment.flip_prob=0", "model.backbone=hiera_t",
]


def test_polyp_folders_pair_images_and_masks_by_name(tmp_path: Path) -> None:
    root = write_polyp_folder(tmp_path / "TrainDataset", 3)
    (root / "images" / "2.png").rename(root / "images" / "2.jpg")
    cases = find_polyp_cases(root)
    assert [(c.name, c.image.name, c.label.name) for c in cases] == [
        ("0", "0.png", "0.png"), ("1", "1.png", "1.png"), ("2", "2.jpg", "2.png")]


def test_polyp_pairing_errors_name_the_unmatched_files(tmp_path: Path) -> None:
    root = write_polyp_folder(tmp_path / "Kvasir", 3)
    (root / "masks" / "1.png").rename(root / "masks" / "7.png")
    with pytest.raises(ValueError, match=r"1 images have no mask.*'1'.*1 masks have no image.*'7'"):
        find_polyp_cases(root)
    (root / "masks" / "7.png").rename(root / "masks" / "1.png")
    (root / "images" / "0.jpg").write_bytes((root / "images" / "0.png").read_bytes())
    with pytest.raises(ValueError, match="0.jpg and 0.png would both"):
        find_polyp_cases(root)
    with pytest.raises(FileNotFoundError, match="PraNet layout"):
        find_polyp_cases(tmp_path / "missing")


def test_msd_and_nnunet_v2_dataset_json(tmp_path: Path) -> None:
    root = write_msd_dataset(tmp_path / "Dataset001", 3)
    v2 = read_volume_dataset(root)
    assert v2.label_names == ["background", "box", "ball"]
    assert [c.name for c in v2.cases] == ["case_000", "case_001", "case_002"]
    assert v2.cases[0].image.name == "case_000_0000.nii.gz"
    # The MSD (v1) form: value -> name, and an explicit training list.
    meta = {"labels": {"0": "background", "1": "box", "2": "ball"}, "modality": {"0": "MRI"},
            "training": [{"image": "./imagesTr/case_001_0000.nii.gz", "label": "./labelsTr/case_001.nii.gz"}]}
    (root / "dataset.json").write_text(json.dumps(meta))
    v1 = read_volume_dataset(root)
    assert v1.label_names == ["background", "box", "ball"] and [c.name for c in v1.cases] == ["case_001"]
    meta["training"].append({"image": "./imagesTr/nope.nii.gz", "label": "./labelsTr/nope.nii.gz"})
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not exist.*nope"):
        read_volume_dataset(root)
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "whole": [1, 2]}}))
    with pytest.raises(ValueError, match="region labels"):
        read_volume_dataset(root)
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 2}}))
    with pytest.raises(ValueError, match="0..K-1"):
        read_volume_dataset(root)


def test_split_is_seeded_and_honours_named_cases(tmp_path: Path) -> None:
    cases = read_volume_dataset(write_msd_dataset(tmp_path / "d", 5)).cases
    train_a, val_a = split_cases(cases, 0.2, seed=1)
    train_b, val_b = split_cases(cases, 0.2, seed=1)
    assert [c.name for c in val_a] == [c.name for c in val_b] and len(val_a) == 1 and len(train_a) == 4
    train, val = split_cases(cases, 0.2, seed=1, val_names=["case_003"])
    assert [c.name for c in val] == ["case_003"] and "case_003" not in [c.name for c in train]
    with pytest.raises(ValueError, match="case_999"):
        split_cases(cases, 0.2, 0, val_names=["case_999"])


def test_volume_training_input_equals_the_inference_engine_input(tmp_path: Path) -> None:
    """Without augmentation, a training/validation slice is bit-for-bit (up to float
    rounding) what sam2unet-predict feeds the model: same plane view, intensity, 2.5D
    stack, resize and mean/std, here for a sagittally stored volume whose axial slices
    run along the array's j axis."""
    root = write_msd_dataset(tmp_path / "d", 3, affine=SAGITTAL_AFFINE)
    config = load_config(None, [f"data.root={root}", *VOLUME_OVERRIDES, "data.context_slices=1",
                                "data.val_cases=[case_001]", "data.mean=[0.5,0.4,0.3]", "data.std=[0.2,0.25,0.3]"])
    data = build_training_data(config)
    meta = _metadata(config, data)
    assert meta.architecture.in_channels == 3 and meta.context_slices == 1 and meta.architecture.num_classes == 3
    seen: list[torch.Tensor] = []

    def capture(batch: torch.Tensor) -> torch.Tensor:
        seen.append(batch.clone())
        return torch.zeros(batch.shape[0], 3, *batch.shape[2:])

    volume = read_volume(root / "imagesTr" / "case_001_0000.nii.gz")
    Predictor(TorchRunner(capture, metadata=meta, device="cpu"), batch_size=64).predict(volume, axis="axial")
    engine = torch.cat(seen)
    train_items = torch.stack([data.val[i]["image"] for i in range(len(data.val))])
    assert engine.shape == train_items.shape == (40, 3, 64, 64)  # J = 40 axial slices
    torch.testing.assert_close(train_items, engine, atol=1e-5, rtol=1e-5)


def test_samples_are_a_function_of_seed_epoch_and_index(tmp_path: Path) -> None:
    root = write_msd_dataset(tmp_path / "d", 3)
    overrides = [f"data.root={root}", *VOLUME_OVERRIDES, "augment.flip_prob=0.5", "augment.rotate_deg=20",
                 "augment.intensity_prob=0.5", "data.foreground_fraction=1.0", "data.samples_per_epoch=12"]
    data = build_training_data(load_config(None, overrides))
    again = build_training_data(load_config(None, overrides))
    first = [data.train[i] for i in range(12)]
    for i in (0, 5, 11):
        torch.testing.assert_close(again.train[i]["image"], first[i]["image"], rtol=0, atol=0)
    assert all(s["label"].sum() > 0 for s in first)  # foreground_fraction=1: foreground slices
    assert set(torch.unique(torch.cat([s["label"] for s in first])).tolist()) <= {0.0, 1.0, 2.0}
    data.train.set_epoch(1)
    assert not torch.equal(data.train[0]["image"], first[0]["image"])


def test_crop_size_trains_on_windows_of_the_network_size_sample(tmp_path: Path) -> None:
    """augment.crop_size: training samples are crop windows of the input_size sample (image
    and label cut together); validation keeps whole slices."""
    root = write_msd_dataset(tmp_path / "d", 3)
    common = [f"data.root={root}", *VOLUME_OVERRIDES, "data.foreground_fraction=1.0", "data.samples_per_epoch=6"]
    whole = build_training_data(load_config(None, common))
    cropped = build_training_data(load_config(None, [*common, "augment.crop_size=32"]))
    for i in range(6):
        sample, full = cropped.train[i], whole.train[i]
        assert sample["image"].shape == (3, 32, 32) and sample["label"].shape == (1, 32, 32)
        windows = full["image"].unfold(1, 32, 1).unfold(2, 32, 1)  # (3, 33, 33, 32, 32)
        hits = (windows == sample["image"][:, None, None]).flatten(3).all(-1).all(0).nonzero()
        assert len(hits) >= 1  # the crop is a window of the same (seeded) sample
        y, x = hits[0].tolist()
        torch.testing.assert_close(sample["label"], full["label"][:, y:y + 32, x:x + 32], rtol=0, atol=0)
    assert cropped.val[0]["image"].shape == (3, 64, 64)


def test_train_size_trains_at_its_own_scale_and_validates_at_input_size(tmp_path: Path) -> None:
    """augment.train_size: training samples are the slices resized to train_size, exactly as
    with data.input_size=train_size; validation slices stay at data.input_size."""
    root = write_msd_dataset(tmp_path / "d", 3)
    common = [f"data.root={root}", *VOLUME_OVERRIDES, "data.samples_per_epoch=6"]
    coarse = build_training_data(load_config(None, [*common, "augment.train_size=32"]))
    small = build_training_data(load_config(None, [*common, "data.input_size=32"]))
    for i in range(6):
        torch.testing.assert_close(coarse.train[i]["image"], small.train[i]["image"], rtol=0, atol=0)
        torch.testing.assert_close(coarse.train[i]["label"], small.train[i]["label"], rtol=0, atol=0)
    assert coarse.train[0]["image"].shape == (3, 32, 32)
    assert coarse.val[0]["image"].shape == (3, 64, 64)
    pictures = write_polyp_folder(tmp_path / "Kvasir", 4)
    polyp = build_training_data(load_config(None, [f"data.root={pictures}", "data.input_size=64", "data.num_workers=0",
                                                   "augment.train_size=32", "data.val_fraction=0.25"]))
    assert polyp.train[0]["image"].shape == (3, 32, 32) and polyp.train[0]["label"].shape == (1, 32, 32)
    assert polyp.val[0]["image"].shape == (3, 64, 64)


def test_labels_outside_dataset_json_are_rejected(tmp_path: Path) -> None:
    root = write_msd_dataset(tmp_path / "d", 3)
    path = root / "labelsTr" / "case_002.nii.gz"
    label = nib.load(path)
    data = np.asarray(label.dataobj).copy()
    data[0, 0, 0] = 5
    nib.save(nib.Nifti1Image(data, label.affine), path)
    with pytest.raises(ValueError, match=r"case_002.nii.gz holds label values \[0, 1, 2, 5\]"):
        build_training_data(load_config(None, [f"data.root={root}", *VOLUME_OVERRIDES]))


def test_disk_cache_serves_the_same_samples_and_is_keyed_by_the_settings(tmp_path: Path) -> None:
    root = write_msd_dataset(tmp_path / "d", 3)
    base = [f"data.root={root}", *VOLUME_OVERRIDES, "data.samples_per_epoch=4"]
    memory = build_training_data(load_config(None, base))
    disk = [*base, "data.cache=disk", f"data.cache_dir={tmp_path / 'cache'}"]
    for _ in range(2):  # written, then read back
        cached = build_training_data(load_config(None, disk))
        torch.testing.assert_close(cached.train[3]["image"], memory.train[3]["image"], rtol=0, atol=0)
    assert len(list((tmp_path / "cache" / "train").glob("*.pt"))) == 2
    build_training_data(load_config(None, [*disk, "data.intensity={kind: zscore}"]))
    assert len(list((tmp_path / "cache" / "train").glob("*.pt"))) == 4
