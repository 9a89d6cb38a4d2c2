"""Tests for unetdist.metrics: confusion counts and the Dice/IoU derived from them."""

from __future__ import annotations

import math

import pytest
import torch

from unetdist.geometry import center_crop
from unetdist.metrics import confusion_from_logits, confusion_matrix, dice_iou, metric_dict


def _tiny_example() -> tuple[torch.Tensor, torch.Tensor]:
    target = torch.tensor([[0, 0, 1, 1], [1, 2, 2, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 2, 2, 2]])
    return pred, target


def test_confusion_matrix_rows_truth_columns_prediction():
    pred, target = _tiny_example()
    confusion = confusion_matrix(pred, target, 3)
    assert confusion.dtype == torch.int64
    # truth 0: pred 0, 1, 2 ; truth 1: pred 1, 1, 0 ; truth 2: pred 2, 2
    expected = torch.tensor([[1, 1, 1], [1, 2, 0], [0, 0, 2]])
    assert torch.equal(confusion, expected)


def test_dice_iou_known_numbers():
    pred, target = _tiny_example()
    scores = dice_iou(confusion_matrix(pred, target, 3))
    # class 0: tp 1, fp 1, fn 2 ; class 1: tp 2, fp 1, fn 1 ; class 2: tp 2, fp 1, fn 0
    expected_dice = [2 / 5, 4 / 6, 4 / 5]
    expected_iou = [1 / 4, 2 / 4, 2 / 3]
    assert scores["dice"] == pytest.approx(expected_dice)
    assert scores["iou"] == pytest.approx(expected_iou)
    assert scores["mean_dice"] == pytest.approx(sum(expected_dice) / 3)
    assert scores["mean_iou"] == pytest.approx(sum(expected_iou) / 3)
    assert scores["fg_dice"] == pytest.approx((4 / 6 + 4 / 5) / 2)
    assert scores["fg_iou"] == pytest.approx((2 / 4 + 2 / 3) / 2)


def test_absent_class_is_nan_and_excluded_from_means():
    pred = torch.tensor([0, 0, 1, 1])
    target = torch.tensor([0, 1, 1, 1])
    scores = dice_iou(confusion_matrix(pred, target, 3))
    assert math.isnan(scores["dice"][2]) and math.isnan(scores["iou"][2])
    assert scores["mean_dice"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert scores["fg_dice"] == pytest.approx(4 / 5)


def test_all_absent_foreground_gives_nan_fg_mean():
    pred = torch.zeros(5, dtype=torch.long)
    scores = dice_iou(confusion_matrix(pred, pred, 2))
    assert scores["dice"][0] == 1.0
    assert math.isnan(scores["fg_dice"]) and math.isnan(scores["fg_iou"])
    assert scores["mean_dice"] == 1.0


def test_confusion_from_logits_crops_target():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 6, generator=generator)
    target = torch.randint(0, 3, (2, 9, 8), generator=generator)
    expected = confusion_matrix(logits.argmax(dim=1), center_crop(target, (5, 6)), 3)
    confusion = confusion_from_logits(logits, target, 3)
    assert torch.equal(confusion, expected)
    assert int(confusion.sum()) == 2 * 5 * 6


def test_confusion_from_logits_smaller_target_raises():
    with pytest.raises(ValueError, match="expected"):
        confusion_from_logits(torch.zeros(1, 2, 5, 5), torch.zeros(1, 4, 5, dtype=torch.long), 2)


def test_confusion_matrix_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        confusion_matrix(torch.tensor([0, 2]), torch.tensor([0, 1]), 2)


def test_confusion_matrices_add_like_an_all_reduce():
    pred, target = _tiny_example()
    whole = confusion_matrix(pred, target, 3)
    parts = confusion_matrix(pred[0], target[0], 3) + confusion_matrix(pred[1], target[1], 3)
    assert torch.equal(whole, parts)


def test_metric_dict_names():
    pred, target = _tiny_example()
    metrics = metric_dict(confusion_matrix(pred, target, 3))
    expected_names = {f"val/{kind}_class{c}" for kind in ("dice", "iou") for c in range(3)}
    expected_names |= {"val/mean_dice", "val/mean_iou", "val/fg_dice", "val/fg_iou"}
    assert set(metrics) == expected_names
    assert metrics["val/dice_class1"] == pytest.approx(4 / 6)
    assert metrics["val/iou_class0"] == pytest.approx(1 / 4)
    assert all(isinstance(value, float) for value in metrics.values())
    assert set(metric_dict(confusion_matrix(pred, target, 3), prefix="train/")) == {
        name.replace("val/", "train/") for name in expected_names
    }
