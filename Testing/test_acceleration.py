"""The CPU acceleration choice (sam2unet_core.inference.acceleration): what it applies on
which device and CPU, that the fp32 path keeps the output, that the bf16 path is used only
when asked or supported, and that training and the state dict are untouched."""

from __future__ import annotations

import torch
from conftest import randomize_

from sam2unet_core import SAM2UNet
from sam2unet_core.inference.acceleration import accelerate_model, cpu_has_native_bf16


def _model() -> SAM2UNet:
    return randomize_(SAM2UNet("hiera_t"), seed=4).eval()


def _input() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_other_devices_are_left_unchanged() -> None:
    model = _model()
    before = {name: p.clone() for name, p in model.state_dict().items()}
    info = accelerate_model(model, torch.device("cuda"))
    assert not (info.channels_last or info.onednn_linear or info.deep_bf16)
    assert "unchanged" in info.describe()
    assert all("forward" not in layer.__dict__ for layer in model.modules())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name])


def test_cpu_without_native_bf16_stays_fp32_and_keeps_the_output() -> None:
    model, x = _model(), _input()
    with torch.no_grad():
        reference = model(x)[0]
    keys = list(model.state_dict())
    info = accelerate_model(model, "cpu", native_bf16=False)
    assert info.channels_last and info.onednn_linear and not info.deep_bf16
    assert "fp32" in info.describe() and "without native bf16" in info.reason
    assert list(model.state_dict()) == keys  # checkpoints still load and save
    assert model.head.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fast = model(x)[0]
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, reference, atol=1e-4, rtol=1e-4)
    # Applying it twice changes nothing more.
    accelerate_model(model, "cpu", native_bf16=False)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], fast, atol=1e-6, rtol=0)


def test_bf16_deep_stages_only_when_asked_and_training_stays_fp32() -> None:
    model, x = _model(), _input()
    with torch.no_grad():
        reference = model(x)[0]
    info = accelerate_model(model, "cpu", native_bf16=True)
    assert info.deep_bf16 and "bf16 Hiera stages 3-4" in info.describe()
    with torch.no_grad():
        fast = model(x)[0]
    assert fast.dtype == torch.float32
    difference = (fast - reference).abs().max().item()
    assert 0 < difference < 0.05 * reference.abs().max().item()  # bf16 ran, and only partly
    # With gradients on (training), every layer takes its usual fp32 path.
    model.train()
    out = model(x)[0]
    out.float().mean().backward()
    assert out.dtype == torch.float32
    assert model.head.weight.grad is not None


def test_the_automatic_choice_follows_the_cpu() -> None:
    assert cpu_has_native_bf16() == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    info = accelerate_model(_model(), "cpu")
    assert info.deep_bf16 == cpu_has_native_bf16()
