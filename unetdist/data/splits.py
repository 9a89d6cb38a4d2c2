"""How prepare holds out validation data: whole images, or, with few images, a region of each.

Pure functions of stems, fractions and image sizes (no I/O), used by
:func:`unetdist.data.prepare.prepare_pairs` and, for the gap rule, by the OME-Zarr source's
single-image split (:mod:`unetdist.data.sources.ome_zarr`)::

    train, val = split_by_group(items, val_fraction=0.1, seed=0)     # 5 or more images (or stacks)
    regions = holdout_regions(512, 768, tile_size=96, val_fraction=0.1)
    regions.train, regions.val      # (y0, y1, x0, x1) each, in the image's pixels
    regions = holdout_box((40, 512, 768), (16, 96, 96), val_fraction=0.1)   # a volume
    regions.train, regions.val      # (z0, z1, y0, y1, x0, x1)

Whole images are the better split (no pixel of a validation image is trained on), but with
fewer than :data:`MIN_IMAGES_TO_SPLIT_BY_IMAGE` images it holds out a large share of the data
(one of two images is half of it) and cannot hold out anything from one image. There each
image gives both: its last part along the longer axis validates, the rest trains, and a gap of
at least half a tile lies between them (:func:`holdout_lengths`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from unetdist.data.imageio import PrepareError

# Below this many images (groups: the planes of one stack count once), prepare holds out a
# region of each image instead of whole images: one held-out image of four is already a
# quarter of the data where val_fraction asks a tenth, and its score rests on one image.
MIN_IMAGES_TO_SPLIT_BY_IMAGE = 5

Region = tuple[int, ...]  # (start, stop) per spatial axis: (y0, y1, x0, x1), or (z0, z1, y0, y1, x0, x1)
# What people call the spatial axes, last two in-plane; in messages and in region_text.
AXIS_NAMES = ("planes", "rows", "columns")
LENGTH_NAMES = ("depth", "height", "width")


def split_by_image(stems: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded (train, val) split of image stems; both lists keep a seeded random order.

    val gets ``round(val_fraction * n)`` images (half rounds up), at least one when
    ``val_fraction > 0`` and ``n >= 2``, and never all of them.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise PrepareError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = [stems[i] for i in np.random.default_rng(seed).permutation(len(stems))]
    num_val = math.floor(val_fraction * len(order) + 0.5)
    if val_fraction > 0 and len(order) >= 2:
        num_val = min(max(num_val, 1), len(order) - 1)
    return order[num_val:], order[:num_val]


def split_by_group(
    items: Sequence[tuple[str, str]], val_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Seeded (train, val) stems of ``(stem, group)`` items, splitting whole groups (the planes of
    one stack) by :func:`split_by_image` of the sorted group names; a group's stems stay together,
    in their order. Where every stem is its own group, this is :func:`split_by_image` of the stems."""
    by_group: dict[str, list[str]] = {}
    for stem, group in items:
        by_group.setdefault(group, []).append(stem)
    train, val = split_by_image(sorted(by_group), val_fraction, seed)
    return [s for group in train for s in by_group[group]], [s for group in val for s in by_group[group]]


def gap_px(tile_size: int) -> int:
    """The pixels left out between a training and a validation region: half a tile, rounded up.

    Why: a cell cut by the border between the regions would be trained on in one half and
    scored in the other, and the training tiles nearest the border would hold the very
    texture validation sees next to it; half a tile apart, no tile of one region comes
    within half a tile of the other, and the gap costs only a thin band of the image.
    """
    return -(-tile_size // 2)


@dataclass(frozen=True)
class HoldoutLengths:
    """Along one axis of ``length`` px: ``train`` px from 0, ``gap`` px unused, ``val`` px to the end."""

    train: int
    gap: int
    val: int

    @property
    def needed(self) -> int:
        return self.train + self.gap + self.val


def holdout_lengths(length: int, tile_size: int, val_fraction: float, window: int = 0) -> HoldoutLengths:
    """How ``length`` px split into training, gap and validation: validation about
    ``val_fraction`` of the length but at least ``window`` (default a tile: the tiler needs one
    whole window), the gap :func:`gap_px`, training the rest. ``train`` comes out below
    ``window`` (even negative) where the length cannot hold all three; :func:`fits` says so."""
    window = window or tile_size
    val = max(window, round(val_fraction * length))
    gap = gap_px(tile_size)
    return HoldoutLengths(length - gap - val, gap, val)


def fits(lengths: HoldoutLengths, window: int) -> bool:
    """Whether both regions hold at least one ``window``."""
    return lengths.train >= window and lengths.val >= window


@dataclass(frozen=True)
class HoldoutRegions:
    """The training and validation regions of one image, and the axis they are cut along."""

    train: Region
    val: Region
    axis: str  # "rows" (cut across the height), "columns", or "planes" (across the depth of a volume)


def region_text(region: Region) -> str:
    """``rows 160-255, columns 0-255`` (inclusive, as people count pixels) of a region (y0, y1, x0, x1);
    ``planes 0-23, rows ...`` of a volume's (z0, z1, y0, y1, x0, x1)."""
    names = AXIS_NAMES[-(len(region) // 2) :]
    return ", ".join(f"{name} {region[2 * i]}-{region[2 * i + 1] - 1}" for i, name in enumerate(names))


class RegionTooSmall(PrepareError):
    """An image cannot hold a training region, the gap and a validation region of a tile each."""


def holdout_regions(
    height: int, width: int, tile_size: int, val_fraction: float, window: int = 0
) -> HoldoutRegions:
    """The regions of a ``height`` x ``width`` image: its last part along the longer axis (rows
    when square) validates, the first part trains, :func:`gap_px` between them.

    Why the longer axis: both regions then keep the whole shorter side, so they hold the most
    whole tiles for their share, and the gap, a band across the shorter side, costs the
    smallest share of the image. Why the last part: it is the same for every plane of a stack
    (no plane trains where another validates) and needs no seed to find again.
    ``window``: the smallest region the tiler covers (default ``tile_size``; with overlap-tile
    context, the output window). :class:`RegionTooSmall` where the image cannot hold both.
    """
    window = window or tile_size
    return holdout_box((height, width), (tile_size, tile_size), val_fraction, (window, window))


def holdout_box(
    shape: tuple[int, ...], tile: tuple[int, ...], val_fraction: float, window: tuple[int, ...] | None = None
) -> HoldoutRegions:
    """:func:`holdout_regions` of an image or volume of any number of spatial axes, ``tile`` one
    length per axis: cut along the axis that holds the most tiles (the first of equals), the gap
    half a tile along that axis. Of a square tile that is the longer axis; of a volume's
    ``(tile_depth, tile, tile)`` tile, z only where the stack is deep for its tile depth (a stack
    of few planes keeps them all in both regions: its z is too short to cut)."""
    window = window or tile
    axis = max(range(len(shape)), key=lambda a: (shape[a] / tile[a], -a))
    lengths = holdout_lengths(shape[axis], tile[axis], val_fraction, window[axis])
    names = LENGTH_NAMES[-len(shape) :]
    if not fits(lengths, window[axis]):
        kind, unit = ("image", "px") if len(shape) == 2 else ("volume", "voxels")
        tile_text = str(tile[0]) if len(set(tile)) == 1 and len(shape) == 2 else "x".join(map(str, tile))
        raise RegionTooSmall(
            f"{kind} {'x'.join(map(str, shape))} is too small to hold out a validation region with tile size "
            f"{tile_text}: its {names[axis]} {shape[axis]} {unit} must hold {window[axis]} {unit} to train, a "
            f"{lengths.gap} {unit} gap and {lengths.val} {unit} to validate "
            f"({window[axis] + lengths.gap + lengths.val} {unit})"
        )
    train = [bound for length in shape for bound in (0, length)]
    val = list(train)
    train[2 * axis + 1] = lengths.train
    val[2 * axis] = shape[axis] - lengths.val
    return HoldoutRegions(tuple(train), tuple(val), AXIS_NAMES[-len(shape) :][axis])
