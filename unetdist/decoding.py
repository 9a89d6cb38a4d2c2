"""Tuning the instance decoding on validation: a small grid of :class:`DecodeParams`, scored by AP.

At the end of training each rank decodes its own validation tiles with every grid point and counts
the matches; the counts add up exactly, so the ranks all-reduce them and every rank picks the same
best point::

    grid = decoding_grid("boundary", median_area_px=plan_median_area)    # ~100 points
    grid = decoding_grid("boundary", spatial_dims=3)                     # volumes: min sizes in voxels
    counts = tuning_counts(probabilities, truths, grid)                  # int64 [G, 3] on this rank
    counts = all_reduce_sum(counts)                                      # (the trainer's)
    params, ap = best_params(grid, counts)                               # saved with the model

The grid lists each parameter's values from the middle outwards and ties go to the first grid
point, so where AP@0.5 cannot tell two points apart the moderate one wins (an extreme threshold
that merely does not lose an object at IoU 0.5 often misplaces its outline at stricter IoU).
Decoding is done once per (threshold, seed threshold or peak spacing) and the min-size variants
are cut from that result (:func:`unetdist.instances.decode_min_size_variants`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from unetdist.instance_metrics import average_precision, match_counts
from unetdist.instances import TARGETS, DecodeParams, decode_min_size_variants

# P(foreground) thresholds; boundary target: also the P(interior) thresholds of the seeds, which
# go higher (a confident interior keeps touching nuclei apart).
THRESHOLDS = (0.5, 0.4, 0.6, 0.3, 0.7)
SEED_THRESHOLDS = (0.7, 0.6, 0.8, 0.5, 0.9)
# Min sizes as fractions of the median object area: the default 12 px is 0.1 of an area of 120 px
# (a nucleus ~12 px across), the median assumed when the data's is not known.
MIN_SIZE_FRACTIONS = (0.1, 0.05, 0.2, 0.3)
DEFAULT_MEDIAN_AREA_PX = 120.0
# Volumes: the same nucleus as a ball, ~12 voxels across, holds ~1000 voxels (pi/6 d^3), so the
# fractions give min sizes of 100, 50, 200 and 300 voxels (100: instances.DEFAULT_MIN_SIZE_3D).
DEFAULT_MEDIAN_VOLUME_VOX = 1000.0
# Semantic target: spacings of the distance peaks as fractions of the median diameter (the
# default 3 px was best for the synthetic cells, ~16 px across).
MIN_DISTANCE_FRACTIONS = (0.2, 0.13, 0.3)


def decoding_grid(
    target: str, median_area_px: float | None = None, *, spatial_dims: int = 2
) -> list[DecodeParams]:
    """The grid points to try for ``target`` ("semantic" or "boundary"), min sizes (and peak
    spacings) scaled to the median object area (px) when known. ``spatial_dims=3``: volumes;
    ``median_area_px`` is then the median object volume in voxels (default
    DEFAULT_MEDIAN_VOLUME_VOX) and the peak spacings follow the diameter of a ball that large.

    Boundary: 5 thresholds x 5 seed thresholds x 4 min sizes; semantic: 5 thresholds x 3 peak
    spacings x 4 min sizes (fewer where small objects round two fractions to the same pixels).
    """
    if target not in TARGETS:
        raise ValueError(f"decoding grid: target={target!r}, expected one of {', '.join(TARGETS)}")
    if spatial_dims not in (2, 3):
        raise ValueError(f"decoding grid: spatial_dims={spatial_dims!r}, expected 2 or 3")
    if median_area_px is None:
        median_area_px = DEFAULT_MEDIAN_AREA_PX if spatial_dims == 2 else DEFAULT_MEDIAN_VOLUME_VOX
    valid = isinstance(median_area_px, numbers.Real) and not isinstance(median_area_px, bool)
    if not (valid and math.isfinite(median_area_px) and median_area_px > 0):
        raise ValueError(
            f"decoding grid: median_area_px={median_area_px!r}, expected a positive area in pixels "
            "(volume in voxels)"
        )
    min_sizes = _distinct(max(1, round(fraction * median_area_px)) for fraction in MIN_SIZE_FRACTIONS)
    if target == "boundary":
        return [
            DecodeParams("boundary", threshold=threshold, seed_threshold=seed_threshold, min_size=min_size)
            for threshold in THRESHOLDS
            for seed_threshold in SEED_THRESHOLDS
            for min_size in min_sizes
        ]
    if spatial_dims == 2:
        diameter_px = 2.0 * math.sqrt(median_area_px / math.pi)
    else:
        diameter_px = (6.0 * median_area_px / math.pi) ** (1.0 / 3.0)
    min_distances = _distinct(max(1, round(fraction * diameter_px)) for fraction in MIN_DISTANCE_FRACTIONS)
    return [
        DecodeParams(target="semantic", threshold=threshold, min_distance=min_distance, min_size=min_size)
        for threshold in THRESHOLDS
        for min_distance in min_distances
        for min_size in min_sizes
    ]


def _distinct(values) -> list[int]:
    return list(dict.fromkeys(int(value) for value in values))


def tuning_counts(
    probabilities: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    grid: Sequence[DecodeParams],
    iou_threshold: float = 0.5,
) -> np.ndarray:
    """int64 [G, 3]: (tp, fp, fn) at ``iou_threshold`` of every grid point, summed over the images.

    ``probabilities``: [K, H, W] softmax outputs; ``truths``: their HxW instance ids (0 background);
    volumes: [K, Z, Y, X] and ZxYxX.
    """
    if len(probabilities) != len(truths):
        raise ValueError(f"tuning: {len(probabilities)} probability maps but {len(truths)} truth masks")
    counts = np.zeros((len(grid), 3), dtype=np.int64)
    # grid points that differ only in min_size share one decoding
    groups: dict[DecodeParams, list[int]] = {}
    for index, params in enumerate(grid):
        groups.setdefault(replace(params, min_size=0), []).append(index)
    for image_index, (image_probabilities, truth) in enumerate(zip(probabilities, truths, strict=True)):
        truth = np.asarray(truth)
        if np.shape(image_probabilities)[1:] != truth.shape:
            raise ValueError(
                f"tuning: image {image_index}: probabilities {np.shape(image_probabilities)} do not "
                f"match its truth mask {truth.shape} (expected [K, *spatial] and [*spatial])"
            )
        for shared, indices in groups.items():
            min_sizes = [grid[index].min_size for index in indices]
            variants = decode_min_size_variants(image_probabilities, shared, min_sizes)
            for index, instances in zip(indices, variants, strict=True):
                counts[index] += match_counts(truth, instances, (iou_threshold,))[0]
    return counts


def best_params(grid: Sequence[DecodeParams], counts: np.ndarray) -> tuple[DecodeParams, float]:
    """The grid point of the highest AP in ``counts`` ([G, 3], e.g. summed over ranks) and that AP;
    of equals, the first in grid order."""
    counts = np.asarray(counts)
    if len(grid) == 0 or counts.shape != (len(grid), 3):
        raise ValueError(
            f"best params: expected counts [{len(grid)}, 3] for {len(grid)} grid points, got {counts.shape}"
        )
    ap = average_precision(counts)
    best = int(np.argmax(ap))  # the first of equal maxima
    return grid[best], float(ap[best])
