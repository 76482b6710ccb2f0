"""The network: shapes, parameter counts, trainable splits, input checks."""

from __future__ import annotations

import pytest
import torch
import yaml

from sam2unet_core import SAM2UNet
from sam2unet_core.model.hiera import BACKBONE_NAMES, adapt_patch_embed_weight, backbone_config, stage_channels


def count(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def test_hiera_l_parameter_counts_match_the_paper_without_the_unused_up_block():
    model = SAM2UNet("hiera_l", num_classes=1, in_channels=3)
    assert count(model) == 216_419_043
    assert count(model, trainable_only=True) == 4_269_747


def test_trunk_parameter_counts_match_sam2():
    # anchors.md: trunk params 26.85M / 33.95M / 68.68M / 212.15M
    expected = {"hiera_t": 26.85e6, "hiera_s": 33.95e6, "hiera_b+": 68.68e6}
    from sam2unet_core.model.hiera import build_hiera_trunk

    for name, params in expected.items():
        assert abs(count(build_hiera_trunk(name)) - params) < 0.01e6, name


@pytest.mark.parametrize("name", ["hiera_t", "hiera_s", "hiera_b+", "hiera_l"])
def test_backbone_table_agrees_with_the_sam2_package_configs(name):
    """Our written-out table equals the sam2 YAML configs plus Hiera's defaults."""
    import inspect
    from importlib import resources

    from sam2.modeling.backbones.hieradet import Hiera

    stem = {"hiera_t": "t", "hiera_s": "s", "hiera_b+": "b+", "hiera_l": "l"}[name]
    defaults = {
        k: v.default for k, v in inspect.signature(Hiera.__init__).parameters.items()
        if v.default is not inspect.Parameter.empty
    }
    for release in ("sam2/sam2_hiera", "sam2.1/sam2.1_hiera"):
        text = (resources.files("sam2") / "configs" / f"{release}_{stem}.yaml").read_text()
        trunk = yaml.safe_load(text)["model"]["image_encoder"]["trunk"]
        trunk.pop("_target_")
        full = {k: list(defaults[k]) if isinstance(defaults[k], tuple) else defaults[k] for k in backbone_config(name)}
        full.update(trunk)
        assert full == backbone_config(name), release


@pytest.mark.parametrize(
    "kwargs, in_shape",
    [
        ({"backbone": "hiera_t"}, (2, 3, 64, 64)),
        ({"backbone": "hiera_t", "num_classes": 4}, (1, 3, 96, 64)),
        ({"backbone": "hiera_t", "in_channels": 1}, (1, 1, 64, 128)),
        ({"backbone": "hiera_t", "in_channels": 5, "num_classes": 2}, (2, 5, 32, 64)),
        ({"backbone": "hiera_s"}, (1, 3, 64, 64)),
    ],
)
def test_output_shapes_in_train_and_eval_mode(kwargs, in_shape):
    model = SAM2UNet(**kwargs)
    x = torch.randn(in_shape)
    out_shape = (in_shape[0], kwargs.get("num_classes", 1), *in_shape[2:])
    model.train()
    outputs = model(x)
    assert isinstance(outputs, tuple) and len(outputs) == 3
    assert all(o.shape == out_shape for o in outputs)
    model.eval()
    with torch.no_grad():
        main = model(x)
    assert main.shape == out_shape and torch.isfinite(main).all()


@pytest.mark.parametrize("side", [(64, 70), (50, 64), (48, 16)])
def test_input_sides_not_multiple_of_32_are_refused_with_a_clear_message(side):
    model = SAM2UNet("hiera_t").eval()
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, *side))


def test_wrong_channel_count_is_refused():
    model = SAM2UNet("hiera_t", in_channels=1).eval()
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model(torch.randn(1, 3, 64, 64))


def test_invalid_arguments_raise_value_error():
    with pytest.raises(ValueError, match="backbone"):
        SAM2UNet("hiera_xl")
    with pytest.raises(ValueError, match="num_classes"):
        SAM2UNet("hiera_t", num_classes=0)


def test_frozen_encoder_trains_only_adapters_and_decoder():
    model = SAM2UNet("hiera_t")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    encoder_trainable = {n for n in trainable if n.startswith("encoder.")}
    assert encoder_trainable and all(".prompt_learn." in n for n in encoder_trainable)
    assert {"head.weight", "side1.weight", "rfb4.conv_res.conv.weight"} <= trainable
    n_blocks = len(model.encoder.blocks)
    assert sum(".prompt_learn.0.weight" in n for n in encoder_trainable) == n_blocks


def test_unfrozen_encoder_trains_everything_and_grey_stem_is_trainable_when_frozen():
    full = SAM2UNet("hiera_t", freeze_encoder=False)
    assert all(p.requires_grad for p in full.parameters())
    grey = SAM2UNet("hiera_t", in_channels=1)
    assert grey.encoder.patch_embed.proj.weight.requires_grad
    assert not grey.encoder.blocks[0].block.attn.qkv.weight.requires_grad


def test_stochastic_depth_acts_in_training_only_and_grows_with_depth():
    model = SAM2UNet("hiera_t", freeze_encoder=False, drop_path_rate=0.2)
    rates = [getattr(b.block.drop_path, "drop_prob", 0.0) for b in model.encoder.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2) and rates == sorted(rates)
    plain = SAM2UNet("hiera_t", freeze_encoder=False)
    plain.load_state_dict(model.state_dict())  # same parameters: not part of the architecture
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model.eval()(x), plain.eval()(x))
    torch.manual_seed(0)
    first = model.train()(x)[0]
    torch.manual_seed(1)
    assert not torch.allclose(first, model(x)[0])  # other blocks dropped


def test_no_unused_parameters_so_ddp_needs_no_find_unused_parameters():
    model = SAM2UNet("hiera_t").train()
    main, aux1, aux2 = model(torch.randn(1, 3, 64, 64))
    (main.sum() + aux1.sum() + aux2.sum()).backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []


def test_grey_patch_embedding_reproduces_the_rgb_response_of_a_repeated_slice():
    weight = torch.randn(96, 3, 7, 7)
    grey = torch.randn(1, 1, 32, 32)
    rgb_response = torch.nn.functional.conv2d(grey.repeat(1, 3, 1, 1), weight)
    for k in (1, 5):
        adapted = adapt_patch_embed_weight(weight, k)
        assert adapted.shape == (96, k, 7, 7)
        response = torch.nn.functional.conv2d(grey.repeat(1, k, 1, 1), adapted)
        torch.testing.assert_close(response, rgb_response, rtol=1e-4, atol=1e-4)


def test_stage_channels():
    assert stage_channels("hiera_l") == [144, 288, 576, 1152]
    assert stage_channels("hiera_b+") == [112, 224, 448, 896]
    assert set(BACKBONE_NAMES) == {"hiera_t", "hiera_s", "hiera_b+", "hiera_l"}
