"""Multi-planar models: training on slices of several planes, fused inference, the planes'
agreement in the statistics, and one-plane models and files unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_data import SAGITTAL_AFFINE, write_msd_dataset

from conftest import randomize_
from sam2unet_core import SAM2UNet, save_model
from sam2unet_core.checkpoint import load_model
from sam2unet_core.cli.predict import main
from sam2unet_core.inference.agreement import plane_agreement
from sam2unet_core.inference.engine import Predictor
from sam2unet_core.inference.torch_runner import TorchRunner
from sam2unet_core.io.readers import read_volume
from sam2unet_core.io.volume import Volume
from sam2unet_core.metadata import ModelMetadata, read_safetensors_metadata
from sam2unet_core.train.config import load_config
from sam2unet_core.train.pipeline import build_training_data
from sam2unet_core.train.trainer import _metadata

PLANES = ["axial", "coronal", "sagittal"]
OVERRIDES = [
    "data.kind=volume", "data.input_size=64", "data.mean=[]", "data.std=[]", "data.num_workers=0",
    "data.intensity={kind: percentile, lower: 1, upper: 99}", "augment.flip_prob=0", "model.backbone=hiera_t",
    "data.val_cases=[case_001]", "data.foreground_fraction=0", "data.samples_per_epoch=60",
]


def engine_inputs(meta: ModelMetadata, volume: Volume, plane: str) -> torch.Tensor:
    """What ``Predictor.predict`` feeds the model for every slice of ``plane``."""
    seen: list[torch.Tensor] = []

    def capture(batch: torch.Tensor) -> torch.Tensor:
        seen.append(batch.clone())
        return torch.zeros(batch.shape[0], meta.architecture.num_classes, *batch.shape[2:])

    Predictor(TorchRunner(capture, metadata=meta, device="cpu"), batch_size=64).predict(volume, axis=plane)
    return torch.cat(seen)


def test_training_samples_are_slices_of_every_listed_plane_as_the_engine_cuts_them(tmp_path: Path) -> None:
    """Each training sample equals what the engine feeds the model for one slice of one of
    the planes (a sagittally stored volume, so no plane is the array order), and every
    plane is drawn; validation stays in the main plane; the metadata lists the planes."""
    root = write_msd_dataset(tmp_path / "d", 3, affine=SAGITTAL_AFFINE)
    config = load_config(None, [f"data.root={root}", *OVERRIDES, f"data.planes={PLANES}"])
    data = build_training_data(config)
    meta = _metadata(config, data)
    assert meta.trained_planes == tuple(PLANES) and meta.plane == "axial"
    assert data.facts["planes"] == PLANES
    slices = {plane: torch.cat([engine_inputs(meta, read_volume(root / "imagesTr" / f"{case}_0000.nii.gz"), plane)
                                for case in ("case_000", "case_002")]) for plane in PLANES}
    drawn = set()
    for index in range(len(data.train)):
        sample = data.train[index]["image"]
        for plane, inputs in slices.items():
            if torch.isclose(inputs, sample, atol=1e-5, rtol=1e-5).flatten(1).all(1).any():
                drawn.add(plane)
                break
        else:
            pytest.fail(f"training sample {index} is no slice the engine cuts")
    assert drawn == set(PLANES)
    validation = torch.stack([data.val[i]["image"] for i in range(len(data.val))])
    torch.testing.assert_close(validation, engine_inputs(meta, read_volume(root / "imagesTr" / "case_001_0000.nii.gz"),
                                                         "axial"), atol=1e-5, rtol=1e-5)


def test_one_plane_configs_and_files_are_unchanged(tmp_path: Path) -> None:
    root = write_msd_dataset(tmp_path / "d", 3)
    for planes in ([], ["coronal"]):
        config = load_config(None, [f"data.root={root}", *OVERRIDES, f"data.planes={planes}"])
        meta = _metadata(config, build_training_data(config))
        expected = planes[0] if planes else "axial"
        assert meta.trained_planes == (expected,) and meta.planes == []
        written = meta.to_dict()
        assert written["format_version"] == 2 and "planes" not in written  # older readers read it
    with pytest.raises(ValueError, match="first being plane"):
        ModelMetadata(plane="axial", planes=["coronal", "axial"]).validate()


@pytest.fixture(scope="module")
def three_plane_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sam2unet_core.metadata import Architecture, default_labels

    meta = ModelMetadata(architecture=Architecture("hiera_t", num_classes=3, in_channels=1),
                         labels=default_labels(3, ["box", "ball"]), input_size=32,
                         intensity={"kind": "zscore"}, mean=[], std=[], plane="axial", planes=PLANES)
    model = randomize_(SAM2UNet("hiera_t", num_classes=3, in_channels=1), seed=4).eval()
    path = save_model(model, tmp_path_factory.mktemp("model") / "three.safetensors", meta)
    assert read_safetensors_metadata(path).trained_planes == tuple(PLANES)
    return path


def test_fused_prediction_is_the_mean_of_the_planes_probabilities(three_plane_model: Path) -> None:
    volume = Volume(np.random.default_rng(0).normal(0, 1, (10, 18, 14)).astype(np.float32),
                    spacing_ijk=np.array([1.0, 1.2, 2.0]))
    predictor = Predictor(load_model(three_plane_model), batch_size=8, device="cpu")
    fused = predictor.predict(volume, probabilities=True)  # the model's planes by default
    per_plane = [predictor.predict(volume, axis=plane, probabilities=True) for plane in PLANES]
    mean = np.mean([p.probabilities.array_kji for p in per_plane], axis=0)
    np.testing.assert_allclose(fused.probabilities.array_kji, mean, atol=1e-6)
    assert np.array_equal(fused.labels.array_kji, mean.argmax(-1))
    assert fused.planes == tuple(PLANES) and fused.plane == "axial+coronal+sagittal"
    expected = plane_agreement(np.stack([p.labels.array_kji for p in per_plane]), PLANES, volume, [1, 2])
    assert fused.agreement == expected
    one = predictor.predict(volume, planes=["axial"])
    assert one.agreement is None and np.array_equal(one.labels.array_kji, per_plane[0].labels.array_kji)
    ranged = predictor.predict(volume, slice_range=(0, 4))  # one plane: the model's main one
    assert ranged.planes == ("axial",) and not ranged.labels.array_kji[4:].any()
    with pytest.raises(ValueError, match="one plane"):
        predictor.predict(volume, planes=PLANES, slice_range=(0, 4))
    assert predictor.count_slices(volume) == 10 + 18 + 14


def test_plane_agreement_counts_votes_and_finds_the_disputed_slices() -> None:
    votes = np.zeros((3, 4, 2, 2), np.uint8)
    votes[:, 1] = 1  # slice k=1: every plane says 1
    votes[0, 2] = 1  # slice k=2: one plane of three
    votes[0, 3, 0, 0] = votes[1, 3, 0, 0] = 1  # k=3: one voxel, two planes of three
    agreement = plane_agreement(votes, PLANES, Volume(np.zeros((4, 2, 2))), [1])
    label = agreement.for_label(1)
    assert agreement.slice_axis == "k"
    assert (label.voxels_any, label.voxels_all) == (4 + 4 + 1, 4)
    assert label.disagreement == pytest.approx(1 - 4 / 9)
    assert label.worst_slices == ((2, 4), (3, 1))


def test_cli_fuses_by_default_reports_agreement_and_restricts_to_one_plane(
    three_plane_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = write_msd_dataset(tmp_path / "d", 1)
    image = root / "imagesTr" / "case_000_0000.nii.gz"
    for name, extra in (("fused", []), ("axial", ["--planes", "axial"])):
        code = main(["-i", str(image), "-o", str(tmp_path / name), "-m", str(three_plane_model),
                     "--statistics", "--qc-png", "--tta", "--format", "nrrd", "--device", "cpu",
                     "--progress", "jsonl",
                     *extra])
        events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert code == 0
        total = next(e["slices"] for e in events if e["event"] == "case_start")
        assert total == (10 + 40 + 36 if name == "fused" else 10)
        records = json.loads((tmp_path / name / "case_000.statistics.json").read_text())
        summary = json.loads((tmp_path / name / "predict_summary.json").read_text())
        assert summary["planes"] == PLANES
        if name == "fused":
            assert all(0 <= r["planes_disagreement"] <= 1 for r in records)
            assert all(s.startswith("k=") for r in records for s in r["planes_disputed_slices"])
        else:
            assert all(r["planes_disagreement"] is None for r in records)
        assert read_volume(tmp_path / name / "case_000.nrrd").same_grid(read_volume(image))
    fused_qc = np.asarray(Image.open(tmp_path / "fused" / "case_000.qc.png"))
    axial_qc = np.asarray(Image.open(tmp_path / "axial" / "case_000.qc.png"))
    assert fused_qc.shape[0] == 2 * axial_qc.shape[0] + 2  # a second row: where the planes disagree
    with pytest.raises(SystemExit):
        main(["-i", str(image), "-o", str(tmp_path / "x"), "-m", str(three_plane_model),
              "--planes", "axial", "--axis", "axial"])


def test_bench_quality_measures_how_much_a_class_area_jumps_between_slices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    from benchmarks.bench_quality import slice_area_change

    labels = np.zeros((4, 5, 5), np.uint8)
    labels[0, :2, :2] = 1  # areas along k: 4, 9, 0, 9 -> changes 5, 9, 9
    labels[1, :3, :3] = 1
    labels[3, 2:, 2:] = 1
    assert slice_area_change(Volume(labels), 1) == pytest.approx((5 + 9 + 9) / 3)
