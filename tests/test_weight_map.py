"""Tests for unetdist.weight_map: the border weight map against a brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest

from unetdist.weight_map import (
    border_weight_map,
    border_weight_map_reference,
    class_balance_weights,
    sequential_ids,
)


def _disc(shape: tuple[int, int], center: tuple[float, float], radius: float) -> np.ndarray:
    rows, cols = np.indices(shape)
    return (rows - center[0]) ** 2 + (cols - center[1]) ** 2 <= radius**2


def _two_discs_with_gap() -> np.ndarray:
    """Two radius-30 discs on row 80 whose facing edges leave columns 100 and 101 empty.

    The cells cover ~18% of the image, so the foreground class weight (~4.7) stays
    below the border peak (1 + 10 * exp(-9 / 50) ~ 9.4); with much sparser cells the
    class term alone would be the maximum.
    """
    instances = np.zeros((160, 200), dtype=np.int32)
    instances[_disc(instances.shape, (80, 69), 30)] = 1  # columns 39..99
    instances[_disc(instances.shape, (80, 132), 30)] = 2  # columns 102..162
    return instances


def _few_cells(shape: tuple[int, int] = (48, 48)) -> np.ndarray:
    instances = np.zeros(shape, dtype=np.int64)
    instances[_disc(shape, (10, 12), 6)] = 1
    instances[_disc(shape, (14, 30), 5)] = 3  # ids with a gap are allowed
    instances[30:38, 8:20] = 4
    instances[_disc(shape, (36, 36), 7)] = 5
    return instances


# --- class balancing -------------------------------------------------------------------


def test_class_balance_weights_are_one_for_most_frequent_class():
    mask = np.array([[0, 0, 0, 1]])
    np.testing.assert_allclose(class_balance_weights(mask, 3), [1.0, 3.0, 1.0])


def test_class_balance_weights_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        class_balance_weights(np.array([[0, 2]]), 2)


# --- border weight map -----------------------------------------------------------------


def test_weight_map_peaks_in_gap_between_cells():
    instances = _two_discs_with_gap()
    weight = border_weight_map(instances)
    assert weight.dtype == np.float32 and weight.shape == instances.shape
    row, col = np.unravel_index(np.argmax(weight), weight.shape)
    assert instances[row, col] == 0
    assert col in (100, 101)
    assert 75 <= row <= 85


def test_weight_map_far_from_cells_equals_background_class_weight():
    instances = _two_discs_with_gap()
    weight = border_weight_map(instances)
    background_weight = class_balance_weights((instances > 0).astype(np.int64), 2)[0]
    # Corners are > 40 px from both discs.
    for corner in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
        assert abs(weight[corner] - background_weight) < 1e-6


def test_weight_map_on_cells_is_class_weight_only():
    instances = _two_discs_with_gap()
    weight = border_weight_map(instances)
    foreground_weight = class_balance_weights((instances > 0).astype(np.int64), 2)[1]
    np.testing.assert_allclose(weight[instances > 0], foreground_weight, rtol=1e-6)


@pytest.mark.parametrize("sigma", [5.0, 2.0, 1.0])
def test_weight_map_matches_reference(sigma):
    instances = _few_cells()
    fast = border_weight_map(instances, sigma=sigma)
    slow = border_weight_map_reference(instances, sigma=sigma)
    assert np.abs(fast - slow).max() < 1e-4


def test_weight_map_matches_reference_with_many_cells_and_small_windows():
    # Windows (margin ~ 5.3 sigma) are much smaller than the image here, so the
    # truncation argument is exercised, not just the EDT.
    rng = np.random.default_rng(0)
    instances = np.zeros((80, 96), dtype=np.int32)
    for label in range(1, 13):
        top, left = rng.integers(0, 74), rng.integers(0, 90)
        instances[top : top + rng.integers(2, 7), left : left + rng.integers(2, 7)] = label
    fast = border_weight_map(instances, w0=10.0, sigma=1.5)
    slow = border_weight_map_reference(instances, w0=10.0, sigma=1.5)
    assert np.abs(fast - slow).max() < 1e-4


def test_weight_map_single_cell_has_no_border_term():
    instances = np.zeros((40, 40), dtype=np.int32)
    instances[10:20, 10:20] = 7
    weight = border_weight_map(instances)
    expected = class_balance_weights((instances > 0).astype(np.int64), 2)[(instances > 0).astype(int)]
    np.testing.assert_allclose(weight, expected, rtol=1e-6)


def test_weight_map_class_weights_override():
    instances = _few_cells()
    weight = border_weight_map(instances, w0=0.0, class_weights=np.array([0.5, 3.0]))
    np.testing.assert_allclose(weight, np.where(instances > 0, 3.0, 0.5))
    with_border = border_weight_map(instances, class_weights=np.array([0.5, 3.0]))
    reference = border_weight_map_reference(instances, class_weights=np.array([0.5, 3.0]))
    assert np.abs(with_border - reference).max() < 1e-4


def test_weight_map_custom_class_mask():
    instances = _few_cells()
    class_mask = np.where(instances == 4, 2, (instances > 0).astype(np.int64))
    weight = border_weight_map(instances, w0=0.0, class_mask=class_mask)
    expected = class_balance_weights(class_mask, 3)[class_mask]
    np.testing.assert_allclose(weight, expected, rtol=1e-6)


def test_weight_map_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        border_weight_map(np.zeros((2, 4, 4), dtype=np.int32))
    with pytest.raises(ValueError, match="integer"):
        border_weight_map(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="sigma"):
        border_weight_map(np.zeros((4, 4), dtype=np.int32), sigma=0.0)
    with pytest.raises(ValueError, match="class_weights"):
        border_weight_map(_few_cells(), class_weights=np.array([1.0]))


@pytest.mark.parametrize("background", [True, False])
def test_huge_ids_are_renumbered_in_order(background: bool):
    """Ids near 2**32 (some tools write them) would size find_objects' list by the largest id."""
    instances = _few_cells() if background else _few_cells() + 1  # without background: every pixel a cell
    huge = (instances.astype(np.uint64) * 1_000_000_007 + 4_000_000_000 * (instances > 0)).astype(np.uint64)
    renumbered = sequential_ids(huge)
    expected = np.unique(instances, return_inverse=True)[1].reshape(instances.shape)
    expected += 0 if background else 1
    np.testing.assert_array_equal(renumbered, expected)
    np.testing.assert_array_equal(border_weight_map(huge), border_weight_map(instances))
    assert sequential_ids(instances) is instances  # ordinary ids: no copy, no sort
