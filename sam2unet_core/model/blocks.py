"""Building blocks of SAM2-UNet: the Hiera block adapter, the receptive-field block (RFB)
and the U-Net up-sampling block.

Attribute names follow the official SAM2-UNet code so that its state dicts load by name.
All feature maps are ``(B, C, H, W)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["HieraBlockAdapter", "ConvBN", "RFBModified", "DoubleConv", "UpBlock", "FullResolutionHead"]


class HieraBlockAdapter(nn.Module):
    """Wraps a frozen Hiera block: ``block(x + GELU(up(GELU(down(x)))))``.

    Hiera blocks work channels-last, so ``x`` is ``(B, H, W, dim)``.
    """

    def __init__(self, block: nn.Module, bottleneck: int = 32) -> None:
        super().__init__()
        self.block = block
        dim = block.attn.qkv.in_features
        # Named as in the official code: prompt_learn.{0,2} hold the two Linear layers.
        self.prompt_learn = nn.Sequential(
            nn.Linear(dim, bottleneck),
            nn.GELU(),
            nn.Linear(bottleneck, dim),
            nn.GELU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x + self.prompt_learn(x))


class ConvBN(nn.Sequential):
    """Conv2d without bias followed by BatchNorm2d, no activation (the official
    ``BasicConv2d`` defines a ReLU but never applies it)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        padding: int | tuple[int, int] = 0,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        # Submodule names `conv` and `bn` match the official keys (e.g. rfb1.branch0.0.conv.weight).
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels)


def _rfb_branch(in_channels: int, out_channels: int, k: int) -> nn.Sequential:
    """1x1 -> (1 x k) -> (k x 1) -> 3x3 with dilation k."""
    return nn.Sequential(
        ConvBN(in_channels, out_channels, 1),
        ConvBN(out_channels, out_channels, (1, k), padding=(0, k // 2)),
        ConvBN(out_channels, out_channels, (k, 1), padding=(k // 2, 0)),
        ConvBN(out_channels, out_channels, 3, padding=k, dilation=k),
    )


class RFBModified(nn.Module):
    """Receptive-field block: four branches (1x1; k = 3, 5, 7 strip + dilated convs),
    concatenated and fused by a 3x3 conv, plus a 1x1 residual, then ReLU.

    ``(B, in_channels, H, W) -> (B, out_channels, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.branch0 = nn.Sequential(ConvBN(in_channels, out_channels, 1))
        self.branch1 = _rfb_branch(in_channels, out_channels, 3)
        self.branch2 = _rfb_branch(in_channels, out_channels, 5)
        self.branch3 = _rfb_branch(in_channels, out_channels, 7)
        self.conv_cat = ConvBN(4 * out_channels, out_channels, 3, padding=1)
        self.conv_res = ConvBN(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)]
        fused = self.conv_cat(torch.cat(branches, dim=1))
        return F.relu(fused + self.conv_res(x))


class DoubleConv(nn.Module):
    """(3x3 conv, BN, ReLU) twice; ``double_conv`` indices match the official keys."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int) -> None:
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class UpBlock(nn.Module):
    """Bilinear x2 (align_corners=True), concatenate ``[skip, up]``, DoubleConv.

    ``deep (B, C_d, H, W)``, ``skip (B, C_s, 2H, 2W)`` -> ``(B, out_channels, 2H, 2W)`` with
    ``C_d + C_s == in_channels``. Sides are multiples of 32 in SAM2UNet, so the up-sampled
    map always matches the skip and needs no padding.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = DoubleConv(in_channels, out_channels, in_channels // 2)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(deep, size=skip.shape[-2:], mode="bilinear", align_corners=True)
        return self.conv(torch.cat([skip, up], dim=1))


class FullResolutionHead(nn.Module):
    """Logits at the input's resolution (not part of the paper; for training from scratch).

    A two-conv stem (3x3 conv, BN, ReLU twice) reads the input image at full resolution
    into ``channels`` maps. The stride-4 decoder map is projected to ``channels`` maps by a
    1x1 conv *before* it is up-sampled bilinearly to the input size (projecting first makes
    the head 3x cheaper than fusing all decoder channels at full resolution). The two are
    concatenated, fused by a ``DoubleConv`` and turned into logits by a 1x1 conv. The paper's
    head is the 1x1 conv on the stride-4 map, then bilinear up-sampling: its logits cannot
    place a boundary finer than 4 input pixels.

    ``image (B, C_in, H, W)``, ``decoder (B, C_d, H/4, W/4)`` -> ``(B, num_classes, H, W)``.
    """

    def __init__(self, in_channels: int, decoder_channels: int, channels: int, num_classes: int) -> None:
        super().__init__()
        self.stem = DoubleConv(in_channels, channels, channels)
        self.project = nn.Conv2d(decoder_channels, channels, kernel_size=1)
        self.fuse = DoubleConv(2 * channels, channels, channels)
        self.logits = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, image: torch.Tensor, decoder: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(self.project(decoder), size=image.shape[-2:], mode="bilinear", align_corners=False)
        return self.logits(self.fuse(torch.cat([self.stem(image), up], dim=1)))
