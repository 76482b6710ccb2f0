"""A model that cannot segment is never used as if it could.

An official SAM 2 / SAM 2.1 checkpoint read as a model has a trained trunk and a random
decoder: ``sam2unet-predict`` and ``Predictor`` refuse it with a message that says to train
or fine-tune first, unless ``--allow-untrained`` / ``allow_untrained=True``. The metadata
the Slicer panel reads (through ``python -m sam2unet_core.cli.describe``) tells such a model,
and a model of colour pictures, apart from a volume model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sam2unet_core import Predictor, load_model
from sam2unet_core.cli.predict import main
from sam2unet_core.metadata import ModelMetadata, UntrainedModelError, read_safetensors_metadata


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("scan") / "head_0000.nii.gz"
    data = np.random.default_rng(0).normal(100, 30, (32, 32, 2)).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0])), path)
    return path


def test_cli_refuses_a_sam2_checkpoint_and_says_what_to_do(sam2_checkpoint: Path, scan: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    code = main(["-i", str(scan), "-o", str(out), "-m", str(sam2_checkpoint), "--device", "cpu", "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 2
    assert "sam2.1_hiera_tiny.pt is a SAM 2 checkpoint" in err
    assert "decoder is untrained" in err and "Train or fine-tune" in err and "--allow-untrained" in err
    assert not out.exists() or not any(out.rglob("*.nii.gz"))


def test_cli_runs_a_sam2_checkpoint_only_when_allowed(sam2_checkpoint: Path, scan: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    code = main(["-i", str(scan), "-o", str(out), "-m", str(sam2_checkpoint), "--device", "cpu",
                 "--progress", "none", "--allow-untrained"])
    assert code == 0, capsys.readouterr().err
    labels = nib.load(out / "head.nii.gz")
    assert labels.shape == (32, 32, 2)


def test_predictor_refuses_an_untrained_model_unless_allowed(sam2_checkpoint: Path) -> None:
    model = load_model(sam2_checkpoint)
    with pytest.raises(UntrainedModelError, match="Train or fine-tune"):
        Predictor(model, device="cpu")
    predictor = Predictor(model, device="cpu", allow_untrained=True)
    assert predictor.metadata.decoder_trained is False


def test_trained_models_are_accepted(grey_ct_checkpoint: Path) -> None:
    metadata = read_safetensors_metadata(grey_ct_checkpoint)
    assert metadata.decoder_trained and not metadata.trained_on_pictures
    Predictor(load_model(grey_ct_checkpoint), device="cpu")


def _described(path: Path) -> ModelMetadata:
    """What the Slicer panel gets: the describe command's JSON line, in a child process."""
    done = subprocess.run([sys.executable, "-m", "sam2unet_core.cli.describe", str(path)],
                          capture_output=True, text=True, timeout=300, check=True)
    return ModelMetadata.from_dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_describe_tells_the_panel_which_models_cannot_segment_volumes(
        sam2_checkpoint: Path, official_sam2unet_checkpoint: Path) -> None:
    sam2 = _described(sam2_checkpoint)
    assert not sam2.decoder_trained
    assert "sam2.1_hiera_tiny.pt is a SAM 2 checkpoint" in sam2.untrained_reason()
    official = _described(official_sam2unet_checkpoint)
    assert official.decoder_trained and official.trained_on_pictures


def test_a_model_trained_on_pictures_is_told_apart_from_a_volume_model() -> None:
    volume = ModelMetadata(provenance={"config": {"data": {"kind": "volume"}}})
    pictures = ModelMetadata(provenance={"config": {"data": {"kind": "polyp"}}})
    assert not volume.trained_on_pictures and pictures.trained_on_pictures
    assert not ModelMetadata().trained_on_pictures  # nothing known: not refused
