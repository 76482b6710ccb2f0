"""An independent, functional description of the official SAM2-UNet forward pass, written
from the paper's architecture (see shared/docs/anchors.md), that reads the weights straight
from an official-layout state dict by their official key names.

It shares no decoder code with ``sam2unet_core``: if our module names, op order, concat
order or interpolation modes differ from the official model, outputs or key look-ups differ.
Only the Hiera blocks themselves come from the ``sam2`` package, as in the official code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sam2unet_core.model.hiera import build_hiera_trunk


def _conv_bn(state: dict, prefix: str, x: torch.Tensor, padding=0, dilation=1) -> torch.Tensor:
    x = F.conv2d(x, state[f"{prefix}.conv.weight"], None, 1, padding, dilation)
    return F.batch_norm(
        x,
        state[f"{prefix}.bn.running_mean"],
        state[f"{prefix}.bn.running_var"],
        state[f"{prefix}.bn.weight"],
        state[f"{prefix}.bn.bias"],
        training=False,
        eps=1e-5,
    )


def _rfb(state: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    outs = [_conv_bn(state, f"{name}.branch0.0", x)]
    for branch, k in ((1, 3), (2, 5), (3, 7)):
        y = _conv_bn(state, f"{name}.branch{branch}.0", x)
        y = _conv_bn(state, f"{name}.branch{branch}.1", y, padding=(0, k // 2))
        y = _conv_bn(state, f"{name}.branch{branch}.2", y, padding=(k // 2, 0))
        y = _conv_bn(state, f"{name}.branch{branch}.3", y, padding=k, dilation=k)
        outs.append(y)
    cat = _conv_bn(state, f"{name}.conv_cat", torch.cat(outs, 1), padding=1)
    return F.relu(cat + _conv_bn(state, f"{name}.conv_res", x))


def _up(state: dict, name: str, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    x = F.interpolate(deep, scale_factor=2, mode="bilinear", align_corners=True)
    x = torch.cat([skip, x], dim=1)
    for conv, bn in ((0, 1), (3, 4)):
        p = f"{name}.conv.double_conv"
        x = F.conv2d(x, state[f"{p}.{conv}.weight"], None, 1, 1)
        x = F.batch_norm(
            x, state[f"{p}.{bn}.running_mean"], state[f"{p}.{bn}.running_var"],
            state[f"{p}.{bn}.weight"], state[f"{p}.{bn}.bias"], training=False,
        )
        x = F.relu(x)
    return x


def official_forward(state: dict, backbone: str, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(main, aux1, aux2) logits of the official model in eval mode for state dict ``state``."""
    trunk = build_hiera_trunk(backbone)
    trunk_state = {}
    for key, value in state.items():
        if key.startswith("encoder.") and ".prompt_learn." not in key:
            parts = key[len("encoder."):].split(".")
            if parts[0] == "blocks":
                assert parts[2] == "block", key  # official: encoder.blocks.{i}.block.*
                del parts[2]
            trunk_state[".".join(parts)] = value
    trunk.load_state_dict(trunk_state, strict=True)
    trunk.eval()

    feats = trunk.patch_embed(x)
    feats = feats + trunk._get_pos_embed(feats.shape[1:3])
    stage_outputs = []
    for i, block in enumerate(trunk.blocks):
        p = f"encoder.blocks.{i}.prompt_learn"
        prompt = F.gelu(F.linear(feats, state[f"{p}.0.weight"], state[f"{p}.0.bias"]))
        prompt = F.gelu(F.linear(prompt, state[f"{p}.2.weight"], state[f"{p}.2.bias"]))
        feats = block(feats + prompt)
        if i in trunk.stage_ends:
            stage_outputs.append(feats.permute(0, 3, 1, 2))  # (B, H, W, C) -> (B, C, H, W)

    x1, x2, x3, x4 = (_rfb(state, f"rfb{i + 1}", f) for i, f in enumerate(stage_outputs))
    d = _up(state, "up1", x4, x3)
    out1 = F.interpolate(F.conv2d(d, state["side1.weight"], state["side1.bias"]), scale_factor=16, mode="bilinear")
    d = _up(state, "up2", d, x2)
    out2 = F.interpolate(F.conv2d(d, state["side2.weight"], state["side2.bias"]), scale_factor=8, mode="bilinear")
    d = _up(state, "up3", d, x1)
    out = F.interpolate(F.conv2d(d, state["head.weight"], state["head.bias"]), scale_factor=4, mode="bilinear")
    return out, out1, out2
