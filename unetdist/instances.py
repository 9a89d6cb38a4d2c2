"""Instance ids (one per object) from a segmentation model's output.

Two inputs, one output (HxW ids: 0 background, 1..N consecutive, uint16, uint32 when N does not fit;
a volume's ZxYxX ids the same way, see "Volumes" below):

- the model's class probabilities [K, H, W], decoded with :class:`DecodeParams`
  (the thresholds are tuned on validation by :mod:`unetdist.decoding`)::

      instances = decode_instances(probabilities, DecodeParams(target="boundary", seed_threshold=0.6))

  ``target="boundary"`` (classes background / interior / boundary, see
  :mod:`unetdist.instance_targets`): the interiors, which the model keeps apart by the boundary
  class, are the seeds; seeds below a quarter of ``min_size`` are dropped (noise, or a second
  fragment of one interior); the seeds flood the foreground (interior + boundary) down
  P(interior) until they meet; a foreground blob without a seed (a nucleus too small for an
  interior) is one object; objects below ``min_size`` are dropped.
  ``target="semantic"``: the distance-transform watershed below, on P(foreground) > threshold.
- predicted class labels (``instances_from_labels``, used by the inference CLI): touching cells
  are one connected blob, split either by a border class (the cell interiors are the seeds, the
  border goes to the nearest seed) or by the peaks of the (lightly smoothed) Euclidean distance
  to the background, at least ``min_distance`` apart, flooded down the distance until they meet
  at the necks between cells::

      instances = instances_from_labels(labels)                  # HxW uint16 (uint32 if needed)
      instances = instances_from_labels(labels, border_class=2)

Everything is whole-array numpy/scipy (no scikit-image): a 256x256 tile of ~140 nuclei decodes in
~4 ms (boundary) or ~14 ms (semantic: the Euclidean distance transform alone is ~3 ms).

Volumes: the same code takes [K, Z, Y, X] probabilities (ZxYxX labels) and gives ZxYxX ids. Objects
are 26-connected (as 8 in 2-D: a part joined by an edge or a corner only stays in its object), the
flooding fronts advance by face steps (6, as 4 in 2-D: the seam between two cells then lies halfway
across their neck) and a last 26-connected pass adds what only an edge or corner step reaches;
interiors (seeds) are 6-connected, as they are 4-connected in 2-D, so two interiors that touch at a
corner only stay two seeds. Voxels are taken as isotropic (a peak spacing is the same number of
voxels on every axis). ``min_size`` counts voxels: :meth:`DecodeParams.defaults` scales it for 3-D.
Measured on one CPU core: a 48^3 volume of 25 touching balls decodes in ~10 ms (boundary; ~35 ms
where blurred probabilities leave small seeds and long floods) or ~40 ms (semantic); 64x128x128
with 120 balls in ~50 ms (~0.36 s blurred) or ~0.27 s (semantic: the distance transform and its
smoothing dominate).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from scipy import ndimage

# Peaks of the distance transform closer than this (pixels) are one cell. 3 scored best on
# the synthetic cells (AP@0.5 / 0.75 from the true masks of 8 images: 0.904 / 0.801; 2: 0.905 /
# 0.796; 5: 0.869 / 0.753; 8: 0.736 / 0.536; connected components alone: 0.25).
DEFAULT_MIN_DISTANCE = 3
# Instances smaller than this (pixels) are dropped: slivers at image borders and necks.
DEFAULT_MIN_SIZE = 12
# The same for volumes (voxels): 12 px is 0.1 of a median area of 120 px (a nucleus ~12 px across);
# a ball of that diameter holds ~1000 voxels (pi/6 d^3; area^(3/2) ~ 1300), and 0.1 of it is 100.
# 12 voxels would keep fragments a 2x2x3 speck large.
DEFAULT_MIN_SIZE_3D = 100
# Height levels of the flooding watershed: more follow the distance map more closely.
FLOOD_LEVELS = 16
# Smoothing of the distance map before peak finding (pixels): removes the many tiny
# maxima of the pixel-grid distance along a cell's medial axis.
DISTANCE_SMOOTHING_SIGMA = 1.0
TARGETS = ("semantic", "boundary")
BOUNDARY_CLASSES = 3
# Boundary decoding: seeds (interiors) smaller than this fraction of min_size are dropped before
# the flooding, so that a speck of noise or a second fragment of one nucleus's interior does not
# split it. An interior is much smaller than its object (a 2 px rim takes half of a small
# nucleus), hence a fraction. Tuned AP@0.5 on two levels of noisy synthetic probabilities:
# 1/4: 0.976 and 0.596; all of min_size: 0.966 and 0.563 (small nuclei lose their seed and
# merge); keeping every seed: 0.975 and 0.587, with half the tuning time (one flooding for all
# min sizes).
SEED_MIN_SIZE_FRACTION = 0.25
# Levels of P(interior) the boundary flooding goes down. On noisy synthetic probabilities 8 gives
# AP@0.75 0.918, an exact priority-queue watershed (skimage's) 0.919, plain growth (1) 0.903.
BOUNDARY_FLOOD_LEVELS = 8



@dataclass(frozen=True)
class DecodeParams:
    """How class probabilities become instances (see the module docstring); saved with a model."""

    # "semantic": class probabilities, foreground = any class > 0; "boundary": 0 bg / 1 interior / 2 boundary
    target: str = "semantic"
    threshold: float = 0.5  # in an object when P(foreground) > threshold (boundary: P(interior + boundary))
    seed_threshold: float = 0.5  # boundary: a seed pixel has P(interior) > seed_threshold; semantic: unused
    min_distance: int = DEFAULT_MIN_DISTANCE  # semantic: spacing of the distance peaks; boundary: unused
    min_size: int = DEFAULT_MIN_SIZE  # objects smaller than this (px) are dropped; boundary: seeds too

    def __post_init__(self) -> None:
        if not isinstance(self.target, str) or self.target not in TARGETS:
            raise ValueError(f"decode params: target={self.target!r}, expected one of {', '.join(TARGETS)}")
        for name in ("threshold", "seed_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
                raise ValueError(f"decode params: {name}={value!r}, expected a probability in [0, 1)")
            object.__setattr__(self, name, float(value))
        for name in ("min_distance", "min_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"decode params: {name}={value!r}, expected a whole number of pixels >= 0")
            object.__setattr__(self, name, int(value))

    @classmethod
    def defaults(cls, target: str = "semantic", spatial_dims: int = 2) -> DecodeParams:
        """The default params of ``target`` for images (2) or volumes (3): ``min_size`` counts
        voxels in a volume, hence its own default (DEFAULT_MIN_SIZE_3D)."""
        if spatial_dims not in (2, 3):
            raise ValueError(f"decode params: spatial_dims={spatial_dims!r}, expected 2 or 3")
        return cls(target=target, min_size=DEFAULT_MIN_SIZE if spatial_dims == 2 else DEFAULT_MIN_SIZE_3D)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> DecodeParams:
        """The params of ``to_dict``'s output; missing keys take the defaults."""
        if not isinstance(values, dict):
            raise ValueError(f"decode params: expected a mapping, got {type(values).__name__}")
        known = [field.name for field in fields(cls)]
        for key in values:
            if key not in known:
                raise ValueError(f"decode params: unknown key {key!r}, expected some of {', '.join(known)}")
        return cls(**values)


def decode_instances(probabilities: np.ndarray, params: DecodeParams) -> np.ndarray:
    """HxW instance ids (0 background, 1..N) of [K, H, W] class probabilities (a softmax output);
    ZxYxX ids of [K, Z, Y, X] ones."""
    return decode_min_size_variants(probabilities, params, [params.min_size])[0]


def decode_min_size_variants(
    probabilities: np.ndarray, params: DecodeParams, min_sizes: Sequence[int]
) -> list[np.ndarray]:
    """``decode_instances`` with ``params.min_size`` set to each of ``min_sizes`` in turn, the work
    they share done once (the grid search of :mod:`unetdist.decoding` relies on this)."""
    probabilities = _check_probabilities(probabilities, params.target)
    if params.target == "boundary":
        return _decode_boundary(probabilities, params, min_sizes)
    foreground = probabilities[1:].sum(axis=0) > params.threshold
    instances = _distance_watershed(foreground, params.min_distance)
    return [_drop_small_and_relabel(instances, min_size) for min_size in min_sizes]


def _check_probabilities(probabilities: np.ndarray, target: str) -> np.ndarray:
    probabilities = np.asarray(probabilities)
    floating = np.issubdtype(probabilities.dtype, np.floating)
    if probabilities.ndim not in (3, 4) or probabilities.shape[0] < 2 or not floating:
        raise ValueError(
            f"expected [K, H, W] or [K, Z, Y, X] float class probabilities with K >= 2, got {probabilities.dtype} "
            f"{probabilities.shape}"
        )
    if target == "boundary" and probabilities.shape[0] != BOUNDARY_CLASSES:
        raise ValueError(
            f"target boundary decodes 3 classes (background / interior / boundary), got "
            f"{probabilities.shape[0]} in {probabilities.shape}"
        )
    return probabilities


def _decode_boundary(
    probabilities: np.ndarray, params: DecodeParams, min_sizes: Sequence[int]
) -> list[np.ndarray]:
    interior = probabilities[1]
    foreground = (interior + probabilities[2]) > params.threshold
    seeds, _ = ndimage.label((interior > params.seed_threshold) & foreground)
    seed_areas = np.bincount(seeds.ravel(), minlength=1)
    seed_areas[0] = 0
    results, grown_by_seed_count = [], {}
    for min_size in min_sizes:
        keep = seed_areas >= max(1.0, SEED_MIN_SIZE_FRACTION * min_size)
        count = int(keep.sum())
        # the kept seeds only shrink as min_size grows: the same count is the same seeds
        if count not in grown_by_seed_count:
            grown_by_seed_count[count] = _grow_seeds(_relabel(seeds, keep), interior, foreground)
        results.append(_drop_small_and_relabel(grown_by_seed_count[count], min_size))
    return results


def _grow_seeds(seeds: np.ndarray, interior: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """The seeds flooded through ``foreground`` down P(interior), so touching objects meet where it is
    lowest, in the boundary band between their interiors; foreground the seeds do not reach (a blob
    without a seed, a nucleus too small for an interior) becomes objects of their own."""
    labels = _flood(seeds, interior, foreground, levels=BOUNDARY_FLOOD_LEVELS)
    unreached = foreground & (labels == 0)
    if unreached.any():
        extra, num_extra = ndimage.label(unreached, structure=_fully_connected(unreached.ndim))
        count = int(labels.max())
        labels = labels.astype(_id_dtype(count + num_extra), copy=False)
        labels[unreached] = extra[unreached] + count
    return labels


def instances_from_labels(
    labels: np.ndarray,
    *,
    foreground_classes: tuple[int, ...] | None = None,
    border_class: int | None = None,
    min_distance: int = DEFAULT_MIN_DISTANCE,
    min_size: int = DEFAULT_MIN_SIZE,
    split_touching: bool = True,
) -> np.ndarray:
    """HxW instance ids (0 background, 1..N consecutive) from HxW class labels (ZxYxX from ZxYxX).

    ``foreground_classes``: the cell classes (default: every class but 0 and
    ``border_class``). ``split_touching=False`` gives plain connected components.
    """
    labels = np.asarray(labels)
    if labels.ndim not in (2, 3):
        raise ValueError(f"expected HxW or ZxYxX class labels, got shape {labels.shape}")
    if foreground_classes is None:
        cells = labels > 0
        if border_class is not None:
            cells &= labels != border_class
    else:
        cells = np.isin(labels, foreground_classes)

    if border_class is not None:
        instances = _grow_into_border(cells, labels == border_class)
    elif split_touching:
        instances = _distance_watershed(cells, min_distance)
    else:
        instances, _ = ndimage.label(cells, structure=_fully_connected(cells.ndim))
    return _drop_small_and_relabel(instances, min_size)


def _grow_into_border(cells: np.ndarray, border: np.ndarray) -> np.ndarray:
    seeds, count = ndimage.label(cells)
    if count == 0:
        return seeds
    # every pixel's nearest seed pixel; border pixels take that seed's id
    _, nearest = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    grown = seeds[tuple(nearest)]
    return np.where(cells | border, grown, 0)


def _distance_watershed(cells: np.ndarray, min_distance: int) -> np.ndarray:
    connected = _fully_connected(cells.ndim)
    components, count = ndimage.label(cells, structure=connected)
    if count == 0:
        return components
    distance = ndimage.gaussian_filter(ndimage.distance_transform_edt(cells), DISTANCE_SMOOTHING_SIGMA)
    size = 2 * max(int(min_distance), 0) + 1
    peaks = cells & (distance >= ndimage.maximum_filter(distance, size=size)) & (distance > 0)
    seeds, num_seeds = ndimage.label(peaks, structure=connected)
    # A component whose peak lost to a neighbour's inside the filter window still needs a seed.
    seeded = np.zeros(count + 1, dtype=bool)
    seeded[np.unique(components[seeds > 0])] = True
    unseeded = ~seeded[components] & cells
    if unseeded.any():
        extra, num_extra = ndimage.label(unseeded, structure=connected)
        seeds = np.where(unseeded, extra + num_seeds, seeds)
        num_seeds += num_extra
    return _flood(seeds.astype(_id_dtype(num_seeds)), distance, cells)


def _flood(
    seeds: np.ndarray, height: np.ndarray, allowed: np.ndarray, levels: int = FLOOD_LEVELS
) -> np.ndarray:
    """Marker watershed by level-wise flooding: seeds grow into ``allowed`` pixels from the
    highest ``height`` down, ``levels`` levels; within a level all fronts advance one pixel
    (a face step: 4-connected, 6 in a volume) per round, so two cells meet halfway across the neck between them, and a
    pixel that two fronts reach at once joins the neighbour highest up the ``height``, which
    keeps the seam in the valley (measured: AP@0.9 of the true masks 0.49 -> 0.63 against
    taking the largest id, 8-connected). Pixels no seed reaches stay 0.

    (scipy's ``watershed_ift`` breaks the many ties of a distance map badly: a cell's whole
    rim can go to its neighbour, hence this vectorised flooding. Each round touches only the
    pixels still to fill: a 256x256 tile floods in a few milliseconds.)
    """
    padded = np.pad(seeds, 1)
    flat = padded.reshape(-1)
    flat_height = np.pad(height.astype(np.float32), 1, constant_values=-np.inf).reshape(-1)
    pending = np.flatnonzero(np.pad(allowed & (seeds == 0), 1))
    top = float(height[allowed].max()) if allowed.any() else 0.0
    thresholds = np.linspace(top, 0.0, levels + 1)[1:]
    # each pixel's level: the first threshold its height reaches (a radix sort groups the levels)
    level_of = levels - np.searchsorted(thresholds[::-1], flat_height[pending], side="right")
    pending = pending[np.argsort(level_of.astype(np.min_scalar_type(levels)), kind="stable")]
    level_starts = np.concatenate([[0], np.cumsum(np.bincount(level_of, minlength=levels + 1))])
    waiting = pending[:0]  # reachable at an earlier level but not reached yet
    faces, diagonals = _neighbour_offsets(padded.shape)
    for level in range(levels):
        arrivals = pending[level_starts[level] : level_starts[level + 1]]
        waiting = _grow_fronts(flat, flat_height, np.concatenate([waiting, arrivals]), faces)
    # what only a diagonal step joins to a seed (the objects are 8-connected, 26 in a volume)
    _grow_fronts(flat, flat_height, waiting, np.concatenate([faces, diagonals]))
    return padded[(slice(1, -1),) * seeds.ndim]


def _neighbour_offsets(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The flat offsets of a pixel's face neighbours and of its other (edge, corner) neighbours in a
    C-ordered array of ``shape``, each ascending: in 2-D ``[-W, -1, 1, W]`` and ``[-W-1, -W+1, W-1,
    W+1]``, the order in which ``_grow_fronts`` breaks ties (it keeps 2-D results as they were)."""
    strides = np.cumprod((*shape[1:], 1)[::-1])[::-1]
    steps = np.stack(np.meshgrid(*[(-1, 0, 1)] * len(shape), indexing="ij"), axis=-1).reshape(-1, len(shape))
    moved = np.abs(steps).sum(axis=1)
    offsets = steps @ strides
    return np.sort(offsets[moved == 1]), np.sort(offsets[moved > 1])


def _grow_fronts(
    flat: np.ndarray, flat_height: np.ndarray, candidates: np.ndarray, offsets: np.ndarray
) -> np.ndarray:
    """Grows the ids of ``flat`` (a zero-padded image, flattened) into the ``candidates`` pixels until
    none is reached, one pixel per round, each from its highest labelled neighbour (``offsets``: the
    neighbours' flat offsets); returns the candidates not reached. (Following only the pixels
    next to the last round's was slower: the sets are small and de-duplicating them costs more.)"""
    while candidates.size:
        neighbours = candidates[:, None] + offsets
        ids = flat[neighbours]
        reached = ids.any(axis=1)
        if not reached.any():
            break
        neighbours, ids = neighbours[reached], ids[reached]
        steepest = np.where(ids > 0, flat_height[neighbours], -np.inf).argmax(axis=1)
        flat[candidates[reached]] = ids[np.arange(ids.shape[0]), steepest]
        candidates = candidates[~reached]
    return candidates


def _drop_small_and_relabel(instances: np.ndarray, min_size: int) -> np.ndarray:
    areas = np.bincount(instances.ravel(), minlength=1)
    return _relabel(instances, areas >= max(min_size, 1))


def _relabel(labels: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The ids where ``keep[id]`` renumbered 1..N (uint16, uint32 when N does not fit), the rest 0."""
    keep = keep.copy()
    keep[0] = False
    count = int(keep.sum())
    dtype = _id_dtype(count)
    new_ids = np.zeros(keep.shape[0], dtype=dtype)
    new_ids[keep] = np.arange(1, count + 1, dtype=dtype)
    return new_ids[labels]


def _fully_connected(ndim: int) -> np.ndarray:
    """Every neighbour, edges and corners too: 8-connected in 2-D, 26 in 3-D."""
    return ndimage.generate_binary_structure(ndim, ndim)


def _id_dtype(count: int) -> type[np.unsignedinteger]:
    return np.uint16 if count <= np.iinfo(np.uint16).max else np.uint32
