"""ONNX Runtime against torch on a trained model and real slices (issue 16, parts 1-2).

The model is trained here, briefly, on the demo's data (``benchmarks.brain_data``: variants of
nilearn's MNI152 T1 template, grey and white matter labels) with the demo's config
(``training/configs/demo_brain_cpu.yaml``) shortened to 4 mm volumes, 64 px and a few dozen
steps. It must segment the held-out volumes non-trivially, so that agreement between the
backends is not agreement on empty maps. Then: label maps of ``TorchRunner`` and
``OnnxRunner`` through the same ``Predictor`` (Dice >= 0.999 per label), the max logit
difference of the network inside the graph and the max probability difference of the whole
step, and the int8 export behind its agreement check.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from benchmarks.brain_data import DEMO_CONFIG, build_brain_dataset
from sam2unet_core.checkpoint import load_model
from sam2unet_core.export.onnx import INPUT_NAME, export_onnx
from sam2unet_core.export.quantize import INT8_PRECISION, AgreementError, compare_predictors, label_dice, quantize_int8
from sam2unet_core.inference.backend import load_predictor
from sam2unet_core.inference.engine import Predictor
from sam2unet_core.inference.onnx_runner import CHECK_KEY, OnnxRunner, cpu_features, create_session, read_onnx_metadata
from sam2unet_core.inference.torch_runner import TorchRunner
from sam2unet_core.io import read_volume
from sam2unet_core.io.orientation import plane_view
from sam2unet_core.preprocessing import apply_intensity, fit_intensity, normalize_channels, stack_slices

# Bounds stated in benchmarks/RESULTS.md ("ONNX Runtime: agreement, speed and int8"): fp32 ORT vs torch.
MAX_LOGIT_DIFF = 1e-4
MAX_PROBABILITY_DIFF = 1e-5
MIN_BF16_DICE = 0.999  # per label, bf16 Hiera stages 3-4 against fp32 (measured 0.99993 or more)
# The demo's recipe cut to 72 steps of 64 px slices (whole slices, per-epoch cosine, no time box).
SHORT_TRAINING = ["data.input_size=64", "augment.crop_size=0", "augment.train_size=0", "optim.batch_size=4", "data.samples_per_epoch=48",
                  "optim.epochs=6", "optim.schedule=epochs", "optim.warmup_steps=0", "data.val_fraction=0.5",
                  "run.max_minutes=0", "run.max_cpu_minutes=0", "run.resume_every_minutes=0", "run.device=cpu"]


def trained_case(folder: Path) -> dict:
    """Train the demo model briefly in ``folder`` and export it: the model, its fp32 ONNX
    file and the two held-out volumes (paths, ``Volume``s, ground-truth KJI label arrays)."""
    from sam2unet_core.train.config import load_config
    from sam2unet_core.train.trainer import train

    data = build_brain_dataset(folder / "data", train_cases=2, test_cases=2, resolution_mm=4)
    config = load_config(DEMO_CONFIG, [f"data.root={data}", f"run.output={folder / 'model'}", *SHORT_TRAINING])
    result = train(config, resume=False)
    model = load_model(result.output / "best.safetensors").eval()
    images = sorted((data / "imagesTs").glob("*.nii.gz"))
    return {"model": model, "checkpoint": result.output / "best.safetensors",
            "onnx": export_onnx(model, folder / "model.onnx"), "folder": folder,
            "images": images, "volumes": [read_volume(p) for p in images],
            "truths": [read_volume(data / "labelsTs" / p.name.replace("_0000", "")).array_kji for p in images]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return trained_case(tmp_path_factory.mktemp("agreement"))


def _torch_predictor(model) -> Predictor:
    """Backend comparisons run at fp32, whatever the CPU's native precisions."""
    return Predictor(TorchRunner(model, device="cpu", precision="fp32"))


@pytest.mark.slow
def test_the_trained_model_segments_the_held_out_brains(trained) -> None:
    """Not vacuous: the model's grey and white matter overlap the ground truth."""
    predictor = _torch_predictor(trained["model"])
    for volume, truth in zip(trained["volumes"], trained["truths"]):
        labels = predictor.predict(volume).labels.array_kji
        brain = label_dice((truth > 0).astype(np.uint8), (labels > 0).astype(np.uint8), 1)
        tissues = [label_dice(truth, labels, label) for label in (1, 2)]
        print(f"{volume.source}: Dice vs ground truth: brain {brain:.3f}, grey {tissues[0]:.3f}, white {tissues[1]:.3f}")
        assert brain > 0.8 and min(tissues) > 0.3


@pytest.mark.slow
def test_onnx_runtime_label_maps_equal_torch_on_real_volumes(trained) -> None:
    torch_predictor = _torch_predictor(trained["model"])
    onnx_predictor = Predictor(OnnxRunner(trained["onnx"], device="cpu", threads=2))
    report = compare_predictors(torch_predictor, onnx_predictor, trained["volumes"])
    print(f"label Dice ONNX Runtime vs torch: {report.describe()}")
    assert set(report.dice) == {"grey_matter", "white_matter"}
    assert report.worst >= 0.999
    volume = trained["volumes"][0]
    expected = torch_predictor.predict(volume, probabilities=True).probabilities.array_kji
    got = onnx_predictor.predict(volume, probabilities=True).probabilities.array_kji
    max_diff = float(np.abs(got - expected).max())
    print(f"max probability difference ONNX Runtime vs torch on {volume.source}: {max_diff:.2e}")
    assert max_diff < MAX_PROBABILITY_DIFF


def test_the_default_backend_agrees_with_torch_fp32_on_real_volumes(trained, tmp_path) -> None:
    """``sam2unet-predict``'s default (``--backend auto``) on a CPU without native bf16 runs
    the cached ONNX Runtime export; its labels agree with torch fp32 to the bar. (On a CPU
    with native bf16 it runs torch's bf16 Hiera stages 3-4: test_bf16_deep_stages_... below.)"""
    default = load_predictor(trained["checkpoint"], device="cpu", cache_folder=tmp_path, native_bf16=False)
    assert default.description.startswith("onnxruntime cpu:")
    report = compare_predictors(_torch_predictor(trained["model"]), default, trained["volumes"])
    print(f"label Dice --backend auto (ONNX Runtime) vs torch fp32: {report.describe()}")
    assert report.worst >= 0.999


def _with_logits_output(onnx_path: Path, out_path: Path) -> str:
    """Copy the graph with the network's logits (the input of its final Softmax/Sigmoid)
    as a second output; returns the logits' tensor name."""
    proto = onnx.load(str(onnx_path))
    last = [node for node in proto.graph.node if node.op_type in ("Softmax", "Sigmoid")][-1]
    name = last.input[0]
    proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    onnx.save(proto, str(out_path))
    return name


@pytest.mark.slow
def test_max_logit_difference_on_real_slices(trained) -> None:
    """The network inside the graph against the torch network, on every axial slice of the
    held-out volumes (2.5D stacks, the model's intensity mapping, resize and mean/std)."""
    model = trained["model"]
    meta = model.metadata
    path = trained["folder"] / "with_logits.onnx"
    logits_name = _with_logits_output(trained["onnx"], path)
    session = create_session(path, "cpu", threads=2)
    worst, scale = 0.0, 0.0
    for volume in trained["volumes"]:
        image = plane_view(volume.direction_lps, meta.plane).to_plane(volume.array_kji)
        raw = stack_slices(image, range(image.shape[0]), meta.context_slices, meta.architecture.in_channels)
        slices = apply_intensity(raw, fit_intensity(volume.array_kji, meta.intensity))  # (S, 3, H, W)
        onnx_logits = session.run([logits_name], {INPUT_NAME: slices})[0]
        with torch.no_grad():
            resized = F.interpolate(torch.from_numpy(slices), size=(meta.input_size,) * 2, mode="bilinear",
                                    align_corners=False)
            torch_logits = model(normalize_channels(resized, meta.mean, meta.std)).numpy()
        assert onnx_logits.shape == torch_logits.shape == (len(slices), 3, meta.input_size, meta.input_size)
        worst = max(worst, float(np.abs(onnx_logits - torch_logits).max()))
        scale = max(scale, float(np.abs(torch_logits).max()))
    print(f"max logit difference ONNX Runtime vs torch: {worst:.2e} (logits up to {scale:.1f})")
    assert scale > 1.0  # the trained network is confident somewhere
    assert worst < MAX_LOGIT_DIFF


@pytest.mark.slow
def test_int8_export_is_refused_below_the_agreement_bar(trained, capsys, monkeypatch) -> None:
    """Below its bar the CLI says so, exits 1 and writes nothing. The bar is 1.5, which no
    file meets, so the outcome is the same on every CPU (int8 accuracy is not)."""
    import functools

    from sam2unet_core.cli.export import main
    from sam2unet_core.export import quantize

    monkeypatch.setattr(quantize, "quantize_int8", functools.partial(quantize.quantize_int8, min_dice=1.5))
    model_path = trained["folder"] / "model" / "best.safetensors"
    output = trained["folder"] / "refused_int8.onnx"
    rc = main([str(model_path), "--format", "onnx", "--int8", "--check", str(trained["images"][0]),
               "-o", str(output)])
    err = capsys.readouterr().err
    print(err)
    assert rc == 1
    assert "int8 quantisation of refused_int8.onnx refused" in err and "below 1.5" in err
    assert not output.exists() and not list(output.parent.glob(".partial-*"))


def test_int8_export_needs_check_volumes(tmp_path: Path, capsys) -> None:
    from sam2unet_core.cli.export import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "model.safetensors"), "--int8", "-o", str(tmp_path / "x.onnx")])
    assert exit_info.value.code == 2
    assert "--int8 needs --check" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.slow
def test_int8_file_written_when_it_meets_the_bar_it_is_given(trained) -> None:
    """The gate's mechanism with bars whose outcome is the same on every CPU: 0 writes the
    file (which keeps our metadata, says int8 and records its check and this CPU's
    features), 1.5 refuses and writes nothing."""
    output = trained["folder"] / "int8.onnx"
    report = quantize_int8(trained["onnx"], output, trained["volumes"][:1], threads=2, min_dice=0.0)
    print(f"label Dice int8 vs fp32: {report.describe()}")
    assert set(report.dice) == {"grey_matter", "white_matter"} and 0.0 <= report.worst <= 1.0
    assert read_onnx_metadata(output) == read_onnx_metadata(trained["onnx"])
    runner = OnnxRunner(output, device="cpu", threads=2)
    assert runner.description.endswith(INT8_PRECISION)
    check = json.loads(runner.session.get_modelmeta().custom_metadata_map[CHECK_KEY])
    assert check["dice"] == report.dice and check["min_dice"] == 0.0 and check["volumes"] == 1
    assert check["cpu"]["features"] == list(cpu_features()) and check["settings"]["reduce_range"]
    with pytest.raises(AgreementError, match="below 1.5"):
        quantize_int8(trained["onnx"], trained["folder"] / "never.onnx", trained["volumes"][:1], min_dice=1.5)
    assert not (trained["folder"] / "never.onnx").exists()


@pytest.mark.slow
def test_bf16_deep_stages_agree_with_fp32_on_real_volumes(trained) -> None:
    """The bf16 path forced on (emulated on CPUs without native bf16) against fp32."""
    fp32 = _torch_predictor(trained["model"])
    bf16 = Predictor(TorchRunner(trained["model"], device="cpu", precision="bf16"))
    assert "bf16 Hiera stages 3-4" in bf16.description
    report = compare_predictors(fp32, bf16, trained["volumes"])
    print(f"label Dice bf16 Hiera stages 3-4 vs fp32: {report.describe()}")
    assert report.worst >= MIN_BF16_DICE


def test_quantisation_module_imports_no_torch() -> None:
    """int8 export and its check run on a torch-free install (onnxruntime and numpy)."""
    import subprocess
    import sys

    code = ("import sys, sam2unet_core.export.quantize; "
            "print(sorted(m for m in ('torch', 'monai', 'sam2') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
