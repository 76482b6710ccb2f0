"""The ``make demo`` data set, for the demo script, the tests and the benchmarks: real MRI
built offline from nilearn's MNI152 2009 T1 template and its grey- and white-matter
probability maps, which ship inside the nilearn package (no download).

Each case is a random variant of the template (rotation, scaling, shift, cropping, bias
field, gamma, intensity scale, noise), resampled with its tissue maps, so that labels follow
the anatomy: 1 = grey matter, 2 = white matter where that tissue's probability is > 0.5 and
the larger. Cases are written as an nnU-Net / Medical Segmentation Decathlon dataset
(``imagesTr``, ``labelsTr``, held-out ``imagesTs``/``labelsTs``, ``dataset.json``).

Scripts import it as ``benchmarks.brain_data`` with the repository root on ``sys.path``
(nilearn is a development requirement, not one of the package).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["DEMO_CONFIG", "LABELS", "build_brain_dataset"]

# the demo's training recipe (training/configs/demo_brain_cpu.yaml)
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "training" / "configs" / "demo_brain_cpu.yaml"
LABELS = {"background": 0, "grey_matter": 1, "white_matter": 2}


def _rotation(angles: np.ndarray) -> np.ndarray:
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _variant(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray, affine: np.ndarray,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One random case from the template. Arrays are nibabel (I, J, K); returns the image
    (float32, arbitrary MR units), the labels (uint8) and the cropped volume's affine."""
    from scipy.ndimage import affine_transform

    matrix = _rotation(np.deg2rad(rng.uniform(-10, 10, 3))) @ np.diag(rng.uniform(0.9, 1.1, 3))
    centre = (np.array(t1.shape) - 1) / 2
    offset = centre + rng.uniform(-4, 4, 3) - matrix @ centre  # output voxel o <- input matrix @ o + offset
    image, grey, white = (affine_transform(a, matrix, offset, order=1, mode="constant") for a in (t1, gm, wm))
    labels = np.argmax(np.stack([np.full(grey.shape, 0.5), grey, white]), axis=0).astype(np.uint8)
    # MR-like intensities: gamma, a smooth multiplicative bias field, scale and noise.
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in t1.shape), indexing="ij"))
    bias = np.exp(np.tensordot(rng.normal(0, 0.15, 3), grid, axes=1))
    scale = rng.uniform(300, 1200)
    image = np.clip(image, 0, None) ** rng.uniform(0.8, 1.25) * bias * scale
    image = (image + rng.normal(0, 0.02 * scale, image.shape)).astype(np.float32)
    max_crop = max(1, t1.shape[2] // 8)  # up to 1/8 of the slices off each end
    low, high = int(rng.integers(0, max_crop)), t1.shape[2] - int(rng.integers(0, max_crop))
    cropped = affine.copy()
    cropped[:3, 3] += affine[:3, 2] * low  # the new first k slice
    return image[:, :, low:high], labels[:, :, low:high], cropped


def build_brain_dataset(root: Path, train_cases: int, test_cases: int, seed: int = 0,
                        resolution_mm: int = 2, on_case: Callable[[str], None] | None = None) -> Path:
    """Write the data set (see the module docstring) to ``root``; returns ``root``.
    ``resolution_mm``: voxel size the template is resampled to (2 mm: 99 x 117 x 95).
    ``on_case``: called with a line per case written (the demo prints it)."""
    import nibabel as nib
    from nilearn import datasets

    template = datasets.load_mni152_template(resolution=resolution_mm)
    grey = datasets.load_mni152_gm_template(resolution=resolution_mm).get_fdata()
    white = datasets.load_mni152_wm_template(resolution=resolution_mm).get_fdata()
    t1 = template.get_fdata()
    rng = np.random.default_rng(seed)
    for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for n in range(train_cases + test_cases):
        split = "Tr" if n < train_cases else "Ts"
        image, labels, affine = _variant(t1, grey, white, template.affine, rng)
        nib.save(nib.Nifti1Image(image, affine), root / f"images{split}" / f"brain_{n:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(labels, affine), root / f"labels{split}" / f"brain_{n:03d}.nii.gz")
        if on_case is not None:
            on_case(f"  case brain_{n:03d} ({'training' if split == 'Tr' else 'held out'}): {image.shape} voxels")
    meta = {"name": "MNI152 2009 tissue demo", "channel_names": {"0": "T1"}, "labels": LABELS,
            "numTraining": train_cases, "file_ending": ".nii.gz",
            "description": "Random variants of nilearn's MNI152 2009 T1 template; GM/WM from its probability maps"}
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root
