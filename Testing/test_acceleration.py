"""Preparing a network for inference (sam2unet_core.inference.acceleration): the runner works
on its own copy, so the caller's model (parameters, memory format, forward methods, dtype,
mode) is unchanged and can still be exported and trained; what each precision means on
which device and CPU, forced both ways so that no test depends on the CPU it runs on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import randomize_

from sam2unet_core import SAM2UNet, build_model
from sam2unet_core.inference.acceleration import cpu_has_native_bf16, plan_precision, prepare_model
from sam2unet_core.inference.engine import Predictor
from sam2unet_core.inference.torch_runner import TorchRunner
from sam2unet_core.io.volume import Volume
from sam2unet_core.metadata import Architecture, ModelMetadata


def _model() -> SAM2UNet:
    meta = ModelMetadata(architecture=Architecture("hiera_t"), input_size=64, intensity={"kind": "zscore"})
    return randomize_(build_model(meta), seed=4).eval()


def _input() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _snapshot(model: torch.nn.Module) -> dict:
    """Everything of ``model`` that preparing it for inference must leave alone."""
    return {
        "values": {name: tensor.clone() for name, tensor in model.state_dict().items()},
        "storage": {name: (p.data_ptr(), p.stride(), p.dtype, p.device, p.requires_grad)
                    for name, p in model.named_parameters()},
        "forwards": [name for name, module in model.named_modules() if "forward" in module.__dict__],
        "training": [module.training for module in model.modules()],
        "architecture": getattr(model, "architecture", None),
    }


def _assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after["storage"] == before["storage"]
    assert after["forwards"] == before["forwards"] == []
    assert after["training"] == before["training"]
    assert after["architecture"] == before["architecture"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before["values"][name]), name


@pytest.mark.parametrize("precision", ["auto", "fp32", "bf16", "fp16"])
def test_preparing_leaves_the_callers_model_alone(precision: str) -> None:
    model = _model().train()  # a model in training, as a trainer hands it over
    before = _snapshot(model)
    prepared, plan = prepare_model(model, "cpu", precision, native_bf16=True)
    assert prepared is not model and not prepared.training
    assert all(not p.requires_grad for p in prepared.parameters())
    with torch.no_grad():
        prepared(_input())
    _assert_unchanged(model, before)
    assert plan.speed_ups == ("channels_last", "oneDNN linear")
    stem = "encoder.patch_embed.proj.weight"  # (96, 3, 7, 7): the two formats differ
    assert prepared.get_parameter(stem).is_contiguous(memory_format=torch.channels_last)
    assert model.get_parameter(stem).is_contiguous()


def test_the_fp32_copy_shares_the_weights_and_keeps_the_output() -> None:
    model, x = _model(), _input()
    with torch.no_grad():
        reference = model(x)
    prepared, plan = prepare_model(model, "cpu", "fp32")
    assert plan.precision == "fp32" and plan.autocast is None and not plan.deep_bf16
    linear = prepared.encoder.blocks[0].block.attn.qkv.weight
    assert linear.data_ptr() == model.encoder.blocks[0].block.attn.qkv.weight.data_ptr()  # no second copy
    with torch.no_grad():
        fast = prepared(x)
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, reference, atol=1e-4, rtol=1e-4)


def test_bf16_forced_runs_the_deep_stages_in_bf16_on_any_cpu() -> None:
    """Forced on, bf16 runs (emulated where the CPU has no native bf16); fp32 elsewhere."""
    model, x = _model(), _input()
    with torch.no_grad():
        reference = model(x)
    prepared, plan = prepare_model(model, "cpu", "bf16")
    assert plan.deep_bf16 and plan.precision == "bf16 Hiera stages 3-4"
    assert ("emulated" in plan.reason) == (not cpu_has_native_bf16())
    with torch.no_grad():
        fast = prepared(x)
    assert fast.dtype == torch.float32
    difference = (fast - reference).abs().max().item()
    assert 0 < difference < 0.05 * reference.abs().max().item()  # bf16 ran, and only partly


def test_what_each_precision_means_per_device() -> None:
    cpu_bf16 = plan_precision("auto", "cpu", sam2unet=True, native_bf16=True)
    assert cpu_bf16.deep_bf16 and cpu_bf16.reason == "auto: CPU with native bf16"
    cpu_plain = plan_precision("auto", "cpu", sam2unet=True, native_bf16=False)
    assert cpu_plain.precision == "fp32" and "without native bf16" in cpu_plain.reason
    assert plan_precision("auto", "cpu", sam2unet=False, native_bf16=True).precision == "fp32"
    assert plan_precision("auto", "cuda", sam2unet=True).precision == "fp16 autocast"
    assert plan_precision("auto", "mps", sam2unet=True).precision == "fp32"
    assert plan_precision("fp32", "cuda", sam2unet=True).autocast is None
    assert plan_precision("bf16", "cuda", sam2unet=True).deep_bf16
    assert plan_precision("bf16", "cpu", sam2unet=False).precision == "bf16 autocast"
    assert plan_precision("fp16", "cpu", sam2unet=True).precision == "fp16 autocast"
    with pytest.raises(ValueError, match="precision 'int8' is not one of"):
        plan_precision("int8", "cpu", sam2unet=True)


def test_the_automatic_choice_follows_the_cpu() -> None:
    assert cpu_has_native_bf16() == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    _, plan = prepare_model(_model(), "cpu")
    assert plan.deep_bf16 == cpu_has_native_bf16()


def test_the_runner_states_what_runs() -> None:
    runner = TorchRunner(_model(), device="cpu", precision="fp32")
    assert runner.description.startswith("cpu: CPU (")
    assert runner.description.endswith("fp32 (fp32 asked; channels_last, oneDNN linear)")
    forced = TorchRunner(_model(), device="cpu", precision="bf16")
    assert "bf16 Hiera stages 3-4 (bf16 asked" in forced.description


def _volume() -> Volume:
    rng = np.random.default_rng(0)
    return Volume(rng.normal(size=(3, 50, 60)).astype(np.float32), spacing_ijk=(1.0, 1.0, 2.0))


def test_a_model_predicted_with_can_still_be_exported_and_trained(tmp_path) -> None:
    """Build a Predictor, predict, drop it; the same model object then exports to ONNX and
    trains one step (both failed when the runner prepared the caller's model in place)."""
    from sam2unet_core.export.onnx import export_onnx
    from sam2unet_core.train.losses import DeepSupervisionLoss

    model = _model()
    before = _snapshot(model)
    for precision in ("auto", "bf16"):
        predictor = Predictor(model, device="cpu", precision=precision)
        assert predictor.predict(_volume()).labels.shape_kji == (3, 50, 60)
        del predictor
    _assert_unchanged(model, before)
    assert export_onnx(model, tmp_path / "model.onnx").is_file()
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    outputs = model(_input())
    loss = DeepSupervisionLoss(1)(outputs, torch.zeros(2, 1, 64, 64))
    loss.backward()
    optimizer.step()
    assert model.head.weight.grad is not None and torch.isfinite(loss)
    assert not torch.equal(model.head.weight, before["values"]["head.weight"])


def test_another_network_runs_as_it_is() -> None:
    """A MONAI BasicUNet (benchmarks/bench_quality.py) gets no SAM2-UNet speed-ups and is
    not changed."""
    from monai.networks.nets import BasicUNet

    network = randomize_(BasicUNet(spatial_dims=2, in_channels=1, out_channels=3, features=(4, 4, 8, 8, 16, 4)))
    network.eval()
    before = _snapshot(network)
    meta = ModelMetadata(architecture=Architecture("hiera_t", 3, 1), input_size=64, intensity={"kind": "zscore"},
                         mean=[], std=[])
    runner = TorchRunner(network, metadata=meta, device="cpu")
    assert runner.plan.speed_ups == () and runner.plan.precision == "fp32"
    labels = Predictor(runner).predict(_volume()).labels
    assert labels.shape_kji == (3, 50, 60) and labels.array_kji.max() <= 2
    _assert_unchanged(network, before)


def test_set_encoder_trainable_gives_the_model_new_metadata() -> None:
    """The architecture is frozen: a runner's metadata keeps what it was built with."""
    model = _model()
    runner = TorchRunner(model, device="cpu", precision="fp32")
    shared = model.metadata
    model.set_encoder_trainable(True)
    assert not model.architecture.freeze_encoder and not model.metadata.architecture.freeze_encoder
    assert model.metadata.architecture is model.architecture
    assert shared.architecture.freeze_encoder and runner.metadata.architecture.freeze_encoder
    with pytest.raises(AttributeError):
        model.architecture.freeze_encoder = True
