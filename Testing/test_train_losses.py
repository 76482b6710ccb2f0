"""The structure loss against hand computations, with the BCE weighting really applied."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import uniform_filter

from sam2unet_core.train.losses import DeepSupervisionLoss, boundary_weight, structure_loss


def reference_structure_loss(logits: np.ndarray, mask: np.ndarray) -> float:
    """The paper's formula written out in numpy, one image ``(H, W)`` at a time."""
    losses = []
    for z, m in zip(logits, mask):
        # avg_pool2d(k=31, padding=15) with zero padding counted = a 31x31 box filter on zeros
        weight = 1 + 5 * np.abs(uniform_filter(m, size=31, mode="constant", cval=0.0) - m)
        p = 1 / (1 + np.exp(-z))
        bce = -(m * np.log(p) + (1 - m) * np.log(1 - p))
        wbce = (weight * bce).sum() / weight.sum()
        inter = (weight * p * m).sum()
        union = (weight * (p + m)).sum()
        losses.append(wbce + 1 - (inter + 1) / (union - inter + 1))
    return float(np.mean(losses))


def make_case(seed: int = 0, size: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2, 1, size, size, dtype=torch.float64)
    mask[0, 0, 10:25, 8:30] = 1
    mask[1, 0, 20:38, 20:36] = 1
    logits = torch.randn(2, 1, size, size, generator=gen, dtype=torch.float64) * 2
    return logits, mask


def test_boundary_weight_of_a_single_pixel_matches_the_box_filter() -> None:
    mask = torch.zeros(1, 1, 64, 64)
    mask[0, 0, 32, 32] = 1
    weight = boundary_weight(mask)
    assert weight[0, 0, 32, 32].item() == pytest.approx(1 + 5 * (1 - 1 / 961), rel=1e-6)
    assert weight[0, 0, 32 + 15, 32].item() == pytest.approx(1 + 5 / 961, rel=1e-5)
    assert weight[0, 0, 32 + 16, 32].item() == pytest.approx(1.0)
    assert torch.all(boundary_weight(torch.zeros(1, 1, 8, 8)) == 1)


def test_structure_loss_equals_the_hand_computed_formula() -> None:
    logits, mask = make_case()
    expected = reference_structure_loss(logits[:, 0].numpy(), mask[:, 0].numpy())
    assert structure_loss(logits, mask).item() == pytest.approx(expected, rel=1e-5)


def test_bce_term_is_weighted_unlike_the_official_code() -> None:
    """The official ``reduce='none'`` call averages the BCE without weights (only the IoU
    term is weighted). Our loss must exceed/differ from that by (weighted - plain BCE)."""
    logits, mask = make_case(seed=3)
    weight = boundary_weight(mask)
    bce = F.binary_cross_entropy_with_logits(logits, mask, reduction="none")
    prob = torch.sigmoid(logits)
    inter, union = (prob * mask * weight).sum(dim=(2, 3)), ((prob + mask) * weight).sum(dim=(2, 3))
    wiou = 1 - (inter + 1) / (union - inter + 1)
    official = (bce.mean() + wiou.mean()).item()  # what the official code computes
    weighted_bce = ((weight * bce).sum(dim=(2, 3)) / weight.sum(dim=(2, 3))).mean().item()
    ours = structure_loss(logits, mask).item()
    assert abs(weighted_bce - bce.mean().item()) > 1e-3  # the case makes the weighting matter
    assert ours == pytest.approx(official - bce.mean().item() + weighted_bce, rel=1e-6)
    assert abs(ours - official) > 1e-3


def test_boundary_pixels_get_larger_gradients() -> None:
    """Same logit error at a boundary pixel and deep inside the background: the boundary
    pixel's BCE gradient is larger by the weight ratio."""
    mask = torch.zeros(1, 1, 64, 64, dtype=torch.float64)
    mask[0, 0, 16:48, 16:48] = 1
    logits = torch.zeros_like(mask, requires_grad=True)
    structure_loss(logits, mask).backward()
    grad = logits.grad[0, 0]
    outside_edge, far_outside = grad[15, 32].item(), grad[1, 62].item()
    assert outside_edge > 2 * far_outside > 0


def test_perfect_prediction_has_small_loss_and_outputs_are_summed() -> None:
    _, mask = make_case()
    good = (mask * 2 - 1) * 12
    assert structure_loss(good, mask).item() < 1e-3
    logits, _ = make_case(seed=5)
    loss = DeepSupervisionLoss(1)
    outputs = (logits, logits * 0.5, -logits)
    expected = sum(structure_loss(o, mask).item() for o in outputs)
    assert loss(outputs, mask).item() == pytest.approx(expected, rel=1e-6)


def test_multiclass_loss_is_monai_dice_ce_per_output() -> None:
    from monai.losses import DiceCELoss

    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (2, 1, 16, 16), generator=gen)
    outputs = tuple(torch.randn(2, 3, 16, 16, generator=gen) for _ in range(3))
    ref = DiceCELoss(softmax=True, to_onehot_y=True)
    expected = sum(ref(o, target).item() for o in outputs)
    assert DeepSupervisionLoss(3)(outputs, target.float()).item() == pytest.approx(expected, rel=1e-6)
    perfect = F.one_hot(target[:, 0], 3).movedim(-1, 1).float() * 30
    assert DeepSupervisionLoss(3)(perfect, target.float()).item() < 0.01


def test_aux_loss_weights_scale_the_deep_supervision_outputs() -> None:
    logits, mask = make_case(seed=6)
    outputs = (logits, logits * 0.5, -logits)
    main, aux1, aux2 = (structure_loss(o, mask).item() for o in outputs)
    assert DeepSupervisionLoss(1, (0.5, 0.25))(outputs, mask).item() == pytest.approx(
        main + 0.5 * aux1 + 0.25 * aux2, rel=1e-6)
    assert DeepSupervisionLoss(1, (0.0, 0.0))(outputs, mask).item() == pytest.approx(main, rel=1e-6)
    with pytest.raises(ValueError, match="4 outputs"):
        DeepSupervisionLoss(1)((*outputs, logits), mask)


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        structure_loss(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9))
    assert math.isfinite(structure_loss(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)).item())
