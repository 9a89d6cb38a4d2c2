"""Tests for unetdist.losses: weighted pixel-wise CE, soft Dice, the combined loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unetdist.geometry import center_crop
from unetdist.losses import SegmentationLoss, pixel_cross_entropy, soft_dice_loss

# --- pixel cross entropy ---------------------------------------------------------------


def _logits_and_target(n=2, c=3, h=8, w=10, target_hw=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=generator)
    th, tw = target_hw or (h, w)
    target = torch.randint(0, c, (n, th, tw), generator=generator)
    return logits, target


def test_pixel_ce_equals_cross_entropy_without_weight():
    logits, target = _logits_and_target()
    torch.testing.assert_close(pixel_cross_entropy(logits, target), F.cross_entropy(logits, target))


def test_pixel_ce_constant_weight_scales_loss():
    logits, target = _logits_and_target()
    weight = torch.full(target.shape, 2.0)
    torch.testing.assert_close(
        pixel_cross_entropy(logits, target, weight), 2 * F.cross_entropy(logits, target)
    )


def test_pixel_ce_crops_larger_target_and_weight():
    logits, target = _logits_and_target(h=8, w=10, target_hw=(13, 16))
    weight = torch.rand(target.shape, generator=torch.Generator().manual_seed(1))
    expected = (
        F.cross_entropy(logits, center_crop(target, (8, 10)), reduction="none") * center_crop(weight, (8, 10))
    ).mean()
    torch.testing.assert_close(pixel_cross_entropy(logits, target, weight), expected)


def test_pixel_ce_smaller_target_raises_with_shapes():
    logits, target = _logits_and_target(h=8, w=10, target_hw=(6, 10))
    with pytest.raises(ValueError, match=r"\(2, 6, 10\).*\(2, 3, 8, 10\)"):
        pixel_cross_entropy(logits, target)


def test_pixel_ce_batch_mismatch_and_small_weight_raise():
    logits, target = _logits_and_target()
    with pytest.raises(ValueError, match="target shape"):
        pixel_cross_entropy(logits, target[:1])
    with pytest.raises(ValueError, match="weight shape"):
        pixel_cross_entropy(logits, target, torch.ones(2, 4, 4))


def test_pixel_ce_gradient_flows():
    logits, target = _logits_and_target()
    logits.requires_grad_(True)
    pixel_cross_entropy(logits, target, torch.rand(target.shape)).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_pixel_ce_under_bf16_autocast():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 3, kernel_size=3)
    images = torch.randn(2, 4, 12, 12)
    target = torch.randint(0, 3, (2, 12, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(images)
        assert logits.dtype == torch.bfloat16
        loss = pixel_cross_entropy(logits, target, torch.ones(2, 12, 12))
    assert loss.dtype == torch.float32
    loss.backward()
    reference = F.cross_entropy(logits.float().detach(), center_crop(target, (10, 10)))
    torch.testing.assert_close(loss.detach(), reference)
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()


# --- dice and the combined loss --------------------------------------------------------


def test_soft_dice_perfect_logits_is_zero():
    target = torch.randint(0, 3, (2, 9, 9), generator=torch.Generator().manual_seed(0))
    logits = 50.0 * F.one_hot(target, 3).permute(0, 3, 1, 2).float()
    assert soft_dice_loss(logits, target, 3).item() < 1e-4
    assert soft_dice_loss(logits, target, 3, ignore_background=True).item() < 1e-4


def test_soft_dice_wrong_logits_is_near_one():
    target = torch.zeros(1, 6, 6, dtype=torch.long)
    target[:, :3] = 1
    logits = 50.0 * F.one_hot(1 - target, 2).permute(0, 3, 1, 2).float()
    assert soft_dice_loss(logits, target, 2).item() > 0.99


def test_soft_dice_crops_target_and_has_gradient():
    logits, target = _logits_and_target(h=6, w=6, target_hw=(10, 10))
    logits.requires_grad_(True)
    loss = soft_dice_loss(logits, target, 3)
    expected = soft_dice_loss(logits, center_crop(target, (6, 6)), 3)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert logits.grad.abs().sum() > 0


def test_segmentation_loss_kinds():
    logits, target = _logits_and_target(target_hw=(12, 14))
    weight = torch.rand(target.shape)
    ce = SegmentationLoss("ce", num_classes=3)(logits, target, weight)
    torch.testing.assert_close(ce, pixel_cross_entropy(logits, target, weight))
    dice_ce = SegmentationLoss("dice_ce", num_classes=3, dice_weight=0.5)(logits, target, weight)
    torch.testing.assert_close(dice_ce, ce + 0.5 * soft_dice_loss(logits, target, 3))
    plain = SegmentationLoss()(logits[:, :2], target.clamp(max=1))
    torch.testing.assert_close(plain, pixel_cross_entropy(logits[:, :2], target.clamp(max=1)))


def test_segmentation_loss_unknown_kind_names_allowed():
    with pytest.raises(ValueError, match="ce, dice_ce"):
        SegmentationLoss("focal")


def test_segmentation_loss_channel_mismatch_raises():
    logits, target = _logits_and_target(c=3)
    with pytest.raises(ValueError, match="num_classes=2"):
        SegmentationLoss("ce", num_classes=2)(logits, target)
