"""The Hiera image encoder of SAM 2, built from the ``sam2`` package with the trunk
configurations in ``backbones.yaml``.

The trunk takes ``(B, 3, H, W)`` images and returns four feature maps, shallowest first,
``(B, C_s, H / 2**(s+2), W / 2**(s+2))`` for stages s = 0..3 (strides 4, 8, 16, 32).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from torch import nn

__all__ = [
    "BACKBONE_NAMES",
    "backbone_config",
    "build_hiera_trunk",
    "stage_channels",
    "detect_backbone",
    "adapt_patch_embed_weight",
]

_CONFIG_FILE = Path(__file__).with_name("backbones.yaml")


@functools.lru_cache(maxsize=1)
def _load_table() -> dict[str, dict[str, Any]]:
    with open(_CONFIG_FILE, encoding="utf-8") as f:
        return yaml.safe_load(f)


BACKBONE_NAMES: tuple[str, ...] = tuple(_load_table())


def backbone_config(name: str) -> dict[str, Any]:
    """Hiera keyword arguments of one variant (``hiera_t``, ``hiera_s``, ``hiera_b+``, ``hiera_l``)."""
    table = _load_table()
    if name not in table:
        raise ValueError(f"unknown backbone {name!r}; choose one of {list(table)}")
    return dict(table[name]["trunk"])


def stage_channels(name: str) -> list[int]:
    """Channels of the four stage outputs, shallowest first (e.g. 144/288/576/1152 for hiera_l)."""
    embed_dim = backbone_config(name)["embed_dim"]
    return [embed_dim * 2**s for s in range(4)]


def build_hiera_trunk(name: str, drop_path_rate: float = 0.0, window_spec: Sequence[int] = ()) -> nn.Module:
    """A randomly initialised Hiera trunk of the named size (weights are loaded separately);
    ``drop_path_rate``: stochastic depth in training (0: none); ``window_spec``: the side of
    the attention windows of each of the four stages, in tokens (empty: SAM 2's, e.g.
    ``[8, 4, 14, 7]`` for hiera_t). The windows hold no weights, except that the first side is
    also that of a learned position embedding, so it cannot change."""
    # Imported here: importing sam2 initialises Hydra, which no caller should pay for at import.
    from sam2.modeling.backbones.hieradet import Hiera

    config = backbone_config(name)
    if window_spec:
        if window_spec[0] != config["window_spec"][0]:
            raise ValueError(f"window_spec {list(window_spec)}: the first side sizes a learned position "
                             f"embedding and must stay {config['window_spec'][0]} for {name}")
        config["window_spec"] = list(window_spec)
    return Hiera(**config, drop_path_rate=drop_path_rate)


def detect_backbone(trunk_state: dict[str, torch.Tensor], source: str = "checkpoint") -> str:
    """Name the Hiera size from trunk tensors keyed as in ``Hiera.state_dict()``.

    The embedding width (``patch_embed.proj.weight``) and the number of blocks identify
    each of the four sizes uniquely.
    """
    if "patch_embed.proj.weight" not in trunk_state:
        raise ValueError(f"{source}: no Hiera patch embedding (patch_embed.proj.weight) found")
    embed_dim = trunk_state["patch_embed.proj.weight"].shape[0]
    block_ids = {int(key.split(".")[1]) for key in trunk_state if key.startswith("blocks.")}
    depth = max(block_ids) + 1 if block_ids else 0
    for name in BACKBONE_NAMES:
        cfg = backbone_config(name)
        if cfg["embed_dim"] == embed_dim and sum(cfg["stages"]) == depth:
            return name
    raise ValueError(
        f"{source}: Hiera trunk with embed_dim={embed_dim} and {depth} blocks matches none of "
        f"{list(BACKBONE_NAMES)}"
    )


def adapt_patch_embed_weight(weight_rgb: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Turn the RGB patch-embedding kernel ``(D, 3, 7, 7)`` into one for ``in_channels`` inputs.

    The result gives the same features as the RGB kernel does for a grey image repeated on
    all three channels: the RGB kernels are averaged and scaled by ``3 / in_channels``, so a
    constant stack of ``in_channels`` grey slices sees the pretrained response.
    """
    if weight_rgb.ndim != 4 or weight_rgb.shape[1] != 3:
        raise ValueError(f"expected an RGB kernel (D, 3, kH, kW), got {tuple(weight_rgb.shape)}")
    if in_channels == 3:
        return weight_rgb.clone()
    mean_kernel = weight_rgb.mean(dim=1, keepdim=True)  # (D, 1, kH, kW)
    return mean_kernel.repeat(1, in_channels, 1, 1) * (3.0 / in_channels)
