"""Per-sample numpy transforms for the loader: crops, joint flips/rotations, normalisation.

All functions are pure: randomness comes in through an explicit ``numpy.random.Generator``
so a worker seeded from (seed, epoch, rank, worker) produces the same tiles every run.
Arrays follow the shard layout: image [C, H, W], mask [H, W], weight [H, W] or None.
"""

from __future__ import annotations

import numpy as np

NORMALISATION_EPSILON = 1e-6

Tile = tuple[np.ndarray, np.ndarray, "np.ndarray | None"]


def _crop(
    image: np.ndarray, mask: np.ndarray, weight: np.ndarray | None, top: int, left: int, size: int
) -> Tile:
    window = (slice(top, top + size), slice(left, left + size))
    cropped_weight = None if weight is None else weight[window]
    return image[(slice(None), *window)], mask[window], cropped_weight


def random_crop(
    image: np.ndarray, mask: np.ndarray, weight: np.ndarray | None, size: int, rng: np.random.Generator
) -> Tile:
    """The same random ``size`` x ``size`` window of image, mask and weight.

    The caller checks the tile is at least ``size`` on both sides (it knows the shard/key).
    """
    height, width = mask.shape
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    return _crop(image, mask, weight, top, left, size)


def center_crop(image: np.ndarray, mask: np.ndarray, weight: np.ndarray | None, size: int) -> Tile:
    """The central ``size`` x ``size`` window (rounding towards the top-left like geometry.center_crop)."""
    height, width = mask.shape
    return _crop(image, mask, weight, (height - size) // 2, (width - size) // 2, size)


def random_flip_rot90(
    image: np.ndarray, mask: np.ndarray, weight: np.ndarray | None, rng: np.random.Generator
) -> Tile:
    """One of the 8 symmetries of the square, applied identically to image, mask and weight.

    Valid for microscopy, which has no preferred orientation. Square tiles keep their shape.
    """
    quarter_turns = int(rng.integers(0, 4))
    flip = bool(rng.integers(0, 2))

    def apply(array: np.ndarray) -> np.ndarray:
        array = np.rot90(array, k=quarter_turns, axes=(-2, -1))
        return array[..., ::-1] if flip else array

    return apply(image), apply(mask), None if weight is None else apply(weight)


def zscore_per_channel(image: np.ndarray) -> np.ndarray:
    """float32 ``(x - mean) / (std + eps)`` per channel of one [C, H, W] sample.

    Per sample rather than data-set statistics so that tiles from differently exposed
    images look alike to the network; the epsilon keeps flat (e.g. empty) tiles finite.
    """
    values = image.astype(np.float32)
    mean = values.mean(axis=(-2, -1), keepdims=True)
    std = values.std(axis=(-2, -1), keepdims=True)
    return (values - mean) / (std + NORMALISATION_EPSILON)
