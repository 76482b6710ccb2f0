"""Tiny real files for the training/evaluation tests: PraNet-layout PNG folders and an
nnU-Net/MSD volume dataset of NIfTI files (bright blobs on noise; labels follow the blobs)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image


def blob_picture(rng: np.random.Generator, height: int = 60, width: int = 70) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 ``(H, W, 3)`` with one bright ellipse and its 0/255 mask ``(H, W)``."""
    yy, xx = np.mgrid[:height, :width]
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    ry, rx = rng.uniform(0.12, 0.25) * height, rng.uniform(0.12, 0.25) * width
    mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    image = rng.normal(60, 15, (height, width, 3)) + mask[..., None] * np.array([120, 60, 40])
    return np.clip(image, 0, 255).astype(np.uint8), mask.astype(np.uint8) * 255


def write_polyp_folder(root: Path, count: int, seed: int = 0, mask_suffix: str = ".png") -> Path:
    """``root/images/<i>.jpg`` + ``root/masks/<i><mask_suffix>`` (the PraNet layout)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image, mask = blob_picture(rng)
        Image.fromarray(image).save(root / "images" / f"{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i}{mask_suffix}")
    return root


def blob_volume(rng: np.random.Generator, shape_kji: tuple[int, int, int] = (10, 40, 36)) -> tuple[np.ndarray, np.ndarray]:
    """Float image and int label ``(K, J, I)``: label 1 a bright box, label 2 a darker ball."""
    k, j, i = np.mgrid[: shape_kji[0], : shape_kji[1], : shape_kji[2]]
    label = np.zeros(shape_kji, np.uint8)
    c = rng.integers([3, 8, 8], [7, 16, 14])
    label[c[0] - 2 : c[0] + 2, c[1] - 5 : c[1] + 5, c[2] - 5 : c[2] + 5] = 1
    centre = rng.uniform([3, 24, 20], [7, 30, 28])
    label[((k - centre[0]) * 2) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2 <= 30] = 2
    image = rng.normal(100, 10, shape_kji) + (label == 1) * 300 + (label == 2) * 150
    return image.astype(np.float32), label


AXIAL_AFFINE = np.diag([-1.5, -1.2, 2.5, 1.0])  # RAS affine of an axial scan stored LPS-like
# A sagittal acquisition: i runs anterior, j superior, k to the patient's left.
SAGITTAL_AFFINE = np.array([[0.0, 0.0, -2.5, 0.0], [1.2, 0.0, 0.0, 0.0], [0.0, 1.5, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])


def write_msd_dataset(root: Path, count: int, seed: int = 0, classes: int = 3,
                      affine: np.ndarray = AXIAL_AFFINE) -> Path:
    """nnU-Net v2 layout: ``imagesTr/case_XXX_0000.nii.gz``, ``labelsTr/case_XXX.nii.gz`` and
    ``dataset.json``; ``classes == 2`` merges the labels into one foreground."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    for n in range(count):
        image, label = blob_volume(rng)
        if classes == 2:
            label = (label > 0).astype(np.uint8)
        # nibabel stores (i, j, k): transpose the KJI arrays.
        nib.save(nib.Nifti1Image(image.transpose(2, 1, 0), affine), root / "imagesTr" / f"case_{n:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label.transpose(2, 1, 0), affine), root / "labelsTr" / f"case_{n:03d}.nii.gz")
    labels = {"background": 0, "box": 1, "ball": 2} if classes == 3 else {"background": 0, "blob": 1}
    meta = {"channel_names": {"0": "MR"}, "labels": labels, "numTraining": count, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root
