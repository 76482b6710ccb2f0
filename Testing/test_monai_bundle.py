"""MONAI Bundle export (sam2unet-export --format monai-bundle): ``python -m monai.bundle run``
on real NIfTI files gives sam2unet-predict's label maps on the input grid, the metadata
passes MONAI's verify_metadata offline, bad inputs fail clearly and leave nothing behind.

The model: a random-weight hiera_t (3 classes, 2.5D with one slice of context, sagittal
plane, percentile intensity, the demo recipe's attention windows) whose 1x1 head is fitted
to the scans' bright tissue (``benchmarks.common.fit_head``), with label 2 for its most
confident part, so both labels follow the anatomy and a wrong orientation or preprocessing
in the bundle would show.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path as NIBABEL_DATA

from sam2unet_core.metrics import mask_dice

REPO = Path(__file__).resolve().parents[1]
SCANS = ("anatomical.nii", "reoriented_anat_moved.nii")  # LAS int16 and RAS float, big-endian
INPUT_SIZE = 64
BUNDLE_IDS = ("bundle_root", "output_dir", "dataset_dir", "device", "network_def", "network",
              "datalist", "preprocessing", "dataset", "dataloader", "inferer", "postprocessing",
              "handlers", "evaluator", "initialize", "run", "finalize")


def _env() -> dict[str, str]:
    """Subprocess environment: this checkout's package first."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _fitted_model(path: Path) -> Path:
    """Write the test model (see the module docstring) to ``path`` (.safetensors)."""
    import torch

    sys.path.insert(0, str(REPO))
    from benchmarks.common import fit_head
    from sam2unet_core.checkpoint import build_model, save_model
    from sam2unet_core.io import read_volume
    from sam2unet_core.io.orientation import plane_view
    from sam2unet_core.metadata import Architecture, LabelInfo, ModelMetadata
    from sam2unet_core.preprocessing import (apply_intensity, fit_intensity, normalize_channels, resize_batch,
                                             stack_slices, to_tensor)

    metadata = ModelMetadata(architecture=Architecture("hiera_t", 3, 3, window_spec=[8, 4, 6, 3]),
                             input_size=INPUT_SIZE,
                             intensity={"kind": "percentile", "lower": 0.5, "upper": 99.5},
                             mean=[0.5] * 3, std=[0.25] * 3, context_slices=1, plane="sagittal",
                             labels=[LabelInfo(1, "tissue", (200, 120, 90)), LabelInfo(2, "core", (60, 180, 75))])
    torch.manual_seed(0)
    model = build_model(metadata).eval()
    volume = read_volume(Path(NIBABEL_DATA) / SCANS[0])
    slices = plane_view(volume.direction_lps, "sagittal").to_plane(volume.array_kji)
    raw = stack_slices(slices, range(0, slices.shape[0], 2), 1, 3)
    mapped = apply_intensity(to_tensor(raw), fit_intensity(volume.array_kji, metadata.intensity))
    images = normalize_channels(resize_batch(mapped, (INPUT_SIZE, INPUT_SIZE)), metadata.mean, metadata.std)
    fit_head(model, images, (images[:, 1:2] > 0.0).float())
    with torch.no_grad():  # label 2 where the label-1 logit passes its fitted target (4)
        model.head.weight[2] = 2 * model.head.weight[1]
        model.head.bias[2] = 2 * model.head.bias[1] - 4.0
    return save_model(model, path)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The model, its bundle (exported by the CLI), the inputs, both runs' outputs and the
    result of ``monai.bundle verify_metadata``. The two MONAI commands run as subprocesses
    while sam2unet-predict runs here (they spend much of their time importing)."""
    from sam2unet_core.cli.export import main as export_main
    from sam2unet_core.cli.predict import main as predict_main
    from sam2unet_core.export.bundle import SCHEMA_PATH

    folder = tmp_path_factory.mktemp("bundle_case")
    model = _fitted_model(folder / "model.safetensors")
    bundle = folder / "bundle"
    assert export_main([str(model), "--format", "monai-bundle", "-o", str(bundle),
                        "--authors", "sam2unet_core tests"]) == 0
    inputs = folder / "in"
    inputs.mkdir()
    for name in SCANS:
        shutil.copy(Path(NIBABEL_DATA) / name, inputs / name)
    commands = {
        "run": ["run", "--config_file", str(bundle / "configs" / "inference.json"), "--bundle_root", str(bundle),
                "--dataset_dir", str(inputs), "--output_dir", str(folder / "bundle_out")],
        "verify": ["verify_metadata", "--meta_file", str(bundle / "configs" / "metadata.json"),
                   "--filepath", str(SCHEMA_PATH)],
    }
    running = {}
    for key, command in commands.items():
        with open(folder / f"{key}.log", "w") as log:  # a file, not a pipe that could fill up
            running[key] = subprocess.Popen([sys.executable, "-m", "monai.bundle", *command], cwd=folder,
                                            env=_env(), stdout=log, stderr=subprocess.STDOUT)
    assert predict_main(["-i", str(inputs), "-o", str(folder / "predict_out"), "-m", str(model),
                         "--progress", "none"]) == 0
    finished = {key: (process.wait(), (folder / f"{key}.log").read_text()) for key, process in running.items()}
    code, output = finished["run"]
    assert code == 0, output[-5000:]
    return {"folder": folder, "model": model, "bundle": bundle, "inputs": inputs, "verify": finished["verify"]}


def test_bundle_run_equals_sam2unet_predict_on_the_input_grid(case) -> None:
    seen = set()
    for name in SCANS:
        stem = name.removesuffix(".nii")
        source = nib.load(case["inputs"] / name)
        from_bundle = nib.load(case["folder"] / "bundle_out" / f"{stem}_seg.nii.gz")
        from_predict = nib.load(case["folder"] / "predict_out" / f"{stem}.nii.gz")
        bundle_labels = np.asanyarray(from_bundle.dataobj)
        predict_labels = np.asanyarray(from_predict.dataobj)
        assert bundle_labels.shape == predict_labels.shape == source.shape
        assert bundle_labels.dtype == np.uint8
        np.testing.assert_allclose(from_bundle.affine, source.affine, atol=1e-4)
        np.testing.assert_allclose(from_bundle.affine, from_predict.affine, atol=1e-4)
        for value in (1, 2):
            fraction = float((predict_labels == value).mean())
            if 0.01 < fraction < 0.9:
                seen.add(value)
            dice = mask_dice(bundle_labels == value, predict_labels == value)
            print(f"{name} label {value}: {fraction:.3f} of the voxels, Dice bundle vs predict {dice:.6f}")
            assert dice >= 0.999
    assert seen == {1, 2}  # both labels segment a real part of the scans


def test_bundle_files_and_config_ids(case) -> None:
    bundle = case["bundle"]
    assert sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()) == [
        "configs/inference.json", "configs/logging.conf", "configs/metadata.json", "docs/README.md",
        "models/model.pt"]
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    assert set(BUNDLE_IDS) <= set(config)
    assert config["handlers"][0]["_target_"] == "CheckpointLoader"
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["required_packages_version"]["sam2unet_core"]
    assert meta["authors"] == "sam2unet_core tests"
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {
        "0": "background", "1": "tissue", "2": "core"}
    assert [label["color"] for label in meta["labels"]] == [[200, 120, 90], [60, 180, 75]]
    readme = (bundle / "docs" / "README.md").read_text()
    assert "python -m monai.bundle run" in readme and "| 2 | core |" in readme and "sagittal" in readme


def test_bundles_name_the_stable_runtime_module_and_older_bundles_still_load(case, tmp_path: Path) -> None:
    """inference.json names what it runs in sam2unet_core.inference.monai_bundle; a bundle
    exported before that module existed names sam2unet_core.export.bundle, which still
    resolves (MONAI's ConfigParser builds its datalist and inferer)."""
    from monai.bundle import ConfigParser

    from sam2unet_core.inference import monai_bundle
    from sam2unet_core.metadata import ModelMetadata

    config = json.loads((case["bundle"] / "configs" / "inference.json").read_text())
    assert config["datalist"]["_target_"] == "sam2unet_core.inference.monai_bundle.list_nifti_files"
    assert config["inferer"]["_target_"] == "sam2unet_core.inference.monai_bundle.SliceInferer"
    config["datalist"]["_target_"] = "sam2unet_core.export.bundle.list_nifti_files"
    config["inferer"]["_target_"] = "sam2unet_core.export.bundle.SliceInferer"
    config["dataset_dir"] = str(case["inputs"])
    parser = ConfigParser(config)
    assert parser.get_parsed_content("datalist") == monai_bundle.list_nifti_files(case["inputs"])
    inferer = parser.get_parsed_content("inferer")
    assert isinstance(inferer, monai_bundle.SliceInferer)
    assert inferer.metadata == ModelMetadata.from_dict(config["sam2unet_metadata"])


def test_network_def_names_only_architecture_fields_the_metadata_holds() -> None:
    """SAM 2's windows and the paper's head are not written in the metadata, so the network is
    built without them."""
    from sam2unet_core.export.bundle import METADATA_ID, inference_config
    from sam2unet_core.metadata import Architecture, ModelMetadata

    for architecture in (Architecture("hiera_t"), Architecture("hiera_t", window_spec=[8, 4, 6, 3]),
                         Architecture("hiera_t", full_res_channels=16)):
        config = inference_config(ModelMetadata(architecture=architecture))
        arguments = {key: value for key, value in config["network_def"].items() if key != "_target_"}
        assert all(value.startswith(f"@{METADATA_ID}#architecture#") for value in arguments.values())
        assert set(arguments) == set(config[METADATA_ID]["architecture"])


def test_metadata_passes_monai_verify_metadata_offline(case, tmp_path: Path) -> None:
    from sam2unet_core.export.bundle import SCHEMA_PATH

    code, output = case["verify"]  # python -m monai.bundle verify_metadata --filepath SCHEMA_PATH
    assert code == 0 and "metadata is verified with no error" in output, output
    # MONAI's check that network_def takes and returns what network_data_format states
    from monai.bundle import verify_net_in_out

    configs = case["bundle"] / "configs"
    verify_net_in_out(net_id="network_def", meta_file=str(configs / "metadata.json"),
                      config_file=str(configs / "inference.json"), device="cpu")
    # the same check (in this process) fails on metadata that lacks a field the schema requires
    from monai.bundle import verify_metadata

    broken = json.loads((case["bundle"] / "configs" / "metadata.json").read_text())
    del broken["network_data_format"]
    (tmp_path / "metadata.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="'network_data_format' is a required property"):
        verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=str(SCHEMA_PATH))
    # ours checks the same, and leaves every logger as it was
    import logging

    from sam2unet_core.export.bundle import verify_metadata as ours

    loggers = [logging.getLogger(name) for name in ("monai.bundle.scripts", "monai.apps", "")]
    levels = [log.level for log in loggers]
    ours(case["bundle"] / "configs" / "metadata.json")
    with pytest.raises(ValueError, match="'network_data_format' is a required property"):
        ours(tmp_path / "metadata.json")
    assert [log.level for log in loggers] == levels


def test_export_refuses_a_non_empty_folder_and_leaves_nothing_when_it_fails(case, tmp_path: Path,
                                                                            monkeypatch, capsys) -> None:
    import torch

    from sam2unet_core.checkpoint import load_model
    from sam2unet_core.cli.export import main as export_main
    from sam2unet_core.export import bundle as bundle_module

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("keep me")
    assert export_main([str(case["model"]), "--format", "monai-bundle", "-o", str(taken)]) == 1
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert os.listdir(taken) == ["notes.txt"]

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        bundle_module.export_bundle(load_model(case["model"]), tmp_path / "new_bundle")
    assert sorted(os.listdir(tmp_path)) == ["taken"]  # no bundle, no .partial- folder


def _messages(error: BaseException) -> str:
    """The messages of an exception and of its causes (MONAI's config parser wraps errors)."""
    texts = []
    while error is not None:
        texts.append(str(error))
        error = error.__cause__ or error.__context__
    return " <- ".join(texts)


def test_bundle_run_with_missing_weights_or_no_inputs_fails_clearly(case, tmp_path: Path) -> None:
    from monai.bundle import run

    bundle = tmp_path / "bundle"
    shutil.copytree(case["bundle"], bundle)
    empty = tmp_path / "empty"
    empty.mkdir()
    arguments = {"config_file": str(bundle / "configs" / "inference.json"), "bundle_root": str(bundle),
                 "output_dir": str(tmp_path / "out"), "logging_file": False}
    with pytest.raises(Exception) as raised:
        run(dataset_dir=str(empty), **arguments)
    assert f"{empty}: no NIfTI files (.nii, .nii.gz) in dataset_dir" in _messages(raised.value)
    (bundle / "models" / "model.pt").unlink()
    with pytest.raises(Exception) as raised:
        run(dataset_dir=str(case["inputs"]), **arguments)
    assert f"No such file or directory: '{bundle}/models/model.pt'" in _messages(raised.value)
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_slice_inferer_refuses_a_4d_image_naming_the_file() -> None:
    from monai.data import MetaTensor

    from sam2unet_core.inference.monai_bundle import SliceInferer
    from sam2unet_core.metadata import Architecture, ModelMetadata

    inferer = SliceInferer(ModelMetadata(architecture=Architecture("hiera_t", 1, 3)).to_dict())
    four_d = MetaTensor(np.zeros((1, 2, 8, 8, 8), np.float32), meta={"filename_or_obj": "/data/fmri.nii.gz"})
    with pytest.raises(ValueError, match=r"/data/fmri.nii.gz: expected one 3D image a case.*\(1, 2, 8, 8, 8\)"):
        inferer(four_d, network=None)


def test_slice_inferer_reads_an_lps_affine_as_the_predictor_reads_the_file(case) -> None:
    """In this process, on nibabel's small standard.nii.gz: a MetaTensor stating its grid in
    LPS (as ITK-based readers may) gives Predictor.predict's labels for the file (the
    bundle run covers RAS)."""
    import torch
    from monai.data import MetaTensor

    from sam2unet_core.checkpoint import load_model
    from sam2unet_core.inference.monai_bundle import SliceInferer
    from sam2unet_core.inference.engine import Predictor
    from sam2unet_core.io import read_volume
    from sam2unet_core.io.volume import LPS_TO_RAS

    path = Path(NIBABEL_DATA) / "standard.nii.gz"  # (4, 5, 7) uint8, RAS
    image = nib.load(path)
    model = load_model(case["model"])
    expected = Predictor(model).predict(read_volume(path)).labels.array_kji.transpose(2, 1, 0)
    assert expected.any() and not expected.all()
    data = torch.from_numpy(np.asanyarray(image.dataobj).astype(np.float32))[None, None]
    affine_lps = torch.from_numpy(LPS_TO_RAS @ image.affine)
    inputs = MetaTensor(data, affine=affine_lps, meta={"filename_or_obj": str(path), "space": "LPS"})
    labels = SliceInferer(model.metadata)(inputs, model)
    assert labels.shape == (1, 1, *image.shape) and labels.dtype == torch.uint8
    np.testing.assert_array_equal(labels[0, 0].numpy(), expected)
    np.testing.assert_allclose(labels.affine.numpy(), affine_lps.numpy())


def test_slice_inferer_leaves_the_network_as_it_was(case, tmp_path: Path) -> None:
    """The inferer segments with its own inference copy of MONAI's network: afterwards the
    same network object is unchanged, exports to ONNX and trains one step."""
    import torch
    from monai.data import MetaTensor

    from sam2unet_core.checkpoint import load_model
    from sam2unet_core.inference.monai_bundle import SliceInferer
    from sam2unet_core.export.onnx import export_onnx
    from sam2unet_core.train.losses import DeepSupervisionLoss

    path = Path(NIBABEL_DATA) / "standard.nii.gz"
    image = nib.load(path)
    network = load_model(case["model"])
    values = {name: tensor.clone() for name, tensor in network.state_dict().items()}
    layout = {name: (p.data_ptr(), p.stride(), p.dtype) for name, p in network.named_parameters()}
    inputs = MetaTensor(torch.from_numpy(np.asanyarray(image.dataobj).astype(np.float32))[None, None],
                        affine=torch.from_numpy(image.affine), meta={"filename_or_obj": str(path)})
    for precision in ("auto", "bf16"):
        labels = SliceInferer(network.metadata, precision=precision)(inputs, network)
        assert labels.shape == (1, 1, *image.shape)
    assert {name: (p.data_ptr(), p.stride(), p.dtype) for name, p in network.named_parameters()} == layout
    assert not [name for name, module in network.named_modules() if "forward" in module.__dict__]
    assert all(torch.equal(tensor, values[name]) for name, tensor in network.state_dict().items())
    assert export_onnx(network, tmp_path / "network.onnx").is_file()
    network.train()
    batch = torch.rand(2, 3, INPUT_SIZE, INPUT_SIZE)
    loss = DeepSupervisionLoss(3)(network(batch), torch.randint(0, 3, (2, 1, INPUT_SIZE, INPUT_SIZE)))
    loss.backward()
    assert torch.isfinite(loss) and network.head.weight.grad is not None
    with pytest.raises(ValueError, match="precision 'int8' is not one of"):
        SliceInferer(network.metadata, precision="int8")
