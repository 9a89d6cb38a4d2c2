"""Instance scores: predicted and true objects matched one-to-one by IoU, and AP from the counts.

    counts = match_counts(truth, pred)                    # int64 [T, 3]: (tp, fp, fn) per IoU threshold
    ap = average_precision(counts)                        # [T]: tp / (tp + fp + fn)
    dict(zip(ap_names(TRAIN_IOU_THRESHOLDS), ap))         # {"ap50": ..., "ap75": ..., "ap90": ...}

The matching is StarDist's (``stardist.matching``): the most pairs with IoU >= t, each object in
at most one pair (an optimal assignment, not a greedy one). AP is the DSB2018 / StarDist
"accuracy" tp / (tp + fp + fn), not the area under a precision-recall curve. Counts add up over
images, tiles and ranks, so a data set's AP is the AP of its summed counts.

The overlaps come from one histogram of the (truth, prediction) id pairs of all pixels, so an
image with thousands of objects costs about as much as one with ten. Nothing depends on the number
of axes: volumes (ZxYxX ids, overlaps in voxels) are matched the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

TRAIN_IOU_THRESHOLDS = (0.5, 0.75, 0.9)
# COCO's 0.5:0.05:0.95, written out so that 0.55 is the float 0.55 (an IoU of exactly 11/20 matches).
COCO_IOU_THRESHOLDS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def ap_names(iou_thresholds: Sequence[float]) -> list[str]:
    """Metric names of the thresholds: (0.5, 0.75, 0.9) -> ["ap50", "ap75", "ap90"]."""
    names = []
    for threshold in iou_thresholds:
        percent = 100 * float(threshold)
        names.append(f"ap{round(percent):02d}" if abs(percent - round(percent)) < 1e-6 else f"ap{percent:g}")
    return names


def average_precision(counts: np.ndarray) -> np.ndarray:
    """tp / (tp + fp + fn) of counts [..., 3]; 1.0 where there is nothing (no object, none predicted)."""
    counts = np.asarray(counts)
    if counts.shape[-1:] != (3,):
        raise ValueError(f"expected counts [..., 3] (tp, fp, fn), got shape {counts.shape}")
    tp = counts[..., 0].astype(np.float64)
    total = counts.sum(axis=-1).astype(np.float64)
    return np.divide(tp, total, out=np.ones_like(tp), where=total > 0)


def match_counts(
    truth: np.ndarray, pred: np.ndarray, iou_thresholds: Sequence[float] = TRAIN_IOU_THRESHOLDS
) -> np.ndarray:
    """int64 [T, 3]: (tp, fp, fn) of the one-to-one matching at each IoU threshold (a match needs IoU >= t).

    ``truth`` and ``pred`` are instance ids of the same shape, 0 background; the ids need not be
    consecutive.
    """
    truth, pred = np.asarray(truth), np.asarray(pred)
    if truth.shape != pred.shape:
        raise ValueError(f"truth shape {truth.shape} != prediction shape {pred.shape}")
    thresholds = np.asarray(iou_thresholds, dtype=np.float64).reshape(-1)
    if thresholds.size == 0 or not np.all((thresholds > 0) & (thresholds <= 1)):
        raise ValueError(f"IoU thresholds must be in (0, 1], got {list(iou_thresholds)}")
    truth_index, truth_areas = _compact(truth, "truth")
    pred_index, pred_areas = _compact(pred, "prediction")
    num_truth, num_pred = len(truth_areas), len(pred_areas)
    counts = np.zeros((thresholds.size, 3), dtype=np.int64)
    if num_truth == 0 or num_pred == 0:
        counts[:, 1], counts[:, 2] = num_pred, num_truth
        return counts
    truth_of, pred_of, iou = _overlaps(truth_index, pred_index, truth_areas, pred_areas)
    for row, threshold in enumerate(thresholds):
        tp = _most_matches(truth_of, pred_of, iou, threshold)
        counts[row] = (tp, num_pred - tp, num_truth - tp)
    return counts


def _compact(labels: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Flat ids renumbered 0 (background), 1..n (objects present), and the n object areas."""
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise ValueError(f"{what}: expected integer instance ids, got {labels.dtype}")
    flat = labels.reshape(-1)
    if flat.size == 0:
        return flat.astype(np.int64), np.zeros(0, dtype=np.int64)
    lowest, highest = int(flat.min()), int(flat.max())
    if lowest < 0:
        raise ValueError(f"{what}: instance ids must be >= 0, found {lowest}")
    if highest <= 4 * flat.size + 1024:  # a lookup table no larger than a few copies of the image
        flat = flat.astype(np.intp, copy=False)
        areas = np.bincount(flat)
        present = areas > 0
        present[0] = False
        new_ids = np.zeros(areas.size, dtype=np.int64)
        new_ids[present] = np.arange(1, int(present.sum()) + 1)
        return new_ids[flat], areas[present]
    ids, index = np.unique(flat, return_inverse=True)
    areas = np.bincount(index)
    if ids[0] == 0:
        return index.astype(np.int64), areas[1:]
    return index.astype(np.int64) + 1, areas


def _overlaps(
    truth_index: np.ndarray, pred_index: np.ndarray, truth_areas: np.ndarray, pred_areas: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The overlapping (truth, prediction) pairs, 0-based, and their IoU."""
    num_pred = len(pred_areas)
    both = (truth_index > 0) & (pred_index > 0)
    keys = (truth_index[both] - 1) * num_pred + (pred_index[both] - 1)
    if len(truth_areas) * num_pred <= 4 * truth_index.size + 4096:
        histogram = np.bincount(keys, minlength=len(truth_areas) * num_pred)
        pairs = np.flatnonzero(histogram)
        intersections = histogram[pairs]
    else:  # many objects: the sparse histogram
        pairs, intersections = np.unique(keys, return_counts=True)
    truth_of, pred_of = np.divmod(pairs, num_pred)
    # inter / union as one correctly rounded division: an IoU of exactly 3/4 equals the float 0.75
    iou = intersections / (truth_areas[truth_of] + pred_areas[pred_of] - intersections)
    return truth_of, pred_of, iou


def _most_matches(truth_of: np.ndarray, pred_of: np.ndarray, iou: np.ndarray, threshold: float) -> int:
    """The size of the largest one-to-one matching among the pairs with IoU >= ``threshold``.

    Above 0.5 an object overlaps at most one partner that much, so every candidate pair is a
    match; only where an object has several candidates (IoU exactly 0.5, or thresholds below
    it) does an assignment problem remain, solved on just those objects.
    """
    candidate = iou >= threshold
    truth_of, pred_of, iou = truth_of[candidate], pred_of[candidate], iou[candidate]
    if truth_of.size == 0:
        return 0
    truth_degree = np.bincount(truth_of)[truth_of]
    pred_degree = np.bincount(pred_of)[pred_of]
    alone = (truth_degree == 1) & (pred_degree == 1)
    matches = int(alone.sum())
    if alone.all():
        return matches
    truth_ids, rows = np.unique(truth_of[~alone], return_inverse=True)
    pred_ids, cols = np.unique(pred_of[~alone], return_inverse=True)
    # StarDist's cost: a match is worth 1, the IoU only breaks ties between equally large matchings
    cost = np.zeros((truth_ids.size, pred_ids.size))
    cost[rows, cols] = -1.0 - iou[~alone] / (2 * max(truth_ids.size, pred_ids.size))
    chosen_rows, chosen_cols = linear_sum_assignment(cost)
    return matches + int(np.count_nonzero(cost[chosen_rows, chosen_cols] < 0))
