"""The on-disk contract of a prepared data set: names, key format, tile grid and stored dtypes.

``python -m unetdist.prepare`` writes one folder; every writer and every source reads its
vocabulary from here, so a format detail lives in one place::

    ROOT/dataset.json          written last: its presence means the rest is complete
    ROOT/train-%06d.tar ...    webdataset shards (SHARD_PATTERNS); samples keyed sample_key(...)
    ROOT/data.zarr/            or one Zarr v3 store (STORE_NAME), with a group per split:

    pre-tiled (unetdist.data.sources.zarr_tiles)
        SPLIT/image   [N, C, T, T]  the stored dtype (IMAGE_DTYPES)
        SPLIT/mask    [N, T, T]     uint8 class ids
        SPLIT/weight  [N, T, T]     float32 border weights (when prepared with them)
        SPLIT/origin  [N, 3]        int32 (image number, top, left) -> sample_key(stem, top, left)
        attributes: "images" (the stems), "chunk_tiles"

    whole images, ``--whole-images`` (unetdist.data.sources.zarr_images)
        SPLIT/images/<i>      [C, H, W]  the stored dtype, chunked in 2-D squares
        SPLIT/masks/<i>       [H, W]     uint8 class ids
        SPLIT/weights/<i>     [H, W]     float32 border weights (when prepared with them)
        SPLIT/foreground/<i>  [K, 2]     int32 (y, x) of up to FOREGROUND_CAP mask > 0 pixels
        attributes: "layout" = WHOLE_IMAGES, "images", "shapes", "chunk", "foreground"

This module imports nothing else from :mod:`unetdist.data`: it is the bottom of the package.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

STORE_NAME = "data.zarr"
DATASET_JSON = "dataset.json"
SHARD_PATTERNS = {"train": "train-%06d.tar", "val": "val-%06d.tar"}
# What prepare may delete from an output folder it writes again: its own shard names only.
OWN_SHARD_NAME = re.compile(r"^(train|val)-\d{6}\.tar$")

IMAGE_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))

# Compressors of pre-tiled Zarr stores (what each costs: unetdist.data.writers).
CODECS = ("none", "lz4", "zstd")
DEFAULT_CODEC = "none"

WHOLE_IMAGES = "whole-images"  # a whole-image split group's "layout" attribute, and dataset.json's
# Foreground pixels kept per image for centred training tiles (nnU-Net keeps 10,000 per
# class): 80 kB per image, read once per process; a tile centre needs no more variety.
FOREGROUND_CAP = 10_000
FOREGROUND_SEED = 0  # fixed: re-running prepare writes the same tables


def sample_key(stem: str, top: int, left: int) -> str:
    """``{stem}_y{top}_x{left}``; webdataset cuts a key at its first dot, so dots in stems become '_'."""
    return f"{stem.replace('.', '_')}_y{top}_x{left}"


def tile_origins(length: int, tile: int) -> list[int]:
    """Start offsets of ``tile``-sized windows covering ``[0, length)``.

    A regular grid; when ``tile`` does not divide ``length`` the last window is shifted
    inwards to end at the edge (overlapping its neighbour) instead of padding.
    """
    if tile <= 0 or length < tile:
        raise ValueError(f"cannot tile length {length} with tile {tile}")
    origins = list(range(0, length - tile + 1, tile))
    if origins[-1] + tile < length:
        origins.append(length - tile)
    return origins


def grid_windows(height: int, width: int, tile: int) -> list[tuple[int, int]]:
    """(top, left) of a fixed grid of ``tile`` windows covering an image, row by row; the last
    row and column are shifted inwards to end at the edge (:func:`tile_origins`)."""
    return [(top, left) for top in tile_origins(height, tile) for left in tile_origins(width, tile)]


def is_whole_image_store(store: str | Path, split: str) -> bool:
    """Whether ``store/split`` holds whole images (``images/<i>``) rather than pre-tiled arrays."""
    return (Path(store) / split / "images").is_dir()


def foreground_points(mask: np.ndarray, cap: int = FOREGROUND_CAP, seed: int = FOREGROUND_SEED) -> np.ndarray:
    """int32 [K, 2] (y, x) of the ``mask > 0`` pixels in raster order: all of them, or, when
    there are more than ``cap``, ``cap`` of them drawn without replacement with a fixed seed."""
    flat = np.flatnonzero(mask)
    if flat.size > cap:
        flat = flat[np.sort(np.random.default_rng(seed).choice(flat.size, cap, replace=False))]
    return np.stack(np.divmod(flat, mask.shape[1]), axis=1).astype(np.int32)
