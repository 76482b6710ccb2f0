"""Checkpoints: read the three kinds users hold, write ours.

Kinds (detected from the file, never from its name alone):
    * ``sam2``: official SAM 2 / SAM 2.1 checkpoints, ``{"model": state_dict}`` with the
      trunk under ``image_encoder.trunk.``; any of the four sizes, detected from tensors.
      Only the encoder is filled; the decoder stays randomly initialised (a start for training).
    * ``official_sam2unet``: ``torch.save(model.state_dict())`` of the official SAM2-UNet
      code (keys ``encoder.*``, ``rfb1..4``, ``up1..4``, ``side1/2``, ``head``); its unused
      ``up4`` is dropped.
    * ``sam2unet``: ours, a ``.safetensors`` file whose header holds the ``ModelMetadata``
      JSON under the key ``sam2unet``.

Safety: ``.pt``/``.pth`` files are read only with ``torch.load(weights_only=True)``, which
refuses pickled code; safetensors files hold no code at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import threading
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file

from .io.atomic import atomic_write
from .metadata import (
    METADATA_KEY,
    Architecture,
    FILE_KINDS,
    CheckpointError,
    ModelMetadata,
    default_labels,
    file_kind,
    read_metadata,
    read_safetensors_metadata,
)
from .model.hiera import adapt_patch_embed_weight, detect_backbone
from .model.sam2unet import SAM2UNet

__all__ = [
    "CheckpointError",
    "build_model",
    "checkpoint_kind",
    "file_kind",
    "FILE_KINDS",
    "load_model",
    "load_sam2_trunk",
    "read_metadata",
    "read_torch_metadata",
    "save_model",
]

logger = logging.getLogger(__name__)

# file ending -> how it is read: "safetensors" (ours, metadata in the header) or "torch"
# (.pt/.pth state dicts whose kind is detected from the tensors). Other backends add their
# endings here (e.g. ".onnx").
SAM2_TRUNK_PREFIX = "image_encoder.trunk."
OFFICIAL_UNUSED_PREFIX = "up4."  # the official code builds a fourth Up block and never uses it
PATCH_EMBED_KEY = "patch_embed.proj.weight"


# --------------------------------------------------------------------------- reading
def _read_torch_file(path: Path) -> dict[str, Any]:
    """Load a ``.pt``/``.pth`` file without executing any pickled code.

    Returns a dict of tensors, or SAM 2's ``{"model": dict of tensors, ...}``.
    """
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused to load: the file holds pickled objects other than tensors "
            f"(possibly code). Only plain state dicts are accepted. ({err})"
        ) from err
    except Exception as err:  # noqa: BLE001 - corrupt bytes make the unpickler raise anything
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
            f"{type(err).__name__}: {err}"
        ) from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(data).__name__}")
    tensors = data["model"] if isinstance(data.get("model"), dict) else data
    bad = [str(k) for k, v in tensors.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise CheckpointError(f"{path}: entries that are not named tensors: {bad[:5]}")
    return data


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], ModelMetadata]:
    metadata = read_metadata(path)
    try:
        state = load_file(str(path), device="cpu")
    except Exception as err:  # noqa: BLE001 - the Rust reader raises several kinds on bad bytes
        raise CheckpointError(
            f"{path}: not a readable safetensors file (truncated or corrupt?): {err}"
        ) from err
    return state, metadata


def checkpoint_kind(state: dict[str, Any]) -> str:
    """``sam2``, ``official_sam2unet`` or ``unknown`` for a loaded ``.pt`` dict."""
    if isinstance(state.get("model"), dict) and any(
        str(k).startswith(SAM2_TRUNK_PREFIX) for k in state["model"]
    ):
        return "sam2"
    if "head.weight" in state and any(str(k).startswith("encoder.blocks.") for k in state):
        return "official_sam2unet"
    return "unknown"


def read_torch_metadata(path: str | os.PathLike) -> ModelMetadata:
    """The metadata of a torch checkpoint (official SAM2-UNet, SAM 2): for these files,
    which carry none, what ``load_model`` would assume. Other kinds: ``metadata.read_metadata``."""
    path = Path(path)
    state = _read_torch_file(path)
    kind = checkpoint_kind(state)
    if kind == "sam2":
        return _sam2_metadata(_sam2_trunk_state(state, path), path)
    if kind == "official_sam2unet":
        return _official_metadata(state, path)
    raise CheckpointError(_unknown_layout_message(path, state))


def _unknown_layout_message(path: Path, state: dict[str, Any]) -> str:
    sample = ", ".join(sorted(map(str, state))[:8])
    return (
        f"{path}: not a SAM 2, SAM 2.1, official SAM2-UNet or sam2unet checkpoint "
        f"(first keys: {sample})"
    )


# ----------------------------------------------------------------- official layouts
def _sam2_trunk_state(state: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """Trunk tensors of a SAM 2 checkpoint keyed as in ``Hiera.state_dict()``."""
    trunk = {
        key[len(SAM2_TRUNK_PREFIX):]: value
        for key, value in state["model"].items()
        if key.startswith(SAM2_TRUNK_PREFIX)
    }
    if not trunk:
        raise CheckpointError(f"{path}: no '{SAM2_TRUNK_PREFIX}*' tensors in the SAM 2 checkpoint")
    return trunk


def _sam2_metadata(trunk: dict[str, torch.Tensor], path: Path) -> ModelMetadata:
    backbone = detect_backbone(trunk, str(path))
    return ModelMetadata(
        architecture=Architecture(backbone=backbone),
        provenance={"source": "sam2", "file": path.name, "note": "decoder not trained"},
    )


def _official_metadata(state: dict[str, torch.Tensor], path: Path) -> ModelMetadata:
    """The official models take 352 px RGB images scaled to [0, 1] and ImageNet-normalised."""
    trunk = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    trunk = {_strip_adapter(k): v for k, v in trunk.items() if ".prompt_learn." not in k}
    num_classes = state["head.weight"].shape[0]
    return ModelMetadata(
        architecture=Architecture(
            backbone=detect_backbone(trunk, str(path)),
            num_classes=num_classes,
            in_channels=state[f"encoder.{PATCH_EMBED_KEY}"].shape[1],
        ),
        labels=default_labels(num_classes, ["foreground"] if num_classes == 1 else None),
        input_size=352,
        provenance={"source": "official_sam2unet", "file": path.name},
    )


def _strip_adapter(key: str) -> str:
    """``blocks.3.block.attn.qkv.weight`` -> ``blocks.3.attn.qkv.weight``."""
    parts = key.split(".")
    if len(parts) > 2 and parts[0] == "blocks" and parts[2] == "block":
        del parts[2]
    return ".".join(parts)


def _wrap_adapter(key: str) -> str:
    """Inverse of ``_strip_adapter``: Hiera trunk key -> key inside ``SAM2UNet.encoder``."""
    parts = key.split(".")
    if parts[0] == "blocks":
        parts.insert(2, "block")
    return ".".join(parts)


# ------------------------------------------------------------------------- loading
# torch.nn.init's fill functions, which the layers' reset_parameters() call on construction
_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_",
                   "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_")
_INIT_LOCK = threading.Lock()


@contextlib.contextmanager
def _weights_left_uninitialised() -> Iterator[None]:
    """Within the block, ``torch.nn.init``'s fill functions leave tensors as allocated.

    For a model whose every tensor is then replaced by a checkpoint's (a strict
    ``load_state_dict(assign=True)``): drawing hiera_l's 224 M random initial weights costs
    seconds and their values are never used. (Building on the ``meta`` device would skip
    the allocations too, but sam2's Hiera calls ``.item()`` while it is built.)"""
    import torch.nn.init as init

    with _INIT_LOCK:
        originals = {name: getattr(init, name) for name in _INIT_FUNCTIONS}
        for name in _INIT_FUNCTIONS:
            setattr(init, name, lambda tensor, *args, **kwargs: tensor)
        try:
            yield
        finally:
            for name, function in originals.items():
                setattr(init, name, function)


def _load_strict(model: SAM2UNet, state: dict[str, torch.Tensor], path: Path,
                 assign: bool = False) -> None:
    """``load_state_dict(strict=True)`` with an error that names what does not match.

    ``assign``: the model's tensors become the checkpoint's (converted to the model's
    dtype where they differ) instead of copies of them: no second copy of the weights, and
    the model's own initial values, which may then be left uninitialised, are never read.
    ``requires_grad`` stays the model's (a frozen encoder stays frozen)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{path}: weights do not fit {model.architecture}: "
            f"{len(missing)} missing {missing[:10]}, {len(unexpected)} unexpected "
            f"{unexpected[:10]}, {len(mismatched)} of other shape {mismatched[:5]}"
        )
    if assign:
        state = {key: value.to(expected[key].dtype) for key, value in state.items()}
    model.load_state_dict(state, strict=True, assign=assign)


def load_sam2_trunk(model: SAM2UNet, path: str | os.PathLike) -> None:
    """Fill ``model.encoder`` from an official SAM 2 or SAM 2.1 checkpoint (any device).

    The adapters are left as they are. For ``in_channels != 3`` the RGB patch embedding is
    converted with ``adapt_patch_embed_weight``.
    """
    path = Path(path)
    state = _read_torch_file(path)
    if checkpoint_kind(state) != "sam2":
        raise CheckpointError(f"{path}: not a SAM 2 / SAM 2.1 checkpoint ({_unknown_layout_message(path, state)})")
    _fill_trunk(model, _sam2_trunk_state(state, path), path)


def _fill_trunk(model: SAM2UNet, trunk: dict[str, torch.Tensor], path: Path) -> None:
    """Copy Hiera trunk tensors (keyed as in ``Hiera.state_dict()``) into ``model.encoder``."""
    found = detect_backbone(trunk, str(path))
    if found != model.architecture.backbone:
        raise CheckpointError(
            f"{path}: holds a {found} trunk, but the model is {model.architecture.backbone}"
        )
    trunk = dict(trunk)
    trunk[PATCH_EMBED_KEY] = adapt_patch_embed_weight(trunk[PATCH_EMBED_KEY], model.architecture.in_channels)
    encoder_state = {_wrap_adapter(k): v for k, v in trunk.items()}
    expected = {k for k in model.encoder.state_dict() if ".prompt_learn." not in k}
    missing = sorted(expected - set(encoder_state))
    unexpected = sorted(set(encoder_state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: trunk keys do not match Hiera {found}: missing {missing[:10]}, "
            f"unexpected {unexpected[:10]}"
        )
    model.encoder.load_state_dict(encoder_state, strict=False)
    logger.info("loaded SAM 2 %s trunk from %s", found, path)


def build_model(metadata: ModelMetadata, sam2_checkpoint: str | os.PathLike | None = None,
                drop_path_rate: float = 0.0) -> SAM2UNet:
    """A new model for ``metadata``, its encoder filled from a SAM 2 checkpoint if given;
    ``drop_path_rate``: the encoder's stochastic depth in training (see ``SAM2UNet``)."""
    metadata.validate()
    arch = metadata.architecture
    model = SAM2UNet(arch.backbone, arch.num_classes, arch.in_channels, arch.freeze_encoder,
                     drop_path_rate=drop_path_rate, window_spec=arch.window_spec,
                     full_res_channels=arch.full_res_channels)
    model.metadata = dataclasses.replace(metadata, architecture=model.architecture)  # one object
    if sam2_checkpoint is not None:
        load_sam2_trunk(model, sam2_checkpoint)
    return model


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> SAM2UNet:
    """Load any supported checkpoint (see the module docstring) and return the model in
    eval mode on ``device``, with ``model.metadata`` describing it."""
    path = Path(path)
    if file_kind(path) == "onnx":
        raise CheckpointError(f"{path}: an ONNX file is run by ONNX Runtime "
                              f"(sam2unet_core.inference.onnx_runner.OnnxRunner), not loaded into torch")
    if file_kind(path) == "safetensors":
        state, metadata = _read_safetensors(path)
        with _weights_left_uninitialised():  # every tensor comes from the file
            model = build_model(metadata)
        _load_strict(model, state, path, assign=True)
    else:
        state = _read_torch_file(path)
        kind = checkpoint_kind(state)
        if kind == "sam2":
            trunk = _sam2_trunk_state(state, path)
            model = build_model(_sam2_metadata(trunk, path))
            _fill_trunk(model, trunk, path)  # the file is read once
            logger.warning("%s is a SAM 2 / SAM 2.1 checkpoint: the decoder is untrained", path)
        elif kind == "official_sam2unet":
            with _weights_left_uninitialised():  # every tensor comes from the file
                model = build_model(_official_metadata(state, path))
            state = {k: v for k, v in state.items() if not k.startswith(OFFICIAL_UNUSED_PREFIX)}
            _load_strict(model, state, path, assign=True)
        else:
            raise CheckpointError(_unknown_layout_message(path, state))
    return model.to(device).eval()


# ------------------------------------------------------------------------- saving
def save_model(
    model: SAM2UNet,
    path: str | os.PathLike,
    metadata: ModelMetadata | dict[str, Any] | None = None,
) -> Path:
    """Write weights and metadata to ``path`` (``.safetensors``) atomically.

    ``metadata`` defaults to ``model.metadata``; a dict is read with
    ``ModelMetadata.from_dict``. Its architecture must be the model's.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: our checkpoints end in .safetensors")
    if metadata is None:
        if model.metadata is None:
            raise ValueError("the model has no metadata (a bare SAM2UNet): build it with "
                             "sam2unet_core.build_model, or pass metadata=ModelMetadata(...)")
        metadata = model.metadata
    elif isinstance(metadata, dict):
        metadata = ModelMetadata.from_dict(metadata)
    metadata.validate()
    if metadata.architecture != model.architecture:
        raise ValueError(
            f"metadata architecture {metadata.architecture} differs from the model's "
            f"{model.architecture}"
        )
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={METADATA_KEY: metadata.to_json()}))
    return path
