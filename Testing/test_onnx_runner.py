"""Torch-free inference: OnnxRunner behind the Predictor, sam2unet-predict -m model.onnx."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from onnx_case import REPO, fitted_case
from sam2unet_core.metrics import mask_dice
from sam2unet_core.io import read_volume

NO_TORCH_RUN = """
import sys
from sam2unet_core.cli.predict import main
code = main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "monai", "sam2") if m in sys.modules)
print("IMPORTED:" + ",".join(heavy))
sys.exit(code)
"""


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from sam2unet_core.checkpoint import load_model
    from sam2unet_core.export.onnx import export_onnx

    folder = tmp_path_factory.mktemp("onnx_runner")
    model, image = fitted_case(folder)
    onnx_path = export_onnx(load_model(model), folder / "fitted.onnx")
    return {"model": model, "image": image, "onnx": onnx_path}


def _predict(model: Path, image: Path, out: Path, *extra: str, no_torch: bool = False):
    command = ([sys.executable, "-c", NO_TORCH_RUN] if no_torch
               else [sys.executable, "-m", "sam2unet_core.cli.predict"])
    done = subprocess.run([*command, "-i", str(image), "-o", str(out), "-m", str(model),
                           "--device", "cpu", "--progress", "none", *extra],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_predict_with_onnx_never_imports_torch_and_writes_the_same_outputs(case, tmp_path) -> None:
    done = _predict(case["onnx"], case["image"], tmp_path / "onnx", "--save-probabilities", no_torch=True)
    assert "IMPORTED:\n" in done.stdout, done.stdout
    labels = read_volume(tmp_path / "onnx" / "phantom.nii.gz")
    image = read_volume(case["image"])
    assert labels.shape_kji == image.shape_kji
    np.testing.assert_allclose(labels.spacing_ijk, image.spacing_ijk)
    np.testing.assert_allclose(labels.direction_lps, image.direction_lps)
    assert 0.05 < (labels.array_kji > 0).mean() < 0.6
    summary = json.loads((tmp_path / "onnx" / "predict_summary.json").read_text())
    assert [c["status"] for c in summary["cases"]] == ["ok"]
    assert list((tmp_path / "onnx" / "probabilities").iterdir())


@pytest.mark.parametrize("tta", [False, True])
def test_onnx_and_torch_backends_give_equal_labels(case, tmp_path, tta) -> None:
    """Both backends through the same CLI and batch layer on the same NIfTI volume."""
    extra = ("--tta",) if tta else ()
    _predict(case["onnx"], case["image"], tmp_path / "onnx", *extra)
    _predict(case["model"], case["image"], tmp_path / "torch", *extra, "--precision", "fp32")
    onnx_labels = read_volume(tmp_path / "onnx" / "phantom.nii.gz").array_kji
    torch_labels = read_volume(tmp_path / "torch" / "phantom.nii.gz").array_kji
    assert (torch_labels > 0).any()
    assert mask_dice(onnx_labels > 0, torch_labels > 0) >= 0.999


def test_onnx_metadata_and_bad_files(case, tmp_path) -> None:
    from sam2unet_core.checkpoint import load_model, read_metadata
    from sam2unet_core.inference.onnx_runner import OnnxRunner, read_onnx_metadata

    assert read_onnx_metadata(case["onnx"]).to_dict() == load_model(case["model"]).metadata.to_dict()
    assert read_metadata(case["onnx"]).to_dict() == read_onnx_metadata(case["onnx"]).to_dict()
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    with pytest.raises(ValueError, match="broken.onnx: not a readable ONNX model"):
        OnnxRunner(broken)
    done = subprocess.run([sys.executable, "-m", "sam2unet_core.cli.predict", "-i", str(case["image"]),
                           "-o", str(tmp_path / "out"), "-m", str(broken), "--progress", "none"],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and "broken.onnx: not a readable ONNX model" in done.stderr
    assert not (tmp_path / "out" / "phantom.nii.gz").exists()
    # the model layer reads an ONNX file's metadata below the runners: no torch, no runner module
    code = ("import sys; from sam2unet_core.metadata import read_metadata; "
            f"labels = read_metadata({str(case['onnx'])!r}).class_names; "
            "assert 'torch' not in sys.modules and 'sam2unet_core.inference.onnx_runner' not in sys.modules; "
            "print(labels)")
    shown = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert shown.stdout.strip() == str(read_onnx_metadata(case["onnx"]).class_names)


def test_the_precision_that_ran_is_stated_and_onnx_files_refuse_another(case, tmp_path) -> None:
    """``--precision bf16`` (emulated on CPUs without native bf16) is what the log line and
    the run summary state; an ONNX file runs at its own precision, so the flag is refused."""
    done = _predict(case["model"], case["image"], tmp_path / "bf16", "--precision", "bf16")
    summary = json.loads((tmp_path / "bf16" / "predict_summary.json").read_text())
    assert "), bf16 Hiera stages 3-4 (bf16 asked" in summary["device"]
    assert summary["device"].startswith("cpu: CPU (") and "bf16 Hiera stages 3-4 (bf16 asked" in done.stderr
    refused = subprocess.run([sys.executable, "-m", "sam2unet_core.cli.predict", "-i", str(case["image"]),
                              "-o", str(tmp_path / "onnx"), "-m", str(case["onnx"]), "--precision", "bf16"],
                             cwd=REPO, capture_output=True, text=True)
    assert refused.returncode == 2
    assert "an ONNX file runs at the precision it was written with" in refused.stderr
