"""The torch-free route end to end: ``pip install "sam2unet_core[onnx]"`` into a fresh
virtualenv (no system site-packages, no torch), then that venv's ``sam2unet-predict -m
model.onnx`` segments a real NIfTI (nibabel's bundled ``anatomical.nii``) like this venv's.

The install reaches the package index (through pip's cache); when pip cannot reach it the
test is skipped and says so. 2 to 4 minutes on 2 shared cores with a warm pip cache (see
benchmarks/RESULTS.md, "Install routes").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from benchmarks.bench_install import copy_source
from onnx_case import REPO
from sam2unet_core.metrics import mask_dice

pytestmark = pytest.mark.slow

ANATOMICAL = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"  # (33, 41, 25) int16 MR
INPUT_SIZE = 64
PIP_NETWORK = ("--timeout", "20", "--retries", "2", "--disable-pip-version-check", "--no-input")
INSTALL_TIMEOUT_S = 900  # --no-compile below: byte-compiling scipy & co. would double the install's CPU time


# sam2unet-predict in this venv, reporting which top-level modules it loaded
PREDICT_AND_LIST_MODULES = """
import json, sys
from sam2unet_core.cli.predict import main
code = main(sys.argv[1:])
print("MODULES:" + json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
sys.exit(code)
"""


def torch_extra_modules() -> set[str]:
    """Top-level modules of the ``torch`` extra's distributions (requirements-torch.txt, as
    installed in this venv) and of sam2."""
    from importlib.metadata import packages_distributions

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lines = (REPO / "requirements-torch.txt").read_text(encoding="utf-8").splitlines()
    wanted = {canonicalize_name(Requirement(line.split("#")[0]).name)
              for line in lines if line.split("#")[0].strip()} | {"sam2"}
    return {module for module, names in packages_distributions().items()
            if any(canonicalize_name(name) in wanted for name in names)}


def _clean_env() -> dict[str, str]:
    """This environment without PYTHONPATH (it would put the work tree's sam2unet_core before
    the fresh venv's installed copy) and without another venv's variables."""
    return {key: value for key, value in os.environ.items()
            if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def _index_unreachable(python: Path, folder: Path) -> str | None:
    """Why pip cannot reach the package index (one quick query of onnxruntime's versions),
    or None when it can."""
    try:
        done = subprocess.run([str(python), "-m", "pip", "index", "versions", "onnxruntime",
                               "--timeout", "10", "--retries", "0", "--disable-pip-version-check"],
                              cwd=folder, env=_clean_env(), capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return "pip index versions onnxruntime did not answer within 120 s"
    if done.returncode == 0:
        return None
    lines = (done.stderr or done.stdout).strip().splitlines()
    return lines[-1] if lines else f"pip exited {done.returncode}"


@pytest.fixture(scope="module")
def torch_free_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with ``<copy of the work tree>[onnx]`` installed (non-editable);
    its ``bin`` folder."""
    folder = tmp_path_factory.mktemp("torch_free")
    # a copy of what pip install reads, so that the build leaves no build/ or egg-info in the work tree
    source = copy_source(folder / "src")
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(folder / "venv")
    python = folder / "venv" / "bin" / "python"
    try:
        done = subprocess.run([str(python), "-m", "pip", "install", *PIP_NETWORK, "--prefer-binary", "--no-compile",
                               f"{source}[onnx]"],
                              cwd=folder, env=_clean_env(), capture_output=True, text=True,
                              timeout=INSTALL_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        reason = _index_unreachable(python, folder)
        if reason:
            pytest.skip(f"pip cannot reach the package index: {reason}")
        raise AssertionError(f"pip install {source}[onnx] ran over {INSTALL_TIMEOUT_S} s") from err
    if done.returncode != 0:
        reason = _index_unreachable(python, folder)
        if reason:
            pytest.skip(f"pip cannot reach the package index: {reason}")
        raise AssertionError(f"pip install {source}[onnx] failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return python.parent


def _fitted_onnx(folder: Path) -> Path:
    """A hiera_t binary model (64 px input, 1-99 percentile intensity) whose 1x1 head is
    fitted (``benchmarks.common.fit_head``) to the bright tissue of ``anatomical.nii``'s
    axial slices, in every orientation the engine may hand them in, exported to ONNX."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(REPO))
    from benchmarks.common import fit_head
    from sam2unet_core.checkpoint import build_model
    from sam2unet_core.export.onnx import export_onnx
    from sam2unet_core.io import read_volume
    from sam2unet_core.metadata import Architecture, ModelMetadata
    from sam2unet_core.preprocessing import apply_intensity, fit_intensity

    intensity = {"kind": "percentile", "lower": 1.0, "upper": 99.0}
    array_kji = read_volume(ANATOMICAL).array_kji.astype(np.float32)
    mapped = apply_intensity(array_kji, fit_intensity(array_kji, intensity))
    images = F.interpolate(torch.from_numpy(np.ascontiguousarray(mapped))[:, None],
                           size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    bright = (F.avg_pool2d(images, 3, stride=1, padding=1) > 0.5).float()
    views = torch.cat([images, images.transpose(2, 3), images.flip(2), images.flip(3)])
    masks = torch.cat([bright, bright.transpose(2, 3), bright.flip(2), bright.flip(3)])
    torch.manual_seed(0)
    model = build_model(ModelMetadata(architecture=Architecture("hiera_t", 1, 1), input_size=INPUT_SIZE,
                                      intensity=intensity, mean=[0.0], std=[1.0])).eval()
    fit_head(model, views, masks)
    return export_onnx(model, folder / "anatomical_bright.onnx")


def _predict(command: list[str], model: Path, out: Path, env: dict[str, str], cwd: Path,
             *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run([*command, "-i", str(ANATOMICAL), "-o", str(out), "-m", str(model),
                           "--device", "cpu", "--progress", "none", *extra],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_onnx_extra_installs_without_torch_and_segments_a_real_nifti(torch_free_venv: Path,
                                                                      tmp_path: Path) -> None:
    python = torch_free_venv / "python"
    probe = subprocess.run(
        [str(python), "-c", "import sam2unet_core, onnxruntime; print(sam2unet_core.__file__)\n"
                            "import torch"],
        cwd=tmp_path, env=_clean_env(), capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr, probe.stderr
    assert Path(probe.stdout.strip()).is_relative_to(torch_free_venv.parent), probe.stdout  # the installed copy
    for package in ("monai", "sam2", "safetensors", "yaml"):  # the torch extra stays out
        missing = subprocess.run([str(python), "-c", f"import {package}"], cwd=tmp_path,
                                 env=_clean_env(), capture_output=True, text=True)
        assert missing.returncode != 0, f"{package} is installed in the torch-free venv"
    postprocess = subprocess.run(  # MONAI's post-processing: a clear error, not a bare import failure
        [str(python), "-c", "import numpy as np\nfrom sam2unet_core.inference.postprocess import postprocess_labels\n"
                            "postprocess_labels(np.zeros((2, 2, 2), np.uint8), ['largest_component'], [1])"],
        cwd=tmp_path, env=_clean_env(), capture_output=True, text=True)
    assert "post-processing ['largest_component'] runs on torch and MONAI" in postprocess.stderr, postprocess.stderr
    assert "sam2unet_core[torch]" in postprocess.stderr, postprocess.stderr

    model = _fitted_onnx(tmp_path)
    fresh_predict = [str(torch_free_venv / "sam2unet-predict")]
    _predict(fresh_predict, model, tmp_path / "fresh", _clean_env(), tmp_path, "--statistics", "--qc-png")
    _predict(fresh_predict, model, tmp_path / "fresh_seg", _clean_env(), tmp_path, "--format", "seg.nrrd")
    # here every package is installed: the run still loads none of the torch extra's
    here = _predict([sys.executable, "-c", PREDICT_AND_LIST_MODULES], model, tmp_path / "here",
                    {**os.environ, "PYTHONPATH": str(REPO)}, REPO, "--statistics", "--qc-png")
    loaded = set(json.loads(here.stdout.split("MODULES:")[-1]))
    assert "onnxruntime" in loaded and not loaded & torch_extra_modules(), sorted(loaded & torch_extra_modules())
    for name in ("anatomical.statistics.json", "anatomical.statistics.csv", "anatomical.qc.png"):
        assert (tmp_path / "fresh" / name).stat().st_size > 0, name
    assert (tmp_path / "fresh_seg" / "anatomical.seg.nrrd").stat().st_size > 0

    source = nib.load(ANATOMICAL)
    fresh = nib.load(tmp_path / "fresh" / "anatomical.nii.gz")
    here = nib.load(tmp_path / "here" / "anatomical.nii.gz")
    assert fresh.shape == source.shape
    np.testing.assert_allclose(fresh.affine, source.affine, atol=1e-5)
    fresh_labels, here_labels = np.asarray(fresh.dataobj), np.asarray(here.dataobj)
    assert 0.05 < (fresh_labels > 0).mean() < 0.8, "the fitted model should label part of the head"
    assert mask_dice(fresh_labels > 0, here_labels > 0) >= 0.999
