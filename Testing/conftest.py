"""Shared fixtures: tiny random models and checkpoints in every official layout.

Nothing is downloaded: the SAM 2 and official SAM2-UNet files are written here with the
exact key layouts of the real ones, filled with random tensors of the hiera_t size.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from sam2unet_core import SAM2UNet, build_model, save_model
from sam2unet_core.metadata import Architecture, ModelMetadata
from sam2unet_core.model.blocks import UpBlock
from sam2unet_core.model.hiera import build_hiera_trunk

torch.set_num_threads(2)
# the repository root, for the scripts' shared modules (benchmarks.brain_data, the demo's data)
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))


@pytest.fixture(scope="session", autouse=True)
def onnx_export_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cache of ONNX exports (``sam2unet-predict --backend auto``) in a folder of the
    test session, for this process and the processes it starts, never the user's."""
    from sam2unet_core.export.cache import CACHE_ENV

    folder = tmp_path_factory.mktemp("sam2unet_cache")
    previous = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(folder)
    yield folder
    if previous is None:
        del os.environ[CACHE_ENV]
    else:
        os.environ[CACHE_ENV] = previous


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter and BN statistic with random values, so that a wrong key or a
    wrong op order changes the output (zero-initialised biases and unit BN would hide it)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            values = torch.randn(tensor.shape, generator=gen) * 0.05
            if name.endswith("running_var"):
                values = values.abs() + 0.5
            elif name.endswith(".weight") and tensor.ndim == 1:  # norm scales
                values = values + 1.0
            tensor.copy_(values)
    return module


@pytest.fixture(scope="session")
def tiny_model() -> SAM2UNet:
    """A hiera_t binary model with random weights, eval mode."""
    return randomize_(build_model(ModelMetadata(architecture=Architecture("hiera_t"))), seed=1).eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_model: SAM2UNet) -> Path:
    """``tiny_model`` saved in our safetensors format."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    return save_model(tiny_model, path)


def make_sam2_state(backbone: str = "hiera_t", seed: int = 2) -> dict:
    """A state dict in the layout of ``sam2_hiera_*.pt`` / ``sam2.1_hiera_*.pt``."""
    trunk = randomize_(build_hiera_trunk(backbone), seed=seed)
    model_state = {f"image_encoder.trunk.{k}": v for k, v in trunk.state_dict().items()}
    # A few of the other SAM 2 parts, which the loader must ignore.
    model_state["image_encoder.neck.convs.0.conv.weight"] = torch.randn(256, 768, 1, 1)
    model_state["sam_mask_decoder.iou_token.weight"] = torch.randn(1, 256)
    model_state["memory_encoder.out_proj.weight"] = torch.randn(64, 256, 1, 1)
    return {"model": model_state}


@pytest.fixture(scope="session")
def sam2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_tiny.pt"
    torch.save(make_sam2_state(), path)
    return path


def make_official_sam2unet_state(seed: int = 3) -> dict[str, torch.Tensor]:
    """``torch.save(model.state_dict())`` layout of the official SAM2-UNet code (hiera_t
    trunk for speed), including its unused ``up4`` block."""
    model = randomize_(SAM2UNet("hiera_t"), seed=seed)
    state = dict(model.state_dict())
    up4 = randomize_(UpBlock(128, 64), seed=seed + 1)
    state.update({f"up4.{k}": v for k, v in up4.state_dict().items()})
    return state


@pytest.fixture(scope="session")
def official_sam2unet_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("official") / "SAM2-UNet-20.pth"
    torch.save(make_official_sam2unet_state(), path)
    return path


@pytest.fixture(scope="session")
def grey_ct_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-class grey-input hiera_t model at 32 px with a CT window and named labels."""
    from sam2unet_core.metadata import Architecture, ModelMetadata, default_labels

    meta = ModelMetadata(
        architecture=Architecture("hiera_t", num_classes=3, in_channels=1),
        labels=default_labels(3, ["liver", "spleen"]),
        input_size=32, intensity={"kind": "ct_window", "center": 40, "width": 400},
        mean=[], std=[],
    )
    model = SAM2UNet("hiera_t", num_classes=3, in_channels=1)
    return save_model(model, tmp_path_factory.mktemp("model") / "tiny.safetensors", meta)
