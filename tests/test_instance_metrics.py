"""Instance matching and AP: hand-made cases, the optimal (not greedy) matching, a brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from unetdist.instance_metrics import (
    COCO_IOU_THRESHOLDS,
    TRAIN_IOU_THRESHOLDS,
    ap_names,
    average_precision,
    match_counts,
)


def _image(*boxes: tuple[int, int, int, int], shape=(12, 24)) -> np.ndarray:
    """Ids 1, 2, ... painted as (top, bottom, left, right) boxes, later ones on top."""
    image = np.zeros(shape, np.uint16)
    for label, (top, bottom, left, right) in enumerate(boxes, start=1):
        image[top:bottom, left:right] = label
    return image


def test_names_and_thresholds() -> None:
    assert ap_names(TRAIN_IOU_THRESHOLDS) == ["ap50", "ap75", "ap90"]
    assert ap_names(COCO_IOU_THRESHOLDS) == [f"ap{p}" for p in range(50, 100, 5)]
    assert len(COCO_IOU_THRESHOLDS) == 10 and COCO_IOU_THRESHOLDS[1] == 0.55


def test_identical_images_match_whatever_the_ids() -> None:
    truth = _image((0, 4, 0, 4), (5, 9, 5, 12), (0, 3, 14, 20))
    pred = np.choose(truth, [0, 70000, 3, 2**31]).astype(np.int64)  # other, huge, non-consecutive ids
    counts = match_counts(truth, pred, COCO_IOU_THRESHOLDS)
    assert counts.dtype == np.int64 and counts.shape == (10, 3)
    assert (counts == [3, 0, 0]).all()
    assert (average_precision(counts) == 1.0).all()


def test_split_merged_and_missed_objects() -> None:
    truth = _image((0, 4, 0, 8), (6, 10, 0, 4), (6, 10, 4, 8), (0, 4, 12, 16))
    # object 1 split in two halves (IoU 0.5 each), objects 2 and 3 merged into one (IoU 0.5 each),
    # object 4 missed; a spurious object far away
    pred = _image((0, 4, 0, 4), (0, 4, 4, 8), (6, 10, 0, 8), (8, 10, 20, 24))
    at_half, at_075 = match_counts(truth, pred, (0.5, 0.75))
    # IoU exactly 0.5 matches; each object in at most one pair: one half, one of the merged pair
    assert at_half.tolist() == [2, 4 - 2, 4 - 2]
    assert at_075.tolist() == [0, 4, 4]


def test_empty_images_both_ways() -> None:
    empty = np.zeros((8, 8), np.uint16)
    cells = _image((0, 3, 0, 3), (4, 8, 4, 8), shape=(8, 8))
    assert match_counts(empty, empty).tolist() == [[0, 0, 0]] * 3
    assert average_precision(match_counts(empty, empty)).tolist() == [1.0] * 3  # nothing, none predicted
    assert match_counts(empty, cells, (0.5,)).tolist() == [[0, 2, 0]]
    assert match_counts(cells, empty, (0.5,)).tolist() == [[0, 0, 2]]
    assert average_precision(match_counts(cells, empty, (0.5,))).tolist() == [0.0]


def test_iou_exactly_at_a_threshold_matches() -> None:
    truth = _image((0, 4, 0, 5), (0, 4, 10, 14), shape=(4, 16))  # 20 px and 16 px
    pred = _image((0, 4, 0, 3), (0, 3, 10, 14), shape=(4, 16))  # 12 px inside (IoU 0.6), 12 of 16 (0.75)
    counts = match_counts(truth, pred, COCO_IOU_THRESHOLDS)
    tp = dict(zip(COCO_IOU_THRESHOLDS, counts[:, 0].tolist(), strict=True))
    assert tp[0.6] == 2 and tp[0.65] == 1 and tp[0.75] == 1 and tp[0.8] == 0
    truth = _image((0, 4, 0, 5), shape=(4, 8))
    pred = _image((0, 1, 0, 5), (1, 2, 0, 5), (2, 3, 0, 1), shape=(4, 8))  # pred 1 + 2 + 3: 11 of 20 px
    pred[pred > 1] = 1
    assert match_counts(truth, pred, (0.55, 0.6)).tolist() == [[1, 0, 0], [0, 1, 1]]  # 11/20 == 0.55


def test_matching_is_optimal_not_greedy() -> None:
    # Along one row: truth A = [0, 10), B = [10, 20); prediction Q = [0, 3), P = [3, 15).
    # IoU(A, P) = 7/15 is the largest, but taking it leaves both Q and B unmatched; the optimal
    # matching pairs A-Q (0.3) and B-P (5/17 = 0.294).
    truth = np.zeros((2, 20), np.uint16)
    truth[:, :10], truth[:, 10:] = 1, 2
    pred = np.zeros_like(truth)
    pred[:, :3], pred[:, 3:15] = 1, 2
    assert match_counts(truth, pred, (0.29,)).tolist() == [[2, 0, 0]]
    assert match_counts(truth, pred, (0.295,)).tolist() == [[1, 1, 1]]


def _reference_counts(truth: np.ndarray, pred: np.ndarray, threshold: float) -> tuple[int, int, int]:
    """StarDist's matching written plainly: dense IoU matrix, one assignment."""
    truth_ids = [i for i in np.unique(truth) if i]
    pred_ids = [i for i in np.unique(pred) if i]
    iou = np.zeros((len(truth_ids), len(pred_ids)))
    for row, t in enumerate(truth_ids):
        for col, p in enumerate(pred_ids):
            a, b = truth == t, pred == p
            iou[row, col] = (a & b).sum() / (a | b).sum()
    tp = 0
    if iou.size:
        cost = -(iou >= threshold).astype(float) - iou / (2 * max(iou.shape))
        rows, cols = linear_sum_assignment(cost)
        tp = int((iou[rows, cols] >= threshold).sum())
    return tp, len(pred_ids) - tp, len(truth_ids) - tp


def test_agrees_with_a_brute_force_reference_on_random_labels() -> None:
    rng = np.random.default_rng(3)
    thresholds = (0.1, 0.25, 0.4, 0.5, 0.6, 0.9)
    for _ in range(40):
        truth = np.kron(rng.integers(0, 5, size=(4, 4)), np.ones((3, 3), int))  # blocky random objects
        pred = truth.copy()
        noise = rng.random(truth.shape) < 0.3
        pred[noise] = rng.integers(0, 6, size=int(noise.sum()))
        expected = [_reference_counts(truth, pred, t) for t in thresholds]
        assert match_counts(truth, pred, thresholds).tolist() == [list(row) for row in expected]


def test_counts_of_many_objects_are_exact() -> None:
    # 4,096 objects of 3x4 px, all moved down a pixel: IoU 8/16 each (too many for a dense histogram)
    truth = np.zeros((256, 256), np.uint32)
    rows, cols = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    ids = (rows * 64 + cols + 1).astype(np.uint32)
    truth[:] = np.kron(ids, np.ones((4, 4), np.uint32))
    truth[3::4, :] = 0  # 3x4 objects with a gap row
    pred = np.roll(truth, 1, axis=0)
    counts = match_counts(truth, pred, (0.5, 0.51))
    assert counts.tolist() == [[4096, 0, 0], [0, 4096, 4096]]


def test_average_precision_of_any_leading_shape() -> None:
    counts = np.array([[[2, 1, 1], [0, 0, 0]], [[0, 3, 0], [5, 0, 0]]])
    assert average_precision(counts).tolist() == [[0.5, 1.0], [0.0, 1.0]]
    with pytest.raises(ValueError, match=r"\[\.\.\., 3\]"):
        average_precision(np.zeros((3, 2)))


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="shape"):
        match_counts(np.zeros((4, 4), int), np.zeros((4, 5), int))
    with pytest.raises(ValueError, match="prediction: expected integer"):
        match_counts(np.zeros((4, 4), int), np.zeros((4, 4), float))
    with pytest.raises(ValueError, match="truth: instance ids must be >= 0"):
        match_counts(-np.ones((4, 4), int), np.zeros((4, 4), int))
    with pytest.raises(ValueError, match="IoU thresholds"):
        match_counts(np.zeros((4, 4), int), np.zeros((4, 4), int), (0.0,))
