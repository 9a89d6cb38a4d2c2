"""Image/mask pairs -> tiled webdataset shards or a Zarr store, and ``dataset.json``.

Flow: list the input's images (:mod:`unetdist.data.inputs`: folders matched by stem, the
user's shards, OME-Zarr images) -> split them into train/val (by image, or by stack for the
planes of one: no tile of a val image is trained on) -> per image: read, check, weight map on
the whole image, tile -> a writer per split (:mod:`unetdist.data.writers`) -> ``dataset.json``
(written last, so its presence means the rest is complete). The names and formats written are
those of :mod:`unetdist.data.layout`; the command line is :mod:`unetdist.prepare`.

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
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from unetdist.data.imageio import PrepareError, check_keys, image_to_chw
from unetdist.data.inputs import FolderPairs, Pair, PairSource
from unetdist.data.layout import (
    CODECS,
    DATASET_JSON,
    IMAGE_DTYPES,
    STORE_NAME,
    WHOLE_IMAGES,
    grid_windows,
    sample_key,
    tile_origins,
)
from unetdist.data.staging import staged_output
from unetdist.data.writers import open_split_writer

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
# instances: cell ids (0 background), stored as 0/1 with border weights; classes: class ids
# 0-255 stored as they are; binary: 0 background, any other value (255 of a 0/255 mask) -> 1.
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

    @property
    def with_weight(self) -> bool:
        return self.weight_map and self.mask_kind == "instances"  # class masks have no instances to separate

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


def _tiles(
    stem: str, image: np.ndarray, mask: np.ndarray, weight: np.ndarray | None, tile_size: int, margin: int = 0
) -> Iterator[dict]:
    """Tiles covering the image; with ``margin`` (overlap-tile, valid-conv presets) the
    ``tile_size - 2*margin`` output windows cover it and each tile adds the mirrored context."""
    height, width = mask.shape
    if margin:
        image = np.pad(image, ((0, 0), (margin, margin), (margin, margin)), mode="symmetric")
        mask = np.pad(mask, margin, mode="symmetric")
        weight = None if weight is None else np.pad(weight, margin, mode="symmetric")
    stride = tile_size - 2 * margin
    for top in tile_origins(height, stride):
        for left in tile_origins(width, stride):
            window = (slice(top, top + tile_size), slice(left, left + tile_size))
            sample = {
                "__key__": sample_key(stem, top, left),
                "__origin__": (stem, top, left),
                "image.npy": np.ascontiguousarray(image[(slice(None), *window)]),
                "mask.npy": np.ascontiguousarray(mask[window]),
            }
            if weight is not None:
                sample["weight.npy"] = np.ascontiguousarray(weight[window])
            yield sample


# ---------------------------------------------------------------- reading and checking


def _check_pair(pair: Pair, mask_kind: str, tile_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Check one image/mask pair; returns (image [C,H,W], mask [H,W])."""
    mask, mask_path, image_path = pair.mask, pair.mask_where, pair.image_where
    if mask.dtype == bool:  # a boolean .npy mask: 0/1
        mask = mask.astype(np.uint8)
    if mask.ndim != 2:
        raise PrepareError(
            f"{mask_path}: mask must be a single-channel HxW label image, got shape {mask.shape}"
        )
    if not np.issubdtype(mask.dtype, np.integer):
        raise PrepareError(f"{mask_path}: mask must hold integer labels, got dtype {mask.dtype}")
    if mask.size and mask.min() < 0:
        raise PrepareError(f"{mask_path}: negative label {mask.min()}; labels are 0 (background) and up")
    if mask_kind == "classes" and mask.max() > 255:
        raise PrepareError(f"{mask_path}: class id {mask.max()} does not fit the uint8 class mask")
    classes_255 = mask_kind == "classes" and mask.size and mask.max() == 255
    if classes_255 and set(np.unique(mask).tolist()) <= {0, 255}:
        raise PrepareError(
            f"{mask_path}: labels 0/255, a binary mask: as class ids they would make 256 classes; "
            "binary masks are 0/1, and --mask-kind binary maps 255 -> 1"
        )

    raw = pair.image
    if raw.ndim == 2 and raw.shape != mask.shape:
        raise PrepareError(
            f"{image_path}: image size {raw.shape} differs from mask {pair.mask_name} size {mask.shape}"
        )
    image = image_to_chw(raw, mask.shape, image_path, pair.image_axes)
    if image.dtype not in IMAGE_DTYPES:
        raise PrepareError(
            f"{image_path}: image dtype {image.dtype} not supported; convert to one of "
            f"{', '.join(str(d) for d in IMAGE_DTYPES)}"
        )
    if min(mask.shape) < tile_size:
        raise PrepareError(f"{image_path}: image size {mask.shape} is smaller than the tile size {tile_size}")
    return image, mask


def _mask_and_weight(labels: np.ndarray, settings: _Settings) -> tuple[np.ndarray, np.ndarray | None]:
    """The stored uint8 class mask of a label image, and its border weight map (or None)."""
    if settings.mask_kind == "binary":
        return (labels > 0).astype(np.uint8), None
    if settings.mask_kind == "classes":
        return labels.astype(np.uint8), None
    weight = None
    if settings.with_weight:
        from unetdist.weight_map import border_weight_map

        # On the whole image: a cell just outside a tile still shapes its border weights.
        weight = border_weight_map(labels, w0=settings.w0, sigma=settings.sigma).astype(np.float32)
    return (labels > 0).astype(np.uint8), weight


# ---------------------------------------------------------------- writing


def _write_split(
    split: str,
    stems: list[str],
    source: PairSource,
    out_dir: Path,
    settings: _Settings,
    written: _Written,
) -> None:
    """Read, check and write every image of ``split``, adding what was written to ``written``."""
    tile_size, margin = settings.tile_size, settings.context_margin
    with open_split_writer(
        settings.output_format,
        out_dir,
        split,
        shard_size=settings.shard_size,
        whole_images=settings.whole_images,
        zarr_codec=settings.zarr_codec,
    ) as writer:
        for pair in source.read(stems):
            stem = pair.stem
            image, labels = _check_pair(pair, settings.mask_kind, tile_size - 2 * margin)
            written.check_like_first(image, stem, pair.image_where)
            mask, weight = _mask_and_weight(labels, settings)
            written.max_class = max(written.max_class, int(mask.max()))
            if settings.whole_images:
                writer.write_image(stem, image, mask, weight)
                written.counts[split] += len(grid_windows(*mask.shape, tile_size))  # validation's grid
                log.info("%s: %s stored whole", split, stem)
                continue
            for sample in _tiles(stem, image, mask, weight, tile_size, margin):
                writer.write(stem, sample)
                written.counts[split] += 1
            log.info("%s: %s -> %s tiles so far", split, stem, written.counts[split])
    # after closing: the tar writer names its last shard when it closes it
    written.shards[split], written.shard_counts[split] = list(writer.shards), list(writer.shard_counts)


def _metadata(settings: _Settings, written: _Written, splits: dict[str, list[str]], provenance: dict) -> dict:
    """The content of dataset.json."""
    assert written.first is not None  # prepare_pairs has >= 1 image
    channels, image_dtype, _ = written.first
    return {
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
        "in_channels": channels,
        "num_classes": written.max_class + 1,
        "image_dtype": str(image_dtype),
        "has_weight_map": settings.with_weight,
        "train_images": sorted(splits["train"]),
        "val_images": sorted(splits["val"]),
        "source": provenance,
    }


def prepare_dataset(images_dir: str | Path, masks_dir: str | Path, out_dir: str | Path, **options) -> dict:
    """:func:`prepare_pairs` of the image and mask files of two folders, matched by stem
    (:class:`~unetdist.data.inputs.FolderPairs`); ``options``: those of :func:`prepare_pairs`."""
    return prepare_pairs(FolderPairs(images_dir, masks_dir), out_dir, **options)


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
) -> dict:
    """Write tiled shards and ``dataset.json`` of the image/mask ``pairs`` (:mod:`unetdist.data.inputs`)
    to ``out_dir``; returns the dataset.json content.

    ``weight_map`` applies to instance masks only (class masks have no instances to
    separate). ``source`` is extra provenance merged into dataset.json's "source".
    ``whole_images`` (zarr only) stores each image whole, chunked in 2-D squares; training
    samples tiles from it, validation reads a fixed grid (the tile counts are the grid's).
    ``zarr_codec`` (pre-tiled zarr only) compresses the tiles; None: uncompressed, the fastest
    to read (see :mod:`unetdist.data.writers`).
    """
    settings = _Settings(
        mask_kind,
        tile_size,
        shard_size,
        w0,
        sigma,
        weight_map,
        output_format,
        context_margin,
        whole_images,
        zarr_codec,
    )
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
    train_stems, val_stems = split_by_group(items, val_fraction, seed)
    splits = {"train": train_stems, "val": val_stems}

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
        written = _Written()
        for split, split_stems in splits.items():
            if split_stems:
                _write_split(split, split_stems, pairs, staging, settings, written)
        meta = _metadata(settings, written, splits, provenance)
        (staging / DATASET_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    return meta
