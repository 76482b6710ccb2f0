"""Training losses for SAM2-UNet.

Binary models use the paper's *structure loss* (weighted BCE + weighted IoU) on each of the
three outputs, summed. The pixel weight is ``1 + 5 * |avgpool31(mask) - mask|``: pixels near
the object boundary count up to six times more.

Note on the official code (WZH0120/SAM2-UNet ``train.py``): it calls
``F.binary_cross_entropy_with_logits(..., reduce='none')``. ``reduce`` is the legacy flag, so
that call returns the *mean* BCE and the weighting of the BCE term is silently lost. We apply
the weighting the paper describes (``weighted_bce`` below keeps per-pixel values).

Multi-class models (K > 1 softmax channels, channel 0 background) use MONAI's ``DiceCELoss``
on each output, summed.

All tensors are ``(B, C, H, W)``: logits with C = num_classes; binary targets ``(B, 1, H, W)``
in {0, 1} (float); multi-class targets ``(B, 1, H, W)`` holding label values 0..K-1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["boundary_weight", "structure_loss", "DeepSupervisionLoss"]


def boundary_weight(mask: torch.Tensor, kernel_size: int = 31, factor: float = 5.0) -> torch.Tensor:
    """Pixel weights ``1 + factor * |avgpool_k(mask) - mask|`` for a ``(B, 1, H, W)`` mask.

    The average pool uses zero padding that counts towards the mean (PyTorch's default,
    as in the official code), so pixels near the image border get a slightly higher weight.
    """
    pooled = F.avg_pool2d(mask, kernel_size=kernel_size, stride=1, padding=kernel_size // 2)
    return 1.0 + factor * torch.abs(pooled - mask)


def structure_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Weighted BCE + weighted IoU of one output, averaged over the batch.

    Args:
        logits: ``(B, 1, H, W)`` raw scores.
        mask: ``(B, 1, H, W)`` float target in {0, 1}.

    Returns:
        Scalar: mean over the batch of ``wbce + wiou`` where, per image,
        ``wbce = sum(w * bce) / sum(w)`` and ``wiou = 1 - (I + 1) / (U - I + 1)`` with
        ``I = sum(w * p * m)``, ``U = sum(w * (p + m))`` and ``p = sigmoid(logits)``.
    """
    if logits.shape != mask.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and mask {tuple(mask.shape)} differ in shape")
    logits = logits.float()
    mask = mask.float()
    weight = boundary_weight(mask)
    bce = F.binary_cross_entropy_with_logits(logits, mask, reduction="none")
    weighted_bce = (weight * bce).sum(dim=(2, 3)) / weight.sum(dim=(2, 3))
    prob = torch.sigmoid(logits)
    inter = (prob * mask * weight).sum(dim=(2, 3))
    union = ((prob + mask) * weight).sum(dim=(2, 3))
    weighted_iou = 1.0 - (inter + 1.0) / (union - inter + 1.0)
    return (weighted_bce + weighted_iou).mean()


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of one per-output loss over the model's outputs ``(main, aux1, aux2)``:
    ``main + aux_weights[0] * aux1 + aux_weights[1] * aux2`` (the paper: all weights 1).

    ``num_classes == 1``: :func:`structure_loss`. ``num_classes > 1``: MONAI
    ``DiceCELoss(softmax=True, to_onehot_y=True)`` with label values 0..K-1 as target.
    """

    def __init__(self, num_classes: int, aux_weights: Sequence[float] = (1.0, 1.0)) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.weights = (1.0, *(float(w) for w in aux_weights))
        if num_classes == 1:
            self.single = structure_loss
        else:
            from monai.losses import DiceCELoss

            self.single = DiceCELoss(softmax=True, to_onehot_y=True)

    def forward(self, outputs: Sequence[torch.Tensor] | torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``outputs``: one ``(B, C, H, W)`` tensor or a sequence; ``target``: ``(B, 1, H, W)``."""
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        if self.num_classes > 1:
            target = target.long()
        if len(outputs) > len(self.weights):
            raise ValueError(f"got {len(outputs)} outputs, have {len(self.weights)} loss weights")
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for out, weight in zip(outputs, self.weights):
            if weight:
                total = total + weight * self.single(out.float(), target)
        return total

