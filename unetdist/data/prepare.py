"""Image/mask pairs -> tiled webdataset shards or a Zarr store, and ``dataset.json``.

Flow: list the input's images (:mod:`unetdist.data.inputs`: folders matched by stem, the
user's shards, OME-Zarr images) -> split them into train/val (:mod:`unetdist.data.splits`: by
image, or by stack for the planes of one, so no tile of a val image is trained on; with fewer
than five images, by a region of each image) -> per image: read, check, weight map on the
whole image, crop to its region, tile -> a writer per split (:mod:`unetdist.data.writers`) ->
``dataset.json`` (written last, so its presence means the rest is complete). The names and
formats written are those of :mod:`unetdist.data.layout`; the command line is :mod:`unetdist.prepare`.
Volumes (``spatial_dims=3``, :mod:`unetdist.data.volumes`) take the same flow, stored whole, their
regions cut along the axis that holds the most tiles, their voxel spacing in the store and dataset.json;
or, as WebDataset shards, as a grid of 3-D tiles (:mod:`unetdist.data.volume_tiles`).

Masks are stored as what they mean: instance ids as uint16 (uint32 past 65,535 cells in an
image), so validation can match instances and the loader can derive other targets from them
(``loss.target=boundary``); class ids and 0/1 as uint8. dataset.json's ``"mask_kind"`` says
which, and ``data.mask_kind=auto`` reads it.

Everything is written to a staging folder beside the output folder (``.<name>.partial-<pid>``)
and moved in only when complete: a failed or interrupted run removes the staging folder and
leaves an earlier data set in the output folder as it was. Of the output folder's contents,
only prepare's own names (``dataset.json``, ``train|val-NNNNNN.tar`` and their ``.index.json``,
``data.zarr/``) are ever replaced.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from unetdist.data.imageio import PrepareError, check_keys
from unetdist.data.inputs import FolderPairs, Pair, PairSource
from unetdist.data.layout import (
    CODECS,
    DATASET_JSON,
    MASK_KIND_KEY,
    STORE_NAME,
    WHOLE_IMAGES,
    sample_key,
    tile_origins,
)
from unetdist.data.pair_masks import check_pair, stored_mask
from unetdist.data.splits import (
    MIN_IMAGES_TO_SPLIT_BY_IMAGE,
    Region,
    RegionTooSmall,
    holdout_box,
    region_text,
    split_by_group,
    split_by_image,
)
from unetdist.data.staging import staged_output
from unetdist.data.volume_tiles import volume_tiles
from unetdist.data.volumes import (
    VolumePairs,
    check_volume,
    check_volume_settings,
    volume_metadata,
    voxel_spacing,
)
from unetdist.data.writers import open_split_writer

__all__ = ["MASK_KINDS", "prepare_dataset", "prepare_pairs", "split_by_group", "split_by_image"]

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
# instances: cell ids (0 background), stored as ids (uint16/uint32) with border weights;
# classes: class ids 0-255 stored as they are; binary: 0 background, any other value (255 of
# a 0/255 mask) -> 1.
MASK_KINDS = ("instances", "classes", "binary")


@dataclass(frozen=True)
class _Settings:
    """prepare_dataset's keyword arguments that shape what is written."""

    mask_kind: str
    tile_size: int
    shard_size: int
    w0: float
    sigma: float
    weight_map: bool
    output_format: str
    context_margin: int
    whole_images: bool
    zarr_codec: str | None
    spatial_dims: int = 2
    tile_depth: int = 0  # volumes: 0, a cube
    spacing: tuple[float, ...] | None = None  # volumes: (z, y, x) that wins over the files' metadata

    @property
    def with_weight(self) -> bool:
        # class masks have no instances to separate; volumes store none: a float32 map is four
        # times a uint8 volume, and the loader can compute one from the stored instance ids
        return self.weight_map and self.mask_kind == "instances" and self.spatial_dims == 2

    @property
    def tile_shape(self) -> tuple[int, ...]:
        depth = (self.tile_depth or self.tile_size,) if self.spatial_dims == 3 else ()
        return (*depth, self.tile_size, self.tile_size)

    def check(self) -> None:
        if self.mask_kind not in MASK_KINDS:
            raise PrepareError(f"mask kind must be one of {', '.join(MASK_KINDS)}, got {self.mask_kind!r}")
        if self.output_format not in ("webdataset", "zarr"):
            raise PrepareError(f"format must be 'webdataset' or 'zarr', got {self.output_format!r}")
        if self.whole_images and (self.output_format != "zarr" or self.context_margin):
            raise PrepareError("--whole-images needs --format zarr and no --context-for")
        codec = self.zarr_codec
        if codec is not None and (self.output_format != "zarr" or self.whole_images or codec not in CODECS):
            raise PrepareError(
                f"--zarr-codec {codec}: needs --format zarr without --whole-images, "
                f"and one of {', '.join(CODECS)}"
            )
        if self.context_margin < 0 or self.tile_size - 2 * self.context_margin <= 0:
            raise PrepareError(
                f"context margin {self.context_margin} leaves no output window in a {self.tile_size} tile"
            )
        if self.tile_size <= 0 or self.shard_size <= 0:
            raise PrepareError(
                f"tile size and shard size must be positive, got {self.tile_size} and {self.shard_size}"
            )
        check_volume_settings(self.spatial_dims, self.whole_images, self.tile_depth, self.spacing,
                              webdataset=self.output_format == "webdataset", context_margin=self.context_margin)
        if self.weight_map and (self.sigma <= 0 or self.w0 < 0):
            raise PrepareError(
                f"weight map needs sigma > 0 and w0 >= 0, got sigma={self.sigma}, w0={self.w0}"
            )


@dataclass
class _Written:
    """What the splits wrote, for dataset.json; and the first image, which every other must match."""

    shards: dict[str, list[str]] = field(default_factory=lambda: {split: [] for split in SPLITS})
    shard_counts: dict[str, list[int]] = field(default_factory=lambda: {split: [] for split in SPLITS})
    counts: dict[str, int] = field(default_factory=lambda: {split: 0 for split in SPLITS})
    first: tuple[int, np.dtype, str] | None = None  # (channels, dtype, stem)
    max_class: int = 1
    regions: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # split -> stem -> region
    spacings: dict[str, tuple[float, ...]] = field(default_factory=dict)  # volumes: stem -> (z, y, x)

    def check_like_first(self, image: np.ndarray, stem: str, path: Path | str) -> None:
        if self.first is None:
            self.first = (image.shape[0], image.dtype, stem)
            return
        channels, dtype, first_stem = self.first
        if image.shape[0] != channels or image.dtype != dtype:
            raise PrepareError(
                f"{path}: {image.shape[0]} channel(s) of {image.dtype}, but {first_stem} has "
                f"{channels} of {dtype}; all images must agree"
            )


# ---------------------------------------------------------------- pure helpers


def _tiles(
    stem: str,
    image: np.ndarray,
    mask: np.ndarray,
    weight: np.ndarray | None,
    tile_size: int,
    margin: int = 0,
    offset: tuple[int, int] = (0, 0),
) -> Iterator[dict]:
    """Tiles covering the image; with ``margin`` (overlap-tile, valid-conv presets) the
    ``tile_size - 2*margin`` output windows cover it and each tile adds the mirrored context.
    ``offset``: where the image (a region) lies in its source image; keys and origins are the
    source image's pixels, so a region's keys never repeat another region's."""
    height, width = mask.shape
    top0, left0 = offset
    if margin:
        image = np.pad(image, ((0, 0), (margin, margin), (margin, margin)), mode="symmetric")
        mask = np.pad(mask, margin, mode="symmetric")
        weight = None if weight is None else np.pad(weight, margin, mode="symmetric")
    stride = tile_size - 2 * margin
    for top in tile_origins(height, stride):
        for left in tile_origins(width, stride):
            window = (slice(top, top + tile_size), slice(left, left + tile_size))
            sample = {
                "__key__": sample_key(stem, top0 + top, left0 + left),
                "__origin__": (stem, top0 + top, left0 + left),
                "image.npy": np.ascontiguousarray(image[(slice(None), *window)]),
                "mask.npy": np.ascontiguousarray(mask[window]),
            }
            if weight is not None:
                sample["weight.npy"] = np.ascontiguousarray(weight[window])
            yield sample


# ---------------------------------------------------------------- writing


def _read(
    pair: Pair, settings: _Settings, written: _Written
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(image, stored mask, weight or None) of a pair, checked against the first image."""
    if settings.spatial_dims == 3:
        image, labels = check_volume(pair, settings.mask_kind, settings.tile_shape)
        written.spacings[pair.stem] = voxel_spacing(pair, settings.spacing)
    else:
        image, labels = check_pair(pair, settings.mask_kind, settings.tile_size - 2 * settings.context_margin)
    written.check_like_first(image, pair.stem, pair.image_where)
    weight_map = (settings.w0, settings.sigma) if settings.with_weight else None
    mask, weight = stored_mask(labels, settings.mask_kind, weight_map)
    if settings.mask_kind == "classes":  # instance ids and 0/1 are two classes
        written.max_class = max(written.max_class, int(mask.max()))
    return image, mask, weight


def _write_image(
    split: str,
    writer,
    stem: str,
    arrays: tuple[np.ndarray, np.ndarray, np.ndarray | None],
    settings: _Settings,
    written: _Written,
    region: Region | None = None,
) -> None:
    """Write one image of ``split`` (its ``region`` (y0, y1, x0, x1), or a volume's (z0, z1, y0, ...),
    only, when given): whole, or as tiles."""
    image, mask, weight = arrays
    offset = (0,) * mask.ndim
    if region is not None:
        window = tuple(slice(start, stop) for start, stop in zip(region[0::2], region[1::2], strict=True))
        image, mask = image[(slice(None), *window)], mask[window]
        weight = None if weight is None else weight[window]  # computed on the whole image first
        offset = tuple(region[0::2])
        written.regions.setdefault(split, {})[stem] = list(region)
    if settings.whole_images:
        volume = {"spacing": written.spacings[stem]} if stem in written.spacings else {}
        writer.write_image(stem, image, mask, weight, offset, **volume)
        grid = [len(tile_origins(length, tile)) for length, tile in zip(mask.shape, settings.tile_shape, strict=True)]
        written.counts[split] += math.prod(grid)  # validation's grid
        log.info("%s: %s stored whole", split, stem)
        return
    tiles = (volume_tiles(stem, image, mask, settings.tile_shape, offset) if settings.spatial_dims == 3
             else _tiles(stem, image, mask, weight, settings.tile_size, settings.context_margin, offset))  # fmt: skip
    for sample in tiles:
        writer.write(stem, sample)
        written.counts[split] += 1
    log.info("%s: %s -> %s tiles so far", split, stem, written.counts[split])


def _split_writer(split: str, out_dir: Path, settings: _Settings):
    return open_split_writer(
        settings.output_format,
        out_dir,
        split,
        shard_size=settings.shard_size,
        whole_images=settings.whole_images,
        zarr_codec=settings.zarr_codec,
    )


def _write_split(
    split: str,
    stems: list[str],
    source: PairSource,
    out_dir: Path,
    settings: _Settings,
    written: _Written,
) -> None:
    """Read, check and write every image of ``split``, adding what was written to ``written``."""
    with _split_writer(split, out_dir, settings) as writer:
        for pair in source.read(stems):
            _write_image(split, writer, pair.stem, _read(pair, settings, written), settings, written)
    # after closing: the tar writer names its last shard when it closes it
    written.shards[split], written.shard_counts[split] = list(writer.shards), list(writer.shard_counts)


def _write_regions(
    stems: list[str],
    source: PairSource,
    out_dir: Path,
    settings: _Settings,
    written: _Written,
    val_fraction: float,
) -> None:
    """Every image into both splits: its region of :func:`~unetdist.data.splits.holdout_box`
    trains, its last part validates. :class:`RegionTooSmall` names the first image that cannot."""
    window = tuple(tile - 2 * settings.context_margin for tile in settings.tile_shape)
    with ExitStack() as stack:
        writers = {split: stack.enter_context(_split_writer(split, out_dir, settings)) for split in SPLITS}
        for pair in source.read(stems):
            arrays = _read(pair, settings, written)
            shape = arrays[1].shape
            try:
                regions = holdout_box(shape, settings.tile_shape, val_fraction, window)
            except RegionTooSmall as err:
                raise RegionTooSmall(f"{pair.image_where}: {err}") from None
            for split, region in (("train", regions.train), ("val", regions.val)):
                _write_image(split, writers[split], pair.stem, arrays, settings, written, region)
            log.info("%s (%s): validates on %s, trains on %s", pair.stem, "x".join(map(str, shape)),
                     region_text(regions.val), region_text(regions.train))  # fmt: skip
    for split, writer in writers.items():
        written.shards[split], written.shard_counts[split] = list(writer.shards), list(writer.shard_counts)


def _clear(folder: Path) -> None:
    """Remove what a region split wrote to the staging folder before it fell back to splitting by image."""
    for path in folder.iterdir():
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _metadata(settings: _Settings, written: _Written, splits: dict[str, list[str]], provenance: dict) -> dict:
    """The content of dataset.json."""
    assert written.first is not None  # prepare_pairs has >= 1 image
    channels, image_dtype, _ = written.first
    return {
        MASK_KIND_KEY: settings.mask_kind,
        "format": settings.output_format,
        "train_shards": written.shards["train"],
        "val_shards": written.shards["val"],
        "train_counts": written.shard_counts["train"],
        "val_counts": written.shard_counts["val"],
        **({"store": STORE_NAME} if settings.output_format == "zarr" else {}),
        **({"layout": WHOLE_IMAGES} if settings.whole_images else {}),
        "context_margin": settings.context_margin,
        "num_train_tiles": written.counts["train"],
        "num_val_tiles": written.counts["val"],
        "tile_size": settings.tile_size,
        **(volume_metadata(settings.tile_shape, written.spacings) if settings.spatial_dims == 3 else {}),
        "in_channels": channels,
        "num_classes": written.max_class + 1,
        "image_dtype": str(image_dtype),
        "has_weight_map": settings.with_weight,
        "train_images": sorted(splits["train"]),
        "val_images": sorted(splits["val"]),
        # a region split: (y0, y1, x0, x1) of each image's part in each split
        **{f"{split}_regions": written.regions[split] for split in SPLITS if written.regions.get(split)},
        "source": provenance,
    }


def prepare_dataset(images_dir: str | Path, masks_dir: str | Path, out_dir: str | Path, **options) -> dict:
    """:func:`prepare_pairs` of the image and mask files of two folders, matched by stem
    (:class:`~unetdist.data.inputs.FolderPairs`); ``options``: those of :func:`prepare_pairs`."""
    folders = VolumePairs if options.get("spatial_dims", 2) == 3 else FolderPairs
    return prepare_pairs(folders(images_dir, masks_dir), out_dir, **options)


def prepare_pairs(
    pairs: PairSource,
    out_dir: str | Path,
    *,
    mask_kind: str = "instances",
    tile_size: int = 96,
    shard_size: int = 64,
    val_fraction: float = 0.1,
    seed: int = 0,
    w0: float = 10.0,
    sigma: float = 5.0,
    weight_map: bool = True,
    source: dict | None = None,
    output_format: str = "webdataset",
    context_margin: int = 0,
    whole_images: bool = False,
    zarr_codec: str | None = None,
    spatial_dims: int = 2,
    tile_depth: int = 0,
    spacing: Sequence[float] | None = None,
) -> dict:
    """Write tiled shards and ``dataset.json`` of the image/mask ``pairs`` (:mod:`unetdist.data.inputs`)
    to ``out_dir``; returns the dataset.json content.

    ``weight_map`` applies to instance masks only (class masks have no instances to
    separate). ``source`` is extra provenance merged into dataset.json's "source".
    ``whole_images`` (zarr only) stores each image whole, chunked in 2-D squares; training
    samples tiles from it, validation reads a fixed grid (the tile counts are the grid's).
    ``zarr_codec`` (pre-tiled zarr only) compresses the tiles; None: uncompressed, the fastest
    to read (see :mod:`unetdist.data.writers`). ``spatial_dims=3``: volumes (``pairs`` of
    :class:`~unetdist.data.volumes.VolumePairs`), whole-image Zarr or WebDataset shards of 3-D tiles,
    tiles of ``(tile_depth or tile_size, tile_size, tile_size)``, the voxel ``spacing`` (z, y, x) if
    given, else the files'.

    Validation (``val_fraction`` > 0): whole images (stacks), or, with fewer than
    :data:`~unetdist.data.splits.MIN_IMAGES_TO_SPLIT_BY_IMAGE`, the last part of every image
    (:func:`~unetdist.data.splits.holdout_regions`; dataset.json's ``val_regions`` and
    ``train_regions``). One image too small for that is an error naming it; of several, whole
    images are held out instead, as before region splits.
    """
    settings = _Settings(mask_kind, tile_size, shard_size, w0, sigma, weight_map, output_format, context_margin,
                         whole_images, zarr_codec, spatial_dims, tile_depth, None if spacing is None else tuple(spacing))  # fmt: skip
    settings.check()
    out_dir = Path(out_dir)
    items = pairs.items()
    stems = [stem for stem, _ in items]
    repeated = sorted(stem for stem, count in Counter(stems).items() if count > 1)
    if repeated:  # e.g. a file x_t0_z0.tif beside the planes of x.ome.tif
        raise PrepareError(f"image stems {repeated} appear more than once; expected one image per stem")
    if not items:
        raise PrepareError("no images to prepare")
    check_keys(stems)
    by_image = dict(zip(SPLITS, split_by_group(items, val_fraction, seed), strict=True))
    images = len({group for _, group in items})  # the planes of a stack count once

    store = out_dir / STORE_NAME
    if settings.output_format == "zarr" and store.exists() and not store.is_dir():
        raise PrepareError(f"{store}: a file where prepare writes its Zarr store; move it away")
    provenance = {
        **pairs.provenance(),
        "mask_kind": mask_kind,
        "val_fraction": val_fraction,
        "seed": seed,
        "shard_size": shard_size,
        "weight_map": {"w0": w0, "sigma": sigma} if settings.with_weight else None,
        **(source or {}),
    }
    # Stale shards of an earlier, larger run would match the shard patterns: the new data set
    # replaces prepare's own earlier output as a whole, and only once it is complete.
    with staged_output(out_dir) as staging:
        written, splits = _Written(), None
        if val_fraction > 0 and images < MIN_IMAGES_TO_SPLIT_BY_IMAGE:
            try:
                _write_regions(stems, pairs, staging, settings, written, val_fraction)
                splits = {"train": stems, "val": stems}
            except RegionTooSmall as err:
                if images == 1:
                    tile, kind = ("--tile or --tile-depth", "volume") if spatial_dims == 3 else ("--tile", "image")
                    raise RegionTooSmall(f"{err}; use a smaller {tile} or a larger {kind}") from None
                # what prepared before region splits existed still prepares as it did (info: the
                # command line's errors stay one line, and its output what it was)
                log.info("%d images (fewer than %d): a region of each would validate, but %s; holding out "
                            "whole images instead", images, MIN_IMAGES_TO_SPLIT_BY_IMAGE, err)  # fmt: skip
                _clear(staging)
                written = _Written()
        if splits is None:
            splits = by_image
            for split, split_stems in splits.items():
                if split_stems:
                    _write_split(split, split_stems, pairs, staging, settings, written)
        meta = _metadata(settings, written, splits, provenance)
        (staging / DATASET_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    return meta
