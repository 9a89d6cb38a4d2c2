"""The on-disk contract of a prepared data set: names, key format, tile grid and stored dtypes.

``python -m unetdist.prepare`` writes one folder; every writer and every source reads its
vocabulary from here, so a format detail lives in one place::

    ROOT/dataset.json          written last: its presence means the rest is complete; its
                               "mask_kind" (MASK_KIND_KEY) says what the masks hold
    ROOT/train-%06d.tar ...    webdataset shards (SHARD_PATTERNS); samples keyed sample_key(...)
                               beside each, SHARD.index.json: its member table (sources/tar_index.py)
    ROOT/data.zarr/            or one Zarr v3 store (STORE_NAME), with a group per split:

    pre-tiled (unetdist.data.sources.zarr_tiles)
        SPLIT/image   [N, C, T, T]  the stored dtype (IMAGE_DTYPES)
        SPLIT/mask    [N, T, T]     uint8 class ids (or 0/1), or uint16/uint32 instance ids
        SPLIT/weight  [N, T, T]     float32 border weights (when prepared with them)
        SPLIT/origin  [N, 3]        int32 (image number, top, left in that image) -> sample_key(...)
        attributes: "images" (the stems), "chunk_tiles"

    whole images, ``--whole-images`` (unetdist.data.sources.zarr_images)
        SPLIT/images/<i>      [C, H, W]  the stored dtype, chunked in 2-D squares
        SPLIT/masks/<i>       [H, W]     as SPLIT/mask: uint8 class ids, or uint16/uint32 instance ids
        SPLIT/weights/<i>     [H, W]     float32 border weights (when prepared with them)
        SPLIT/foreground/<i>  [K, 2]     int32 (y, x) of up to FOREGROUND_CAP mask > 0 pixels
        attributes: "layout" = WHOLE_IMAGES, "images", "shapes", "chunk", "foreground", and
        "offsets": (top, left) of each stored image in its source image (0, 0 when absent)
    whole volumes, ``--spatial-dims 3``: the same with a z axis first ([C, Z, Y, X], [Z, Y, X],
        foreground [K, 3] (z, y, x)), chunked in 3-D blocks; attributes add "spatial_dims": 3 and
        "spacing" (z, y, x) per volume, and dataset.json "spatial_dims" and the median "spacing"

:func:`check_zarr_layout` holds a store to that contract when it is opened, from the Zarr v3
metadata files alone, so a store of another layout is one message saying what was expected.

This module imports nothing else from :mod:`unetdist.data`: it is the bottom of the package.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

STORE_NAME = "data.zarr"
DATASET_JSON = "dataset.json"
SHARD_PATTERNS = {"train": "train-%06d.tar", "val": "val-%06d.tar"}
# What prepare may delete from an output folder it writes again: its own shard names and their
# indexes only (tar_index.INDEX_SUFFIX; this module imports nothing of the package).
OWN_SHARD_NAME = re.compile(r"^(train|val)-\d{6}\.tar(\.index\.json)?$")

IMAGE_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))
# Stored masks: uint8 class ids or 0/1; instance ids (dataset.json "mask_kind": "instances") as
# uint16, or uint32 where an image has more than 65,535 cells.
MASK_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.uint32))
MASK_KIND_KEY = "mask_kind"  # dataset.json: "instances", "classes" or "binary"; absent (older): "classes"

# Compressors of pre-tiled Zarr stores (what each costs: unetdist.data.writers).
CODECS = ("none", "lz4", "zstd")
DEFAULT_CODEC = "none"

WHOLE_IMAGES = "whole-images"  # a whole-image split group's "layout" attribute, and dataset.json's
# Foreground pixels kept per image for centred training tiles (nnU-Net keeps 10,000 per
# class): 80 kB per image, read once per process; a tile centre needs no more variety.
FOREGROUND_CAP = 10_000
FOREGROUND_SEED = 0  # fixed: re-running prepare writes the same tables


def sample_key(stem: str, *corner: int) -> str:
    """``{stem}_y{top}_x{left}`` (a volume's: ``{stem}_z{z}_y{top}_x{left}``) for a tile's corner;
    webdataset cuts a key at its first dot, so dots in stems become '_'."""
    axes = "".join(f"_{axis}{value}" for axis, value in zip("zyx"[3 - len(corner):], corner, strict=True))
    return f"{stem.replace('.', '_')}{axes}"


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


def grid_corners(shape: tuple[int, ...], tile: tuple[int, ...]) -> list[tuple[int, ...]]:
    """:func:`grid_windows` over any number of axes: the corner of each ``tile`` window of a fixed
    grid covering ``shape``, the last axis fastest (in 2-D the same windows in the same order)."""
    return list(itertools.product(*(tile_origins(length, size) for length, size in zip(shape, tile, strict=True))))


# Reads a store's metadata file by its path relative to the store ("train/zarr.json"): its bytes,
# None where there is none. Local files by default; the caller passes one for a store at a URL
# (this module imports nothing of the package, so not the remote reader itself).
MetadataReader = Callable[[str], "bytes | None"]


def local_metadata(store: str | Path) -> MetadataReader:
    def read(relative: str) -> bytes | None:
        try:
            return (Path(store) / relative).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    return read


def is_whole_image_store(store: str | Path, split: str, read: MetadataReader | None = None) -> bool:
    """Whether ``store/split`` holds whole images (``images/<i>``) rather than pre-tiled arrays."""
    return (read or local_metadata(store))(f"{split}/images/zarr.json") is not None


def foreground_points(mask: np.ndarray, cap: int = FOREGROUND_CAP, seed: int = FOREGROUND_SEED) -> np.ndarray:
    """int32 [K, mask.ndim] ((y, x), or (z, y, x) of a volume) of the ``mask > 0`` pixels in raster
    order: all of them, or, when there are more than ``cap``, ``cap`` of them drawn without
    replacement with a fixed seed."""
    flat = np.flatnonzero(mask)
    if flat.size > cap:
        flat = flat[np.sort(np.random.default_rng(seed).choice(flat.size, cap, replace=False))]
    return np.stack(np.unravel_index(flat, mask.shape), axis=1).astype(np.int32).reshape(-1, mask.ndim)


ZARR_LAYOUT = (
    "groups train/ and val/, each holding arrays image [N, C, T, T] (uint8, uint16 or float32) and mask [N, T, T] "
    "(integer class ids), optionally weight [N, T, T] (float32) and origin [N, 3] (int32); or, from "
    "--whole-images, groups images/ and masks/ with arrays <i> [C, H, W] and [H, W] and the group attribute "
    f"layout={WHOLE_IMAGES!r}"
)


def _zarr_node(read: MetadataReader, store: str, node: str) -> dict | None:
    """The Zarr v3 metadata (``zarr.json``) of ``node`` (a path in the store, "" the root); None where there is none."""
    relative = f"{node}/zarr.json" if node else "zarr.json"
    try:
        data = read(relative)
        if data is None:
            return None
        meta = json.loads(data)
    except (OSError, ValueError) as err:
        raise ValueError(f"{store}/{relative}: cannot read Zarr metadata: {err}") from None
    return meta if isinstance(meta, dict) else None


def _array_problem(meta: dict | None, name: str, ndim: int, kinds: str, dtypes: tuple = ()) -> str | None:
    """What is wrong with array ``name`` (its ``zarr.json``): missing, rank or dtype; None when fine."""
    if meta is None or meta.get("node_type") != "array":
        return f"no array {name}"
    shape, dtype = meta.get("shape", []), meta.get("data_type")
    try:
        np_dtype = np.dtype(dtype) if isinstance(dtype, str) else None
    except TypeError:
        np_dtype = None
    found = f"{name} {list(shape)} {dtype}"
    if len(shape) != ndim:
        return f"{found} has {len(shape)} dimensions, expected {ndim}"
    if np_dtype is None or np_dtype.kind not in kinds or (dtypes and np_dtype not in dtypes):
        return f"{found} has an unexpected dtype"
    return None


def check_zarr_layout(store: str | Path, split: str, read: MetadataReader | None = None) -> None:
    """``ValueError`` naming the store, what it holds and what was expected, unless ``store/split``
    has one of the layouts above (pre-tiled, or whole images). ``read``: for a store at a URL."""
    local = read is None
    read = read or local_metadata(store)
    store = str(store)
    expected = (
        f"expected a Zarr v3 store as `python -m unetdist.prepare --format zarr` writes: {ZARR_LAYOUT}; "
        "for a store of your own arrays, set data.image_array and data.mask_array"
    )
    if local and not Path(store).is_dir():
        raise ValueError(f"zarr store {store} not found: prepare it with `python -m unetdist.prepare --format zarr`")

    def node(path: str) -> dict | None:
        return _zarr_node(read, store, path)

    if node("") is None:
        if not local:
            raise ValueError(f"zarr store {store}: no zarr.json there; {expected}")
        found = "a Zarr v2 store (.zgroup)" if (Path(store) / ".zgroup").is_file() else "no zarr.json, not a Zarr v3 store"
        raise ValueError(f"zarr store {store}: {found}; {expected}")
    group = node(split)
    if group is None or group.get("node_type") != "group":
        candidates = sorted(p.name for p in Path(store).iterdir()) if local else ["train", "val"]
        held = [name for name in candidates if node(name) is not None]
        if split == "val" and "train" in held:  # a store prepared without a validation split
            raise ValueError(f"zarr store {store}: no group 'val'; prepare with --val-fraction > 0")
        raise ValueError(f"zarr store {store}: no group {split!r}; it holds {held or 'nothing'}; {expected}")
    if node(f"{split}/images") is not None:
        attributes = group.get("attributes", {})
        problems = [f"attribute layout={attributes.get('layout')!r}"] if attributes.get("layout") != WHOLE_IMAGES else []
        problems += [f"no attribute {key!r}" for key in ("images", "shapes") if key not in attributes]
        if attributes.get("images"):  # the first image stands for all: reading every one would be slow
            dims = 3 if attributes.get("spatial_dims") == 3 else 2  # whole volumes: one more axis
            problems += [_array_problem(node(f"{split}/images/0"), "images/0", dims + 1, "uif", IMAGE_DTYPES),
                         _array_problem(node(f"{split}/masks/0"), "masks/0", dims, "ui")]
    else:
        problems = [_array_problem(node(f"{split}/image"), "image", 4, "uif", IMAGE_DTYPES),
                    _array_problem(node(f"{split}/mask"), "mask", 3, "ui")]
        for name, ndim, kinds in (("weight", 3, "f"), ("origin", 2, "i")):
            meta = node(f"{split}/{name}")
            if meta is not None:
                problems.append(_array_problem(meta, name, ndim, kinds))
    problems = [problem for problem in problems if problem]
    if problems:
        raise ValueError(f"zarr store {store}/{split}: {'; '.join(problems)}; {expected}")
