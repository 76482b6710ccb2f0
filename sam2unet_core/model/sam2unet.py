"""SAM2-UNet: a U-shaped decoder on the adapter-tuned Hiera encoder of SAM 2
(Xiong et al. 2024, arXiv 2408.08870).

Differences from the official code, all opt-in except the first:
    * the unused fourth up block is left out (DDP then needs no find_unused_parameters);
    * ``num_classes > 1`` gives softmax logits with background as channel 0;
    * ``in_channels != 3`` (grey CT/MR, 2.5D slice stacks) replaces the patch embedding;
    * ``freeze_encoder=False`` trains the whole encoder (use it without SAM 2 weights);
    * ``full_res_channels > 0`` computes the logits at the input's resolution
      (``FullResolutionHead``) instead of at stride 4.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..metadata import Architecture, ModelMetadata
from .blocks import FullResolutionHead, HieraBlockAdapter, RFBModified, UpBlock
from .hiera import build_hiera_trunk, stage_channels

__all__ = ["SAM2UNet"]

DECODER_CHANNELS = 64  # RFB output and U-decoder width of the paper
ADAPTER_BOTTLENECK = 32
INPUT_MULTIPLE = 32  # the deepest Hiera stage has stride 32


class SAM2UNet(nn.Module):
    """SAM2-UNet segmentation network.

    Args:
        backbone: Hiera size, one of ``hiera_t``, ``hiera_s``, ``hiera_b+``, ``hiera_l``.
        num_classes: 1 for a binary sigmoid output, K > 1 for K softmax classes
            (background included).
        in_channels: input channels; 3 for RGB or a repeated grey slice, 1 for grey,
            k for a 2.5D stack of k neighbouring slices.
        freeze_encoder: freeze the Hiera trunk and train the adapters (the paper). With
            ``in_channels != 3`` the new patch embedding stays trainable.
        drop_path_rate: stochastic depth of the Hiera blocks in training mode (block i
            skips its residual branches with probability ``drop_path_rate * i / (n - 1)``);
            the identity in eval mode, so it is not part of the saved architecture.
        window_spec: attention window side of each Hiera stage in tokens; empty for SAM 2's
            (``[8, 4, 14, 7]`` for hiera_t). Other sides change no weights; they suit a
            trunk trained from scratch (``training/configs/demo_brain_cpu.yaml``).
        full_res_channels: 0 for the paper's head (1x1 conv on the stride-4 decoder map,
            bilinear up-sampling); c > 0 for a ``FullResolutionHead`` of width c, whose stem
            reads the input at full resolution (``head.*`` weights then differ from the
            official code's).

    Input ``(B, in_channels, H, W)`` with H and W multiples of 32. In training mode the
    forward returns ``(main, aux1, aux2)``, in eval mode ``main`` only; each is a logit
    map ``(B, num_classes, H, W)``. ``aux1``/``aux2`` come from the stride-16 and stride-8
    decoder levels (deep supervision).
    """

    def __init__(
        self,
        backbone: str = "hiera_l",
        num_classes: int = 1,
        in_channels: int = 3,
        freeze_encoder: bool = True,
        drop_path_rate: float = 0.0,
        window_spec: Sequence[int] = (),
        full_res_channels: int = 0,
    ) -> None:
        super().__init__()
        self.architecture = Architecture(backbone, num_classes, in_channels, freeze_encoder, tuple(window_spec),
                                         full_res_channels)
        self.architecture.validate()
        # labels, preprocessing and plane: set where checkpoints are built and loaded
        # (sam2unet_core.checkpoint.build_model / load_model); None for a bare network
        self.metadata: ModelMetadata | None = None

        self.encoder = build_hiera_trunk(backbone, drop_path_rate, window_spec)
        self.encoder.blocks = nn.ModuleList(
            HieraBlockAdapter(block, ADAPTER_BOTTLENECK) for block in self.encoder.blocks
        )
        if in_channels != 3:
            rgb = self.encoder.patch_embed.proj
            self.encoder.patch_embed.proj = nn.Conv2d(
                in_channels, rgb.out_channels, rgb.kernel_size, rgb.stride, rgb.padding
            )

        c1, c2, c3, c4 = stage_channels(backbone)
        width = DECODER_CHANNELS
        self.rfb1 = RFBModified(c1, width)
        self.rfb2 = RFBModified(c2, width)
        self.rfb3 = RFBModified(c3, width)
        self.rfb4 = RFBModified(c4, width)
        self.up1 = UpBlock(2 * width, width)
        self.up2 = UpBlock(2 * width, width)
        self.up3 = UpBlock(2 * width, width)
        self.side1 = nn.Conv2d(width, num_classes, kernel_size=1)
        self.side2 = nn.Conv2d(width, num_classes, kernel_size=1)
        self.head: nn.Module
        if full_res_channels:
            self.head = FullResolutionHead(in_channels, width, full_res_channels, num_classes)
        else:
            self.head = nn.Conv2d(width, num_classes, kernel_size=1)

        self.set_encoder_trainable(not freeze_encoder)

    def set_encoder_trainable(self, trainable: bool) -> None:
        """Train the whole trunk (True) or only adapters, decoder and a new patch embedding.
        The model gets a new ``architecture`` (and ``metadata``) saying so; objects handed
        out before (a runner's metadata, a saved copy) keep theirs."""
        for name, param in self.encoder.named_parameters():
            is_adapter = ".prompt_learn." in name
            is_new_stem = name.startswith("patch_embed.") and self.architecture.in_channels != 3
            param.requires_grad = trainable or is_adapter or is_new_stem
        self.architecture = dataclasses.replace(self.architecture, freeze_encoder=not trainable)
        if self.metadata is not None:
            self.metadata = dataclasses.replace(self.metadata, architecture=self.architecture)

    def class_output_layers(self) -> dict[str, nn.Conv2d]:
        """The convolutions whose output channels are the classes, by state-dict prefix:
        the deep-supervision sides and the head's logits (``(num_classes, C, 1, 1)`` weights)."""
        head = "head.logits" if self.architecture.full_res_channels else "head"
        return {name: self.get_submodule(name) for name in ("side1", "side2", head)}

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is ``(B, in_channels, H, W)`` with H, W % 32 == 0."""
        expected_c = self.architecture.in_channels
        if x.ndim != 4 or x.shape[1] != expected_c:
            raise ValueError(
                f"SAM2UNet expects input (B, {expected_c}, H, W), got {tuple(x.shape)}"
            )
        height, width = x.shape[-2:]
        if height % INPUT_MULTIPLE or width % INPUT_MULTIPLE:
            raise ValueError(
                f"SAM2UNet input sides must be multiples of {INPUT_MULTIPLE}, got {height}x{width}; "
                f"resize or pad to e.g. {_round_up(height)}x{_round_up(width)}"
            )

    def forward(
        self, x: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.check_input(x)
        size = x.shape[-2:]
        x1, x2, x3, x4 = self.encoder(x)  # strides 4, 8, 16, 32
        x1, x2, x3, x4 = self.rfb1(x1), self.rfb2(x2), self.rfb3(x3), self.rfb4(x4)
        d3 = self.up1(x4, x3)  # stride 16
        d2 = self.up2(d3, x2)  # stride 8
        d1 = self.up3(d2, x1)  # stride 4
        if self.architecture.full_res_channels:
            main = self.head(x, d1)
        else:
            main = F.interpolate(self.head(d1), size=size, mode="bilinear", align_corners=False)
        if not self.training:
            return main
        aux1 = F.interpolate(self.side1(d3), size=size, mode="bilinear", align_corners=False)
        aux2 = F.interpolate(self.side2(d2), size=size, mode="bilinear", align_corners=False)
        return main, aux1, aux2


def _round_up(side: int) -> int:
    return -(-side // INPUT_MULTIPLE) * INPUT_MULTIPLE
