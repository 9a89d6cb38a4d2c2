"""Volumes as WebDataset tiles, for ``prepare --spatial-dims 3 --format webdataset``: a volume
(or its training or validation region) cut into a grid of ``(tile_depth, tile, tile)`` tiles.

The same grid as a 2-D image's tiles (:func:`~unetdist.data.layout.tile_origins` per axis: the
last tile of an axis shifted inwards to end at the edge, so nothing is padded), one more axis; each
tile a sample of ``.npy`` members, image ``[C, D, T, T]`` in the volume's dtype and mask ``[D, T, T]``,
keyed by its corner in the source volume (``{stem}_z{z}_y{y}_x{x}``, :func:`~unetdist.data.layout.sample_key`),
so the keys of a volume's training and validation regions never repeat each other. No weight
member: volumes store none (the loader computes border weights from instance ids). Training crops
its windows from these tiles and validation reads them whole, as of 2-D shards.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from unetdist.data.layout import grid_corners, sample_key

__all__ = ["volume_tiles"]


def volume_tiles(
    stem: str,
    image: np.ndarray,
    mask: np.ndarray,
    tile: tuple[int, int, int],
    offset: tuple[int, ...] = (0, 0, 0),
) -> Iterator[dict]:
    """Samples (``__key__``, ``__origin__``, ``image.npy``, ``mask.npy``) of the ``tile`` grid covering
    ``mask`` [Z, Y, X] and ``image`` [C, Z, Y, X]; ``offset`` is where they lie in the source volume
    (a region's corner), added to the keys and origins."""
    if mask.ndim != 3 or image.shape[1:] != mask.shape or len(tile) != 3:
        raise ValueError(f"volume tiles: image {image.shape}, mask {mask.shape}, tile {tile}")
    for corner in grid_corners(mask.shape, tile):
        window = tuple(slice(start, start + size) for start, size in zip(corner, tile, strict=True))
        where = tuple(int(start + shift) for start, shift in zip(corner, offset, strict=True))
        yield {
            "__key__": sample_key(stem, *where),
            "__origin__": (stem, *where),
            # copies, as 2-D tiles are: the writer's sample owns its tile, not a view of the volume
            "image.npy": np.ascontiguousarray(image[(slice(None), *window)]),
            "mask.npy": np.ascontiguousarray(mask[window]),
        }
