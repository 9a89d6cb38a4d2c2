"""Tuning the decoding: the grid, exact counts that add up over images, the planted best point found."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from unetdist.data.synthetic import synthetic_cells
from unetdist.decoding import best_params, decoding_grid, tuning_counts
from unetdist.instance_metrics import match_counts
from unetdist.instance_targets import BOUNDARY, INTERIOR, boundary_classes
from unetdist.instances import DecodeParams, decode_instances


def _squares(image: np.ndarray, truth: np.ndarray, side: int, count: int, value, rng) -> None:
    """Paints ``count`` side x side squares of class probabilities ``value`` on background, apart
    from the cells and from each other."""
    free = ndimage.binary_dilation(truth > 0, iterations=3)
    painted = 0
    for _ in range(10_000):
        if painted == count:
            return
        row, col = rng.integers(2, truth.shape[0] - side - 2, size=2)
        window = (slice(row - 2, row + side + 2), slice(col - 2, col + side + 2))
        if free[window].any():
            continue
        image[:, row : row + side, col : col + side] = np.asarray(value, np.float32)[:, None, None]
        free[window] = True
        painted += 1
    raise AssertionError(f"no room for {count} squares of {side} px")


def _planted_boundary_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities whose best decoding is threshold 0.6, seed threshold 0.6, min size 12 (median 120):

    - interiors P(interior) 0.65, and the rims where two cells touch 0.55: seeds at 0.5 run into
      each other across the seam, at 0.7 there are none (each blob of touching cells is one object);
    - 7x7 blobs of P(foreground) 0.55 on the background: objects at thresholds below 0.6 (0.7 ties);
    - 3x3 confident specks (9 px): objects unless min_size > 9 (12 is the first such size).
    """
    rng = np.random.default_rng(seed)
    truth = synthetic_cells(128, rng)[1]
    classes = boundary_classes(truth, 2)
    probabilities = np.zeros((3, *truth.shape), np.float32)
    probabilities[:, classes == 0] = np.array([0.9, 0.05, 0.05])[:, None]
    probabilities[:, classes == INTERIOR] = np.array([0.05, 0.65, 0.30])[:, None]
    probabilities[:, classes == BOUNDARY] = np.array([0.1, 0.1, 0.8])[:, None]
    labels = truth.astype(np.int64)
    near = ndimage.iterate_structure(ndimage.generate_binary_structure(2, 1), 2)
    larger_near = ndimage.grey_dilation(labels, footprint=near) > labels
    background_high = np.where(labels == 0, labels.max() + 1, labels)
    smaller_near = ndimage.grey_erosion(background_high, footprint=near) < labels
    seam = (classes == BOUNDARY) & (larger_near | smaller_near)  # rims that face another cell
    probabilities[:, seam] = np.array([0.05, 0.55, 0.40])[:, None]
    _squares(probabilities, truth, 7, 2, [0.45, 0.0, 0.55], rng)
    _squares(probabilities, truth, 3, 3, [0.05, 0.9, 0.05], rng)
    return probabilities, truth


@pytest.fixture(scope="module")
def planted() -> tuple[list[np.ndarray], list[np.ndarray]]:
    cases = [_planted_boundary_case(seed) for seed in (0, 1)]
    return [p for p, _ in cases], [t for _, t in cases]


def test_grid_sizes_and_scaling() -> None:
    boundary = decoding_grid("boundary")
    assert len(boundary) == 100 and len(set(boundary)) == 100
    assert {p.target for p in boundary} == {"boundary"}
    assert sorted({p.min_size for p in boundary}) == [6, 12, 24, 36]  # the default 12 is in it
    assert boundary[0] == DecodeParams("boundary", threshold=0.5, seed_threshold=0.7, min_size=12)
    semantic = decoding_grid("semantic", median_area_px=400.0)
    assert len(semantic) == 60 and {p.target for p in semantic} == {"semantic"}
    assert sorted({p.min_size for p in semantic}) == [20, 40, 80, 120]
    assert sorted({p.min_distance for p in semantic}) == [3, 5, 7]  # of a 22.6 px diameter
    tiny = decoding_grid("boundary", median_area_px=8)
    assert sorted({p.min_size for p in tiny}) == [1, 2] and len(tiny) == 50  # duplicates merged
    with pytest.raises(ValueError, match="target='instance'"):
        decoding_grid("instance")
    with pytest.raises(ValueError, match="median_area_px=0"):
        decoding_grid("boundary", median_area_px=0)


def test_tuning_counts_are_exact_and_add_up_over_images(planted) -> None:
    probabilities, truths = planted
    grid = decoding_grid("boundary")
    counts = tuning_counts(probabilities, truths, grid)
    assert counts.dtype == np.int64 and counts.shape == (100, 3)
    halves = sum(tuning_counts(probabilities[part], truths[part], grid) for part in (slice(1), slice(1, 2)))
    assert np.array_equal(halves, counts)  # what the ranks' all-reduce relies on
    for index in range(0, len(grid), 7):  # the shared decoding gives what decoding each point gives
        expected = sum(
            match_counts(truth, decode_instances(image, grid[index]), (0.5,))[0]
            for image, truth in zip(probabilities, truths, strict=True)
        )
        assert counts[index].tolist() == expected.tolist(), grid[index]
    assert tuning_counts([], [], grid).tolist() == [[0, 0, 0]] * 100


def test_best_params_finds_the_planted_decoding(planted) -> None:
    probabilities, truths = planted
    grid = decoding_grid("boundary")
    params, ap = best_params(grid, tuning_counts(probabilities, truths, grid))
    assert (params.threshold, params.seed_threshold, params.min_size) == (0.6, 0.6, 12)
    assert 0.98 < ap < 1.0  # 66 of 67 cells: a 16 px one has too small an interior for a seed at min size 12
    default = [DecodeParams("boundary")]
    default_ap = best_params(default, tuning_counts(probabilities, truths, default))[1]
    assert default_ap < 0.6  # the seams merge most touching cells at seed threshold 0.5


def test_semantic_tuning_finds_threshold_and_min_size() -> None:
    rng = np.random.default_rng(4)
    rows, cols = np.mgrid[:96, :96]
    truth = np.zeros((96, 96), np.uint16)
    for label, (row, col) in enumerate([(20, 20), (20, 70), (70, 25), (72, 72)], start=1):
        truth[(rows - row) ** 2 + (cols - col) ** 2 <= 64] = label
    probabilities = np.where(truth > 0, 0.9, 0.1).astype(np.float32)[None].repeat(2, axis=0)
    probabilities[0] = 1 - probabilities[1]
    _squares(probabilities, truth, 6, 2, [0.35, 0.65], rng)  # P(foreground) 0.65: gone at threshold 0.7
    _squares(probabilities, truth, 2, 3, [0.05, 0.95], rng)  # 4 px specks: gone at min size 6
    grid = decoding_grid("semantic")
    params, ap = best_params(grid, tuning_counts([probabilities], [truth], grid))
    assert (params.threshold, params.min_size, ap) == (0.7, 12, 1.0)


def test_best_params_ties_go_to_the_first_and_shapes_are_checked() -> None:
    grid = [DecodeParams(threshold=t) for t in (0.5, 0.4, 0.6)]
    counts = np.array([[1, 1, 0], [2, 0, 0], [4, 0, 0]])
    assert best_params(grid, counts) == (grid[1], 1.0)
    assert best_params(grid, np.array([[1, 1, 0], [1, 0, 1], [1, 1, 0]])) == (grid[0], 0.5)
    with pytest.raises(ValueError, match=r"expected counts \[3, 3\]"):
        best_params(grid, counts[:2])
    with pytest.raises(ValueError, match="2 probability maps but 1 truth"):
        tuning_counts([np.zeros((2, 4, 4), np.float32)] * 2, [np.zeros((4, 4), int)], grid)
    with pytest.raises(ValueError, match="image 0: probabilities"):
        tuning_counts([np.zeros((2, 4, 4), np.float32)], [np.zeros((4, 5), int)], grid)
