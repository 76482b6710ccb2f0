"""Checkpoint interop: SAM 2 / SAM 2.1, official SAM2-UNet state dicts, our safetensors."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sam2unet_core import ModelMetadata, SAM2UNet, build_model, load_model, read_metadata, save_model
from sam2unet_core.checkpoint import CheckpointError, load_sam2_trunk
from sam2unet_core.metadata import Architecture, default_labels

from conftest import make_official_sam2unet_state, make_sam2_state
from official_reference import official_forward


def test_official_sam2unet_state_dict_gives_the_official_outputs(official_sam2unet_checkpoint):
    state = torch.load(official_sam2unet_checkpoint, weights_only=True)
    model = load_model(official_sam2unet_checkpoint)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = official_forward(state, "hiera_t", x)
        main = model(x)
        model.train()
        model.apply(lambda m: m.eval() if isinstance(m, torch.nn.BatchNorm2d) else None)
        ours = model(x)
    assert (main - expected[0]).abs().max() < 1e-4
    for a, b in zip(ours, expected):
        assert a.shape == b.shape and (a - b).abs().max() < 1e-4
    assert model.metadata.provenance["source"] == "official_sam2unet"
    assert model.metadata.architecture.backbone == "hiera_t"


def test_sam2_and_sam21_checkpoints_fill_the_trunk_on_cpu(tmp_path):
    state = make_sam2_state("hiera_t", seed=5)
    for name in ("sam2_hiera_tiny.pt", "sam2.1_hiera_tiny.pt"):
        torch.save(state, tmp_path / name)
        model = load_model(tmp_path / name, device="cpu")
        trunk = state["model"]
        torch.testing.assert_close(
            model.encoder.blocks[3].block.attn.qkv.weight, trunk["image_encoder.trunk.blocks.3.attn.qkv.weight"]
        )
        torch.testing.assert_close(model.encoder.pos_embed, trunk["image_encoder.trunk.pos_embed"])
        assert model.metadata.architecture.backbone == "hiera_t"
        assert not model.training


@pytest.mark.parametrize("backbone", ["hiera_s", "hiera_b+"])
def test_sam2_size_is_detected_from_the_tensors(tmp_path, backbone):
    path = tmp_path / "renamed.pt"  # the file name says nothing
    torch.save(make_sam2_state(backbone), path)
    assert read_metadata(path).architecture.backbone == backbone


def test_sam2_weights_into_a_grey_or_25d_model(sam2_checkpoint):
    rgb = torch.load(sam2_checkpoint, weights_only=True)["model"]["image_encoder.trunk.patch_embed.proj.weight"]
    for channels in (1, 5):
        meta = ModelMetadata(
            architecture=Architecture("hiera_t", num_classes=3, in_channels=channels),
            context_slices=(channels - 1) // 2, mean=[], std=[],
        )
        model = build_model(meta, sam2_checkpoint=sam2_checkpoint)
        weight = model.encoder.patch_embed.proj.weight
        assert weight.shape == (96, channels, 7, 7)
        torch.testing.assert_close(weight.sum(1), rgb.sum(1))


def test_sam2_checkpoint_of_another_size_is_refused(sam2_checkpoint):
    model = build_model(ModelMetadata(architecture=Architecture("hiera_s")))
    with pytest.raises(CheckpointError, match="holds a hiera_t trunk, but the model is hiera_s"):
        load_sam2_trunk(model, sam2_checkpoint)


def test_sam2_checkpoint_with_missing_trunk_keys_names_them(tmp_path):
    state = make_sam2_state("hiera_t")
    del state["model"]["image_encoder.trunk.blocks.2.mlp.layers.0.weight"]
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"missing \['blocks.2.block.mlp.layers.0.weight'\]"):
        load_model(path)


def test_official_state_dict_with_missing_and_unexpected_keys_names_them(tmp_path):
    state = make_official_sam2unet_state()
    del state["rfb2.conv_cat.conv.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert "rfb2.conv_cat.conv.weight" in str(err.value) and "extra.weight" in str(err.value)
    assert str(path) in str(err.value)


def test_our_format_round_trips_weights_and_metadata(tmp_path, tiny_model):
    meta = ModelMetadata(
        architecture=tiny_model.architecture,
        labels=default_labels(1, ["polyp"]),
        input_size=64,
        intensity={"kind": "ct_window", "center": 40.0, "width": 400.0},
        provenance={"dataset": "unit test", "epochs": 1},
    )
    path = save_model(tiny_model, tmp_path / "m.safetensors", meta)
    loaded = load_model(path)
    assert loaded.metadata == meta
    for key, value in tiny_model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    # the tensors are the file's (no uninitialised one left), frozen ones stay frozen
    trainable = {name: p.requires_grad for name, p in tiny_model.named_parameters()}
    assert {name: p.requires_grad for name, p in loaded.named_parameters()} == trainable
    assert any(trainable.values()) and not all(trainable.values())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), tiny_model(x))
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["sam2unet"])
    assert header["labels"] == [{"value": 1, "name": "polyp", "color": [230, 25, 75]}]
    assert read_metadata(path) == meta
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left


def test_window_spec_round_trips_and_sam2_windows_are_not_written(tmp_path):
    """A trunk with other attention windows saves and loads with them (same outputs); one with
    SAM 2's windows writes no ``window_spec``, so versions that know none still read it."""
    torch.manual_seed(0)
    model = SAM2UNet("hiera_t", num_classes=3, freeze_encoder=False, window_spec=[8, 4, 6, 3]).eval()
    meta = ModelMetadata(architecture=model.architecture, labels=default_labels(3), input_size=256)
    loaded = load_model(save_model(model, tmp_path / "small_windows.safetensors", meta))
    assert loaded.metadata.architecture.window_spec == (8, 4, 6, 3)
    assert [len(block.block.attn.qkv.weight) for block in loaded.encoder.blocks] == \
        [len(block.block.attn.qkv.weight) for block in model.encoder.blocks]
    assert [block.block.window_size for block in loaded.encoder.blocks] == \
        [block.block.window_size for block in model.encoder.blocks]
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
        sam2_windows = SAM2UNet("hiera_t", num_classes=3, freeze_encoder=False).eval()
        sam2_windows.load_state_dict(model.state_dict())  # windows hold no weights
        assert not torch.allclose(sam2_windows(x), model(x), atol=1e-4)
    default = save_model(sam2_windows, tmp_path / "sam2_windows.safetensors",
                         ModelMetadata(architecture=sam2_windows.architecture, labels=default_labels(3)))
    with safe_open(str(default), framework="pt") as f:
        assert "window_spec" not in json.loads(f.metadata()["sam2unet"])["architecture"]
    assert read_metadata(default).architecture.window_spec == ()


def test_full_resolution_head_round_trips_and_the_papers_head_is_not_written(tmp_path):
    """A model with the full-resolution head saves and loads with it (same outputs); the paper's
    head (0) writes no ``full_res_channels``. The head's stem sees single input pixels: a change
    of one pixel moves the logits there far more than 6 pixels away (21-400x over seeds 0-3),
    which the paper's stride-4 head, up-sampled bilinearly, cannot tell apart (1.6-2.8x)."""
    torch.manual_seed(0)
    model = SAM2UNet("hiera_t", num_classes=3, freeze_encoder=False, full_res_channels=8).eval()
    torch.manual_seed(0)
    paper = SAM2UNet("hiera_t", num_classes=3, freeze_encoder=False).eval()
    head_parameters = sum(p.numel() for p in model.head.parameters())
    assert sum(p.numel() for p in model.parameters()) - head_parameters == \
        sum(p.numel() for p in paper.parameters()) - sum(p.numel() for p in paper.head.parameters())
    meta = ModelMetadata(architecture=model.architecture, labels=default_labels(3), input_size=64)
    path = save_model(model, tmp_path / "full_res.safetensors", meta)
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["sam2unet"])["architecture"]["full_res_channels"] == 8
    loaded = load_model(path)
    assert loaded.metadata.architecture.full_res_channels == 8
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
        for network in (model, paper):
            y = x.clone()
            y[0, :, 30, 30] += 5.0
            change = (network(y) - network(x)).abs()[0].amax(0)
            ratio = change[30, 30] / change[30, 36]  # the changed pixel against one 6 px away
            assert (ratio > 10) == (network is model), float(ratio)
    default = save_model(paper, tmp_path / "paper.safetensors",
                         ModelMetadata(architecture=paper.architecture, labels=default_labels(3)))
    with safe_open(str(default), framework="pt") as f:
        assert "full_res_channels" not in json.loads(f.metadata()["sam2unet"])["architecture"]
    with pytest.raises(ValueError, match="full_res_channels must be 0"):
        Architecture("hiera_t", full_res_channels=-1).validate()


def test_window_spec_mistakes_are_named():
    with pytest.raises(ValueError, match="four window sides"):
        Architecture("hiera_t", window_spec=[8, 4, 6]).validate()
    with pytest.raises(ValueError, match="sides of stages 1-3 must be even"):
        Architecture("hiera_t", window_spec=[8, 4, 3, 3]).validate()
    with pytest.raises(ValueError, match="must stay 8 for hiera_t"):
        SAM2UNet("hiera_t", window_spec=[4, 4, 6, 3])


def test_save_refuses_metadata_of_another_architecture(tmp_path, tiny_model):
    meta = ModelMetadata(architecture=Architecture("hiera_t", num_classes=3))
    with pytest.raises(ValueError, match="differs"):
        save_model(tiny_model, tmp_path / "m.safetensors", meta)
    assert not any(tmp_path.iterdir())


def test_failed_save_leaves_the_previous_file_intact(tmp_path, tiny_model, monkeypatch):
    path = save_model(tiny_model, tmp_path / "m.safetensors")
    before = path.read_bytes()

    def crash(*args, **kwargs):
        Path(args[1]).write_bytes(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr("sam2unet_core.checkpoint.save_file", crash)
    with pytest.raises(OSError, match="No space"):
        save_model(tiny_model, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/sam2unet_pwned",))


def test_pickle_that_would_run_code_is_refused_and_never_executed(tmp_path):
    marker = Path("/tmp/sam2unet_pwned")
    marker.unlink(missing_ok=True)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        torch.save({"head.weight": _RunsCode()}, f)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_model(path)
    with pytest.raises(CheckpointError, match="refused to load"):
        read_metadata(path)
    assert not marker.exists()
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(CheckpointError):
        load_model(raw)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_and_empty_files_give_a_clear_error_naming_the_file(tmp_path, tiny_checkpoint, official_sam2unet_checkpoint, suffix):
    source = tiny_checkpoint if suffix == ".safetensors" else official_sam2unet_checkpoint
    data = source.read_bytes()
    for name, content in (("truncated", data[: len(data) // 2]), ("empty", b"")):
        path = tmp_path / f"{name}{suffix}"
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match=name):
            load_model(path)


def test_unknown_layouts_and_missing_files_are_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(CheckpointError, match="not a SAM 2, SAM 2.1, official SAM2-UNet"):
        load_model(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.safetensors")


def test_safetensors_without_our_metadata_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"head.weight": torch.zeros(1, 64, 1, 1)}, str(path))
    with pytest.raises(CheckpointError, match="without 'sam2unet' metadata"):
        load_model(path)


def test_metadata_validation_names_the_bad_field():
    with pytest.raises(ValueError, match="input_size"):
        ModelMetadata(input_size=100).validate()
    with pytest.raises(ValueError, match="intensity kind"):
        ModelMetadata(intensity={"kind": "magic"}).validate()
    with pytest.raises(ValueError, match="unknown metadata fields"):
        ModelMetadata.from_dict({"architecture": {}, "colour": 1})
    with pytest.raises(ValueError, match="does not fit context_slices"):
        ModelMetadata(architecture=Architecture(in_channels=2), mean=[], std=[]).validate()


def test_loaded_model_runs_on_the_requested_device(tiny_checkpoint):
    model = load_model(tiny_checkpoint, device="cpu")
    assert next(model.parameters()).device.type == "cpu"


def test_fuzz_findings_corrupt_pickles_and_non_tensor_entries_give_checkpoint_errors(tmp_path, official_sam2unet_checkpoint):
    """Regressions from Testing/fuzz/fuzz_inputs.py: corrupt pickle data made torch.load raise
    IndexError/KeyError/UnicodeDecodeError, and string values reached the layout checks."""
    data = bytearray(official_sam2unet_checkpoint.read_bytes())
    pickle_start = data.index(b"data.pkl") + len(b"data.pkl") + 30  # inside the pickle stream
    for position in (0, pickle_start, pickle_start + 7):
        broken = bytearray(data)
        broken[position] ^= 0x81
        path = tmp_path / f"flip{position}.pth"
        path.write_bytes(bytes(broken))
        with pytest.raises(CheckpointError, match=f"flip{position}"):
            read_metadata(path)
    path = tmp_path / "strings.pth"
    torch.save({"head.weight": "not a tensor", "encoder.blocks.0.x": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="not named tensors"):
        load_model(path)


def test_read_metadata_of_our_safetensors_file_imports_no_torch(tiny_checkpoint: Path) -> None:
    """``sam2unet_core.read_metadata``, the public call, reads our header without torch."""
    import subprocess
    import sys

    code = ("import sys, sam2unet_core; "
            f"meta = sam2unet_core.read_metadata({str(tiny_checkpoint)!r}); "
            "print(meta.architecture.backbone, sorted(m for m in ('torch', 'sam2', 'monai') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "hiera_t []"
    assert read_metadata(tiny_checkpoint) == load_model(tiny_checkpoint).metadata
