"""Segmentation metrics from confusion counts: Dice and IoU per class.

Everything here is pure and local to one process. The trainer sums the integer
confusion matrices across ranks (an all-reduce of a [C, C] int64 tensor) before
calling :func:`dice_iou` / :func:`metric_dict`, so the numbers are exact for the
whole validation set rather than an average of per-rank ratios.

Usage::

    confusion = torch.zeros(C, C, dtype=torch.int64, device=device)
    for images, target in loader:
        confusion += confusion_from_logits(model(images), target, C)
    # trainer: all_reduce(confusion)
    tracker.log_metrics(metric_dict(confusion), step)
"""

from __future__ import annotations

import math

import torch

from unetdist.geometry import crop_to_logits


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = -1
) -> torch.Tensor:
    """Counts of (truth, prediction) pairs: int64 [C, C], rows = truth, columns = prediction.

    ``pred`` and ``target`` are integer class-id tensors of the same shape (any: 2-D or 3-D
    tiles, batched or not), on the same device; the result stays on that device. Pixels whose
    target is ``ignore_index`` (>= 0; -1: none) are counted nowhere.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    cells = num_classes * num_classes
    if ignore_index >= 0:
        kept = target != ignore_index
        target = torch.where(kept, target, 0)
    # An out-of-range id would silently land in another cell of the flattened matrix.
    out_of_range = (pred < 0) | (pred >= num_classes) | (target < 0) | (target >= num_classes)
    if bool(out_of_range.any()):
        raise ValueError(f"class ids must lie in [0, {num_classes}) in both pred and target")
    if ignore_index < 0:
        counts = torch.bincount(target * num_classes + pred, minlength=cells)
        return counts.reshape(num_classes, num_classes)
    # ignored pixels go to one extra bin that is dropped: no data-dependent shapes
    codes = torch.where(kept, target * num_classes + pred, cells)
    return torch.bincount(codes, minlength=cells + 1)[:cells].reshape(num_classes, num_classes)


def confusion_from_logits(
    logits: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = -1
) -> torch.Tensor:
    """Confusion matrix of ``argmax(logits, dim=1)`` against ``target`` (``ignore_index``: see
    :func:`confusion_matrix`).

    ``logits`` [N,C,*s]; ``target`` [N,*S], center-cropped when larger (valid-conv models).
    """
    if logits.shape[1] != num_classes:
        raise ValueError(f"logits have {logits.shape[1]} channels, expected num_classes={num_classes}")
    target = crop_to_logits(logits, target, "target")
    return confusion_matrix(logits.argmax(dim=1), target, num_classes, ignore_index)


def _nanmean(values: list[float]) -> float:
    finite = [value for value in values if not math.isnan(value)]
    return sum(finite) / len(finite) if finite else math.nan


def dice_iou(confusion: torch.Tensor) -> dict[str, list[float] | float]:
    """Per-class Dice and IoU from a [C, C] confusion matrix, with their means.

    Returns ``{"dice": [...], "iou": [...], "mean_dice", "mean_iou", "fg_dice", "fg_iou"}``
    where ``mean_*`` averages over all classes and ``fg_*`` over classes 1..C-1.
    A class absent from both truth and prediction has no defined score: it is NaN in
    the lists and left out of the means (a mean with no defined class is NaN).
    """
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must be a square [C, C] matrix, got shape {tuple(confusion.shape)}")
    counts = confusion.detach().to("cpu", torch.float64)
    true_positive = counts.diagonal()
    false_positive = counts.sum(dim=0) - true_positive
    false_negative = counts.sum(dim=1) - true_positive
    dice_denominator = 2 * true_positive + false_positive + false_negative
    iou_denominator = true_positive + false_positive + false_negative
    nan = torch.full_like(true_positive, math.nan)
    dice = torch.where(dice_denominator > 0, 2 * true_positive / dice_denominator, nan).tolist()
    iou = torch.where(iou_denominator > 0, true_positive / iou_denominator, nan).tolist()
    return {
        "dice": dice,
        "iou": iou,
        "mean_dice": _nanmean(dice),
        "mean_iou": _nanmean(iou),
        "fg_dice": _nanmean(dice[1:]),
        "fg_iou": _nanmean(iou[1:]),
    }


def metric_dict(confusion: torch.Tensor, prefix: str = "val/") -> dict[str, float]:
    """Flat metric names for logging, e.g. ``val/dice_class1``, ``val/iou_class0``, ``val/fg_dice``.

    NaN (absent class, see :func:`dice_iou`) is passed through; the tracker decides
    whether to log or skip it.
    """
    scores = dice_iou(confusion)
    flat: dict[str, float] = {}
    for name in ("dice", "iou"):
        for class_id, value in enumerate(scores[name]):
            flat[f"{prefix}{name}_class{class_id}"] = value
    for name in ("mean_dice", "mean_iou", "fg_dice", "fg_iou"):
        flat[f"{prefix}{name}"] = scores[name]
    return flat
