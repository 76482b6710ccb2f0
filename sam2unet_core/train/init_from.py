"""Continue training from one of our models (``model.init_from``): fine-tuning and adding labels.

The base model gives the settings a config does not set (:func:`settings_of_model`, applied
by ``load_config``) and every weight of the new model. Its architecture must be the
config's (backbone, attention windows, head width, input channels); a mismatch is refused
before any training, naming both sides.

Labels are matched by name. Every label of the base must be in the training data (a label
left out would be trained away); names the base does not have become new output channels,
started from the new model's random initialisation. The class-output convolutions
(:meth:`SAM2UNet.class_output_layers`) are filled channel by channel: background from the
base's background, each kept label from its own channel. A binary base (one sigmoid logit
``z``) extended to softmax classes gets a zero background logit: ``softmax(0, z)`` then
equals ``sigmoid(z)``, so the kept label starts where the base model was.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sam2unet_core.metadata import ModelMetadata, file_kind, read_safetensors_metadata

__all__ = ["BaseModel", "read_base_model", "settings_of_model"]

logger = logging.getLogger(__name__)

MODEL_FIELDS = ("backbone", "window_spec", "full_res_channels")  # config.model keys a base model sets


def settings_of_model(metadata: ModelMetadata) -> dict[str, dict[str, Any]]:
    """Config sections ``{"data": ..., "model": ...}`` holding the base model's preprocessing,
    plane(s) and architecture: the values a fine-tuning config starts from."""
    data = {name: getattr(metadata, name) for name in ("input_size", "intensity", "mean", "std",
                                                        "context_slices", "plane", "planes")}
    arch = metadata.architecture
    model = {"backbone": arch.backbone, "window_spec": list(arch.window_spec),
             "full_res_channels": arch.full_res_channels}
    return {"data": data, "model": model}


def _check_readable(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"model.init_from: {path}: model file not found")
    if file_kind(path) != "safetensors":
        raise ValueError(f"model.init_from: {path}: training continues from one of our .safetensors models "
                         f"(sam2unet-train output); for SAM 2 weights use model.sam2_checkpoint")
    return path


def read_init_metadata(path: str | os.PathLike) -> ModelMetadata:
    """The metadata of a ``model.init_from`` file (no weights read); ``ValueError`` naming
    the file when it is missing or not one of our models."""
    return read_safetensors_metadata(_check_readable(path))


@dataclass
class BaseModel:
    """A model training continues from: its file, metadata and weights (CPU tensors)."""

    path: Path
    metadata: ModelMetadata
    weights: dict[str, torch.Tensor]

    def check_architecture(self, backbone: str, window_spec: tuple[int, ...], full_res_channels: int,
                           in_channels: int) -> None:
        """Refuse a config whose network differs from the base's, naming both values."""
        arch = self.metadata.architecture
        mine = {"backbone": arch.backbone, "window_spec": tuple(arch.window_spec),
                "full_res_channels": arch.full_res_channels, "input channels (data.context_slices)": arch.in_channels}
        theirs = {"backbone": backbone, "window_spec": tuple(window_spec), "full_res_channels": full_res_channels,
                  "input channels (data.context_slices)": in_channels}
        differ = [f"{key}: {mine[key]} in the model, {theirs[key]} in the config" for key in mine
                  if mine[key] != theirs[key]]
        if differ:
            raise ValueError(f"model.init_from: {self.path} cannot be continued with this config; "
                             + "; ".join(differ))

    def check_labels(self, names: list[str]) -> None:
        """Refuse training data that lacks a label of the base model."""
        missing = [name for name in self.metadata.class_names if name not in names]
        if missing:
            raise ValueError(f"model.init_from: {self.path} segments {self.metadata.class_names}; the training "
                             f"data has no label named {missing} (labels: {names}). Label every structure of "
                             f"the model in the training data, or start from another model")

    def initialise(self, model: torch.nn.Module, metadata: ModelMetadata) -> None:
        """Fill ``model`` (built for ``metadata``) from the base's weights, matching output
        channels by label name (see the module docstring)."""
        new_names, old_names = metadata.class_names, self.metadata.class_names
        added = [name for name in new_names if name not in old_names]
        outputs = model.class_output_layers()
        output_keys = {f"{prefix}.{part}" for prefix in outputs for part in ("weight", "bias")}
        shared = {k: v for k, v in self.weights.items() if k not in output_keys}
        missing, unexpected = model.load_state_dict(shared, strict=False)
        if unexpected or set(missing) - output_keys:
            raise ValueError(f"model.init_from: {self.path}: weights do not fit the network "
                             f"(missing {sorted(set(missing) - output_keys)[:5]}, unexpected {unexpected[:5]})")
        old_binary = self.metadata.architecture.num_classes == 1
        new_binary = metadata.architecture.num_classes == 1
        with torch.no_grad():
            for prefix, conv in outputs.items():
                old_w, old_b = self.weights[f"{prefix}.weight"], self.weights[f"{prefix}.bias"]
                if new_binary:  # same single label (check_labels)
                    conv.weight.copy_(old_w)
                    conv.bias.copy_(old_b)
                    continue
                if old_binary:  # background logit 0: softmax(0, z) == sigmoid(z)
                    conv.weight[0].zero_()
                    conv.bias[0].zero_()
                else:
                    conv.weight[0].copy_(old_w[0])
                    conv.bias[0].copy_(old_b[0])
                for channel, name in enumerate(new_names, start=1):
                    if name in old_names:
                        source = 0 if old_binary else old_names.index(name) + 1
                        conv.weight[channel].copy_(old_w[source])
                        conv.bias[channel].copy_(old_b[source])
        logger.info("continuing from %s: labels kept %s%s", self.path, [n for n in new_names if n in old_names],
                    f"; new labels (new output channels): {added}" if added else "")


def read_base_model(path: str | os.PathLike) -> BaseModel:
    """The ``model.init_from`` model: metadata and weights, on the CPU."""
    from safetensors.torch import load_file

    path = _check_readable(path)
    return BaseModel(path, read_safetensors_metadata(path), load_file(str(path)))
