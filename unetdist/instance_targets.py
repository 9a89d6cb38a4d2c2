"""Instance ids -> the three-class "boundary" training target: background / interior / boundary.

Touching nuclei are one blob to a two-class (background / foreground) model. Trained to tell
each object's rim from its interior, the model's interiors are separate by construction and
become the seeds of the instance decoding (:mod:`unetdist.instances`); StarDist's comparison
on DSB2018 shows this alone lifting a U-Net from 0.674 to 0.806 AP@0.5.

    classes = boundary_classes(instances, width_px=2)   # uint8: 0 background, 1 interior, 2 boundary

A pixel of an object is boundary when another label (background or another object) lies within
``width_px`` of it (a disc; in a ZxYxX volume a ball, an ellipsoid with ``spacing``), interior
otherwise. Image edges are not boundaries: a tile cut out of a larger image must not invent a rim
where the cut is (reflected edges, see ``mode``).

    classes = boundary_classes(volume, width_px=2, spacing=(2.0, 0.5, 0.5))   # a 3-D rim
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

BACKGROUND, INTERIOR, BOUNDARY = 0, 1, 2
NUM_BOUNDARY_CLASSES = 3
# The boundary width for objects of a given median diameter (px): about a tenth of it, at least
# 1 px and at most 4, so the interior of a small nucleus (~10 px) keeps a seed of a few pixels.
MIN_WIDTH_PX, MAX_WIDTH_PX, WIDTH_PER_DIAMETER = 1, 4, 0.1


def boundary_width_px(median_diameter_px: float) -> int:
    """The rim width for objects of this median diameter (the plan's choice, see the constants)."""
    return int(min(MAX_WIDTH_PX, max(MIN_WIDTH_PX, round(WIDTH_PER_DIAMETER * median_diameter_px))))


def _disc(radius: int) -> np.ndarray:
    offsets = np.arange(-radius, radius + 1)
    return offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius * radius


def _ball(radius: int, sampling: tuple[float, ...]) -> np.ndarray:
    """The offsets within ``radius`` (in units of the last axis's voxel size) of a voxel of this
    size, and always its face neighbours: objects that touch along a coarse z axis must still
    meet a rim, even where the width is less than one z step."""
    halves = [max(1, int(radius / size)) for size in sampling]
    grids = np.meshgrid(*[np.arange(-half, half + 1) * size for half, size in zip(halves, sampling, strict=True)],
                        indexing="ij")
    footprint = sum(grid**2 for grid in grids) <= radius * radius
    for axis in range(len(halves)):
        for step in (-1, 1):
            face = list(halves)
            face[axis] += step
            footprint[tuple(face)] = True
    return footprint


def boundary_classes(
    instances: np.ndarray, width_px: int = 2, spacing: tuple[float, ...] | None = None
) -> np.ndarray:
    """uint8 classes (0 background, 1 interior, 2 boundary) of HxW (or ZxYxX) instance ids
    (0 background). ``spacing``: the voxel size per axis, any unit; ``width_px`` is then in units
    of the x voxel size."""
    instances = np.asarray(instances)
    if instances.ndim not in (2, 3) or not np.issubdtype(instances.dtype, np.integer):
        raise ValueError(
            f"expected HxW or ZxYxX integer instance ids, got {instances.dtype} {instances.shape}"
        )
    if width_px < 1:
        raise ValueError(f"boundary width must be at least 1 px, got {width_px}")
    if spacing is not None and (len(spacing) != instances.ndim or min(spacing) <= 0):
        raise ValueError(f"spacing must be {instances.ndim} positive sizes, got {spacing}")
    if instances.ndim == 2 and spacing is None:
        footprint = _disc(int(width_px))
    else:
        sampling = (1.0,) * instances.ndim if spacing is None else tuple(
            float(size) / float(spacing[-1]) for size in spacing
        )
        footprint = _ball(int(width_px), sampling)
    labels = instances.astype(np.int64, copy=False)
    lowest = ndimage.grey_erosion(labels, footprint=footprint, mode="reflect")
    highest = ndimage.grey_dilation(labels, footprint=footprint, mode="reflect")
    objects = labels > 0
    classes = np.where(objects, BOUNDARY, BACKGROUND).astype(np.uint8)
    classes[objects & (lowest == labels) & (highest == labels)] = INTERIOR
    return classes
