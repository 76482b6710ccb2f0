"""ONNX export (sam2unet-export): metadata, dynamic shapes, agreement with torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnx_case import REPO, fitted_case
from sam2unet_core.metrics import mask_dice
from sam2unet_core.checkpoint import load_model
from sam2unet_core.inference.torch_runner import TorchRunner
from sam2unet_core.io import read_volume
from sam2unet_core.io.orientation import plane_view
from sam2unet_core.preprocessing import apply_intensity, fit_intensity, stack_slices


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("onnx_case")
    model, image = fitted_case(folder)
    onnx_path = folder / "fitted.onnx"
    done = subprocess.run([sys.executable, "-m", "sam2unet_core.cli.export", str(model), "--format", "onnx",
                           "-o", str(onnx_path)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return {"model": model, "image": image, "onnx": onnx_path}


def test_export_embeds_metadata_opset_and_dynamic_axes(case) -> None:
    proto = onnx.load(str(case["onnx"]))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 1, "height", "width"]
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["sam2unet"]) == json.loads(load_model(case["model"]).metadata.to_json())


def test_export_refuses_an_old_opset_and_a_missing_model(tmp_path: Path) -> None:
    for args, words in ([str(tmp_path / "none.safetensors"), "-o", str(tmp_path / "x.onnx")], "not found"), \
                       (["m.safetensors", "-o", str(tmp_path / "x.onnx"), "--opset", "13"], "too old"):
        done = subprocess.run([sys.executable, "-m", "sam2unet_core.cli.export", *args], cwd=REPO,
                              capture_output=True, text=True)
        assert done.returncode != 0 and words in done.stderr
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("side", [(80, 80), (57, 91)])
def test_onnx_graph_agrees_with_the_torch_runner(case, side) -> None:
    """The graph (resize in, mean/std, network, sigmoid, resize back) against TorchRunner on
    the volume's real slices, at the slice size and at another, non-square one."""
    model = load_model(case["model"])
    volume = read_volume(case["image"])
    view = plane_view(volume.direction_lps, "axial")
    slices = view.to_plane(volume.array_kji)
    mapping = fit_intensity(volume.array_kji, model.metadata.intensity)
    raw = stack_slices(slices, range(slices.shape[0]), 0, 1)  # (12, 1, 80, 80)
    if side != raw.shape[2:]:
        import torch
        import torch.nn.functional as F

        raw = F.interpolate(torch.from_numpy(raw), size=side, mode="bilinear").numpy()
    runner = TorchRunner(model, device="cpu", precision="fp32")  # backends compared at fp32
    torch_labels, torch_probs = runner.submit(raw, mapping, side, False, True).result()
    session = ort.InferenceSession(str(case["onnx"]), providers=["CPUExecutionProvider"])
    onnx_probs = session.run(None, {"slices": apply_intensity(raw, mapping)})[0][:, 0]
    onnx_labels = (onnx_probs > 0.5).astype(np.uint8)
    assert 0.05 < torch_labels.mean() < 0.6  # the fitted head segments part of each slice
    max_diff = float(np.abs(onnx_probs - torch_probs).max())
    print(f"slices {side}: Dice {mask_dice(onnx_labels > 0, torch_labels > 0):.6f}, max probability diff {max_diff:.2e}")
    assert mask_dice(onnx_labels > 0, torch_labels > 0) >= 0.999
    assert max_diff < 1e-3
