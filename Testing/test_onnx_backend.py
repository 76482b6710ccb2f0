"""Which backend runs a checkpoint (``inference.backend``) and the cache of its ONNX exports
(``export.cache``): the rule on every kind of CPU (the CPU's bf16 is passed in, never read
from this machine), an export made once and reused, a new one for a changed model, a corrupt
cached file rebuilt with a warning, torch when the cache cannot be written, and the backend
stated in the run summary. Agreement of the labels on real volumes: test_onnx_agreement.py.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sam2unet_core import SAM2UNet, save_model
from sam2unet_core.export.cache import CACHE_ENV, cache_dir, cached_export_path
from sam2unet_core.inference.backend import BackendChoice, choose_backend, load_predictor
from sam2unet_core.io import Volume
from sam2unet_core.metadata import Architecture, ModelMetadata

from conftest import randomize_

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("device, precision, native_bf16, installed, expected", [
    ("cpu", "auto", False, True, "onnxruntime"),  # AVX2, AVX-512 without bf16: torch would run fp32
    ("cpu", "fp32", True, True, "onnxruntime"),  # fp32 asked on an AMX CPU
    ("cpu", "auto", True, True, "torch"),  # native bf16: torch's bf16 Hiera stages 3-4
    ("cpu", "bf16", False, True, "torch"),
    ("cpu", "fp16", False, True, "torch"),
    ("cpu", "auto", False, False, "torch"),  # onnxruntime or onnx missing
    ("cuda", "auto", False, True, "torch"),
    ("mps", "fp32", False, True, "torch"),
])
def test_auto_picks_onnx_runtime_only_where_torch_would_run_fp32_on_a_cpu(device, precision, native_bf16,
                                                                         installed, expected) -> None:
    choice = choose_backend("auto", device, precision, native_bf16, installed)
    assert choice.name == expected and choice.reason.startswith("auto")


def test_explicit_backends_and_what_onnx_runtime_cannot_run() -> None:
    assert choose_backend("torch", "cpu", "auto", False, True) == BackendChoice("torch", "asked")
    assert choose_backend("onnxruntime", "cuda", "fp32", True, True).name == "onnxruntime"
    for args, message in [(("tensorrt", "cpu", "auto", False, True), "not one of"),
                          (("onnxruntime", "cpu", "bf16", False, True), "precision 'bf16' needs backend torch"),
                          (("onnxruntime", "mps", "auto", False, True), "not mps"),
                          (("onnxruntime", "cpu", "auto", False, False), "needs the onnxruntime and onnx")]:
        with pytest.raises(ValueError, match=message):
            choose_backend(*args)


@pytest.fixture(scope="module")
def small_model() -> SAM2UNet:
    """A random 3-class grey hiera_t model at 32 px (a cheap export)."""
    from sam2unet_core import build_model

    meta = ModelMetadata(architecture=Architecture("hiera_t", num_classes=3, in_channels=1), input_size=32,
                         intensity={"kind": "zscore"}, mean=[], std=[])
    return randomize_(build_model(meta), seed=5).eval()


@pytest.fixture(scope="module")
def exported(small_model, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``small_model`` saved, then run once by ``auto`` on a CPU without native bf16: its
    export is in ``cache`` (the log of that first run in ``log``)."""
    folder = tmp_path_factory.mktemp("exported")
    checkpoint = save_model(small_model, folder / "model.safetensors")
    handler, logger = _Collect(), logging.getLogger("sam2unet_core")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        predictor = load_predictor(checkpoint, device="cpu", cache_folder=folder / "onnx", native_bf16=False)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return {"checkpoint": checkpoint, "cache": folder / "onnx", "predictor": predictor, "log": handler.text}


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.text = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.text += record.getMessage() + "\n"


def _volume() -> Volume:
    return Volume(np.random.default_rng(3).normal(0, 1, (4, 40, 36)).astype(np.float32))


def test_the_export_is_made_once_reused_and_keyed_by_the_model_file(small_model, exported, caplog) -> None:
    checkpoint, cache, first = exported["checkpoint"], exported["cache"], exported["predictor"]
    cached = cached_export_path(checkpoint, cache)
    assert [p.name for p in cache.iterdir()] == [cached.name] and "exported to ONNX" in exported["log"]
    assert first.description.startswith("onnxruntime cpu:") and f"export cached as {cached}" in first.description
    assert "onnxruntime backend: auto: CPU without native bf16" in first.description
    stamp = cached.stat().st_mtime_ns
    caplog.set_level(logging.INFO)
    again = load_predictor(checkpoint, device="cpu", cache_folder=cache, native_bf16=False)
    assert "exported to ONNX" not in caplog.text and cached.stat().st_mtime_ns == stamp
    torch_run = load_predictor(checkpoint, device="cpu", precision="fp32", backend="torch")
    assert "torch backend: asked" in torch_run.description
    np.testing.assert_array_equal(again.predict(_volume()).labels.array_kji,
                                  torch_run.predict(_volume()).labels.array_kji)
    changed = checkpoint.with_name("changed.safetensors")
    changed.write_bytes(checkpoint.read_bytes())
    assert cached_export_path(changed, cache).name.split("-")[-1] == cached.name.split("-")[-1]  # same bytes
    save_model(randomize_(SAM2UNet("hiera_t", num_classes=3, in_channels=1), seed=6), changed, small_model.metadata)
    assert cached_export_path(changed, cache).name.split("-")[-1] != cached.name.split("-")[-1]  # other weights


def test_a_corrupt_cached_export_is_rebuilt_with_a_warning(exported, tmp_path, caplog) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    cached = cached_export_path(exported["checkpoint"], cache)
    good = cached_export_path(exported["checkpoint"], exported["cache"]).read_bytes()
    cached.write_bytes(good[: len(good) // 2])  # a torn copy
    with caplog.at_level(logging.WARNING):
        rebuilt = load_predictor(exported["checkpoint"], device="cpu", backend="onnxruntime", cache_folder=cache)
    assert f"the cached ONNX export {cached} cannot be used" in caplog.text and "exporting it again" in caplog.text
    assert cached.read_bytes() == good
    assert rebuilt.predict(_volume()).labels.shape_kji == (4, 40, 36)


def test_auto_runs_torch_when_the_cache_cannot_be_written(exported, tmp_path, caplog) -> None:
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    with caplog.at_level(logging.WARNING):
        predictor = load_predictor(exported["checkpoint"], device="cpu", cache_folder=blocked / "cache",
                                   native_bf16=False)
    assert "torch backend: auto: the ONNX export cannot be cached" in predictor.description
    assert "the ONNX export cannot be cached" in caplog.text
    with pytest.raises(OSError):
        load_predictor(exported["checkpoint"], device="cpu", backend="onnxruntime", cache_folder=blocked / "cache")


def test_native_bf16_cpus_keep_torch_and_onnx_files_refuse_the_torch_backend(exported, tmp_path) -> None:
    predictor = load_predictor(exported["checkpoint"], device="cpu", native_bf16=True, cache_folder=tmp_path / "c")
    assert "bf16 Hiera stages 3-4" in predictor.description
    assert "torch backend: auto: CPU with native bf16" in predictor.description and not (tmp_path / "c").exists()
    with pytest.raises(ValueError, match="backend torch: an ONNX file runs on ONNX Runtime"):
        load_predictor(cached_export_path(exported["checkpoint"], exported["cache"]), backend="torch")


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine" / "onnx"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "sam2unet" / "onnx"


def test_the_cli_summary_and_log_state_the_backend_that_ran(exported, tmp_path) -> None:
    """Whichever backend ``auto`` picks on this CPU, the summary and the log name it (the
    cache of ``exported`` is the process's cache folder: no second export)."""
    image = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(_volume().array_kji.T, np.diag([2.0, 2.0, 3.0, 1.0])), image)
    done = subprocess.run([sys.executable, "-m", "sam2unet_core.cli.predict", "-i", str(image), "-o",
                           str(tmp_path / "out"), "-m", str(exported["checkpoint"]), "--progress", "none"],
                          cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, CACHE_ENV: str(exported["cache"].parent)})
    assert done.returncode == 0, done.stderr
    device = json.loads((tmp_path / "out" / "predict_summary.json").read_text())["device"]
    assert " backend: auto" in device
    backend = "onnxruntime" if device.startswith("onnxruntime") else "torch"
    assert f"{backend} backend: auto" in device and f"{backend} backend: auto" in done.stderr
