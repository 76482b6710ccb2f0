"""A head-fitted SAM2-UNet and a phantom NIfTI volume for the ONNX tests (CPU).

The network is a random-weight hiera_t whose 1x1 head is fitted by ridge regression
(``benchmarks.common.fit_head``) to separate every other ellipse of ``phantom_batch``
images, in every orientation the engine may hand slices in, so its label maps follow the
image and agreement between backends measures something.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
INPUT_SIZE = 64
SLICES = 12
SIDE = 80  # slice side in the volume, unlike INPUT_SIZE so both resizes run


def fitted_case(folder: Path) -> tuple[Path, Path]:
    """Write ``fitted.safetensors`` (binary hiera_t, 1 channel) and ``phantom.nii.gz``
    ``(I, J, K) = (80, 80, 12)`` float32, identity affine, into ``folder``."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(REPO))
    from benchmarks.common import fit_head, phantom_batch
    from sam2unet_core.checkpoint import build_model, save_model
    from sam2unet_core.metadata import Architecture, ModelMetadata

    images, _ = phantom_batch(SLICES, 1, SIDE, seed=3)
    bright = (F.avg_pool2d(images, 5, stride=1, padding=2) > 1.0).float()
    torch.manual_seed(0)
    model = build_model(ModelMetadata(architecture=Architecture("hiera_t", 1, 1), input_size=INPUT_SIZE,
                                      intensity={"kind": "scale", "divisor": 1.0}, mean=[0.0], std=[1.0]))
    model.eval()
    views = torch.cat([images, images.transpose(2, 3), images.flip(2), images.flip(3)])
    masks = torch.cat([bright, bright.transpose(2, 3), bright.flip(2), bright.flip(3)])
    fit_head(model, F.interpolate(views, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False),
             F.interpolate(masks, size=(INPUT_SIZE, INPUT_SIZE), mode="nearest"))
    model_path = folder / "fitted.safetensors"
    save_model(model, model_path)
    volume = images[:, 0].permute(2, 1, 0).numpy().astype(np.float32)  # (I, J, K)
    image_path = folder / "phantom.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.diag([0.8, 0.8, 2.0, 1.0])), image_path)
    return model_path, image_path
