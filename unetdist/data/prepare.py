"""Image + mask folders -> tiled webdataset shards and ``dataset.json`` (``python -m unetdist.prepare``).

Flow: match files by stem -> split images into train/val (by image, so no tile of a val
image is trained on) -> per image: read, check, weight map on the whole image, tile ->
``train-%06d.tar`` / ``val-%06d.tar`` shards -> ``dataset.json`` (written last, so its
presence means the shards are complete).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from unetdist.data.zarr import CODECS as ZARR_CODECS

log = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".tif", ".tiff", ".png")
IMAGE_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))
SHARD_PATTERNS = {"train": "train-%06d.tar", "val": "val-%06d.tar"}
_OWN_SHARD_NAME = re.compile(r"^(train|val)-\d{6}\.tar$")
STORE_NAME = "data.zarr"


class PrepareError(ValueError):
    """Bad input to prepare: the message names the file(s) and what was expected."""


# ---------------------------------------------------------------- pure helpers


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


def sample_key(stem: str, top: int, left: int) -> str:
    """``{stem}_y{Y}_x{X}``; webdataset cuts a key at its first dot, so dots in stems become '_'."""
    return f"{stem.replace('.', '_')}_y{top}_x{left}"


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


# ---------------------------------------------------------------- reading and checking


def read_array(path: Path) -> np.ndarray:
    """A TIFF (tifffile) or PNG (PIL) as a numpy array, dtype kept."""
    try:
        if path.suffix.lower() == ".png":
            from PIL import Image

            with Image.open(path) as picture:
                return np.asarray(picture)
        import tifffile

        return tifffile.imread(path)
    except Exception as err:
        raise PrepareError(f"{path}: cannot read image: {err}") from err


def _list_by_stem(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise PrepareError(f"{folder}: not a folder")
    by_stem: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            log.warning("skipping %s: not one of %s", path, ", ".join(SUPPORTED_SUFFIXES))
            continue
        if path.stem in by_stem:
            raise PrepareError(
                f"{folder}: two files with stem {path.stem!r}: {by_stem[path.stem].name}, {path.name}"
            )
        by_stem[path.stem] = path
    return by_stem


def match_by_stem(images_dir: Path, masks_dir: Path) -> list[tuple[str, Path, Path]]:
    """(stem, image, mask) for every stem, sorted; any file without a partner is an error."""
    images, masks = _list_by_stem(images_dir), _list_by_stem(masks_dir)
    images_only = sorted(set(images) - set(masks))
    masks_only = sorted(set(masks) - set(images))
    if images_only or masks_only:
        raise PrepareError(
            "images and masks must match by file stem; "
            f"without a mask in {masks_dir}: {[images[s].name for s in images_only]}; "
            f"without an image in {images_dir}: {[masks[s].name for s in masks_only]}"
        )
    if not images:
        raise PrepareError(f"{images_dir}: no {'/'.join(SUPPORTED_SUFFIXES)} images found")
    keys: dict[str, str] = {}
    for stem in images:
        clash = keys.setdefault(sample_key(stem, 0, 0), stem)
        if clash != stem:
            raise PrepareError(f"stems {clash!r} and {stem!r} give the same shard key once dots become '_'")
    return [(stem, images[stem], masks[stem]) for stem in sorted(images)]


def image_to_chw(image: np.ndarray, mask_shape: tuple[int, ...], path: Path) -> np.ndarray:
    """[C, H, W]: 2-D -> C=1; channels-last (RGB PNG, most TIFFs) -> transposed.

    The mask's HxW decides which axis holds the channels.
    """
    if image.ndim == 2:
        return image[None]
    if image.ndim == 3:
        if image.shape[1:] == tuple(mask_shape):
            return image
        if image.shape[:2] == tuple(mask_shape):
            return np.ascontiguousarray(image.transpose(2, 0, 1))
    raise PrepareError(
        f"{path}: image shape {image.shape} does not match its mask's size {tuple(mask_shape)} "
        "(expected HxW, CxHxW or HxWxC)"
    )


def _load_pair(
    image_path: Path, mask_path: Path, mask_kind: str, tile_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Read and check one image/mask pair; returns (image [C,H,W], mask [H,W])."""
    mask = read_array(mask_path)
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

    raw = read_array(image_path)
    if raw.ndim == 2 and raw.shape != mask.shape:
        raise PrepareError(
            f"{image_path}: image size {raw.shape} differs from mask {mask_path.name} size {mask.shape}"
        )
    image = image_to_chw(raw, mask.shape, image_path)
    if image.dtype not in IMAGE_DTYPES:
        raise PrepareError(
            f"{image_path}: image dtype {image.dtype} not supported; convert to one of "
            f"{', '.join(str(d) for d in IMAGE_DTYPES)}"
        )
    if min(mask.shape) < tile_size:
        raise PrepareError(f"{image_path}: image size {mask.shape} is smaller than the tile size {tile_size}")
    return image, mask


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


# ---------------------------------------------------------------- writing


class _TarSplitWriter:
    """Tiles -> ``<split>-%06d.tar`` shards; records each shard's name and sample count."""

    def __init__(self, out_dir: Path, split: str, shard_size: int, names: list[str], shard_counts: list[int]) -> None:
        import webdataset as wds

        self.shard_counts, self.in_shard = shard_counts, 0

        def finished(name: str) -> None:
            names.append(Path(name).name)
            shard_counts.append(self.in_shard)
            self.in_shard = 0

        self.writer = wds.ShardWriter(str(out_dir / SHARD_PATTERNS[split]), maxcount=shard_size, verbose=0, post=finished)

    def write(self, stem: str, sample: dict) -> None:
        self.writer.write({key: value for key, value in sample.items() if key != "__origin__"})
        self.in_shard += 1

    def __enter__(self) -> _TarSplitWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.writer.close()


class _ZarrSplitWriter:
    def __init__(self, out_dir: Path, split: str, codec: str | None = None) -> None:
        from unetdist.data.zarr import DEFAULT_CODEC, ZarrWriter

        self.writer = ZarrWriter(out_dir / STORE_NAME, split, codec=codec or DEFAULT_CODEC)

    def write(self, stem: str, sample: dict) -> None:
        _, top, left = sample["__origin__"]
        self.writer.write(stem, top, left, sample["image.npy"], sample["mask.npy"], sample.get("weight.npy"))

    def __enter__(self) -> _ZarrSplitWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.writer.close()


class _ZarrImageSplitWriter(_ZarrSplitWriter):
    """Whole images (``--whole-images``): tiles are sampled from them when training."""

    def __init__(self, out_dir: Path, split: str) -> None:
        from unetdist.data.zarr_images import ZarrImageWriter

        self.writer = ZarrImageWriter(out_dir / STORE_NAME, split)

    def write_image(self, stem: str, image: np.ndarray, mask: np.ndarray, weight: np.ndarray | None) -> None:
        self.writer.write_image(stem, image, mask, weight)


def _writer(output_format, out_dir, split, shard_size, shards, shard_counts, counts, whole_images=False, zarr_codec=None):
    if whole_images:
        return _ZarrImageSplitWriter(out_dir, split)
    if output_format == "zarr":
        return _ZarrSplitWriter(out_dir, split, zarr_codec)
    return _TarSplitWriter(out_dir, split, shard_size, shards[split], shard_counts[split])


def _remove_previous_output(out_dir: Path) -> None:
    """Stale shards from an earlier, larger run would otherwise match shard patterns."""
    for path in out_dir.iterdir():
        if path.name == STORE_NAME and path.is_dir():
            log.info("removing previous output %s", path)
            shutil.rmtree(path)
        elif _OWN_SHARD_NAME.match(path.name) or path.name == "dataset.json":
            log.info("removing previous output %s", path)
            path.unlink()


def prepare_dataset(
    images_dir: str | Path,
    masks_dir: str | Path,
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
    """Write tiled shards and ``dataset.json`` to ``out_dir``; returns the dataset.json content.

    ``weight_map`` applies to instance masks only (class masks have no instances to
    separate). ``source`` is extra provenance merged into dataset.json's "source".
    ``whole_images`` (zarr only) stores each image whole, chunked in 2-D squares; training
    samples tiles from it, validation reads a fixed grid (the tile counts are the grid's).
    ``zarr_codec`` (pre-tiled zarr only) compresses the tiles; None: uncompressed, the fastest
    to read (see :mod:`unetdist.data.zarr`).
    """
    from unetdist.weight_map import border_weight_map

    if mask_kind not in ("instances", "classes"):
        raise PrepareError(f"mask kind must be 'instances' or 'classes', got {mask_kind!r}")
    if output_format not in ("webdataset", "zarr"):
        raise PrepareError(f"format must be 'webdataset' or 'zarr', got {output_format!r}")
    if whole_images and (output_format != "zarr" or context_margin):
        raise PrepareError("--whole-images needs --format zarr and no --context-for")
    if zarr_codec is not None and (output_format != "zarr" or whole_images or zarr_codec not in ZARR_CODECS):
        raise PrepareError(f"--zarr-codec {zarr_codec}: needs --format zarr without --whole-images, "
                           f"and one of {', '.join(ZARR_CODECS)}")
    if context_margin < 0 or tile_size - 2 * context_margin <= 0:
        raise PrepareError(f"context margin {context_margin} leaves no output window in a {tile_size} tile")
    if tile_size <= 0 or shard_size <= 0:
        raise PrepareError(f"tile size and shard size must be positive, got {tile_size} and {shard_size}")
    if weight_map and (sigma <= 0 or w0 < 0):
        raise PrepareError(f"weight map needs sigma > 0 and w0 >= 0, got sigma={sigma}, w0={w0}")
    images_dir, masks_dir, out_dir = Path(images_dir), Path(masks_dir), Path(out_dir)
    pairs = {stem: (image, mask) for stem, image, mask in match_by_stem(images_dir, masks_dir)}
    train_stems, val_stems = split_by_image(sorted(pairs), val_fraction, seed)
    with_weight = weight_map and mask_kind == "instances"

    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_previous_output(out_dir)
    shards: dict[str, list[str]] = {"train": [], "val": []}
    counts = {"train": 0, "val": 0}
    shard_counts: dict[str, list[int]] = {"train": [], "val": []}
    channels: tuple[int, str] | None = None  # (channels, stem) of the first image
    image_dtype: np.dtype | None = None
    max_class = 1
    for split, stems in (("train", train_stems), ("val", val_stems)):
        if not stems:
            continue
        with _writer(output_format, out_dir, split, shard_size, shards, shard_counts, counts, whole_images,
                     zarr_codec) as writer:
            for stem in stems:
                image_path, mask_path = pairs[stem]
                image, labels = _load_pair(image_path, mask_path, mask_kind, tile_size - 2 * context_margin)
                if channels is None:
                    channels, image_dtype = (image.shape[0], stem), image.dtype
                elif image.shape[0] != channels[0] or image.dtype != image_dtype:
                    raise PrepareError(
                        f"{image_path}: {image.shape[0]} channel(s) of {image.dtype}, but {channels[1]} has "
                        f"{channels[0]} of {image_dtype}; all images must agree"
                    )
                weight = None
                if mask_kind == "instances":
                    if with_weight:
                        # On the whole image: a cell just outside a tile still shapes its border weights.
                        weight = border_weight_map(labels, w0=w0, sigma=sigma).astype(np.float32)
                    mask = (labels > 0).astype(np.uint8)
                else:
                    mask = labels.astype(np.uint8)
                max_class = max(max_class, int(mask.max()))
                if whole_images:
                    writer.write_image(stem, image, mask, weight)
                    counts[split] += len(tile_origins(mask.shape[0], tile_size)) * len(tile_origins(mask.shape[1], tile_size))
                    log.info("%s: %s stored whole", split, stem)
                    continue
                for sample in _tiles(stem, image, mask, weight, tile_size, context_margin):
                    writer.write(stem, sample)
                    counts[split] += 1
                log.info("%s: %s -> %s tiles so far", split, stem, counts[split])

    assert channels is not None and image_dtype is not None  # match_by_stem found >= 1 image
    meta = {
        "format": output_format,
        "train_shards": shards["train"],
        "val_shards": shards["val"],
        "train_counts": shard_counts["train"],
        "val_counts": shard_counts["val"],
        **({"store": STORE_NAME} if output_format == "zarr" else {}),
        **({"layout": "whole-images"} if whole_images else {}),
        "context_margin": context_margin,
        "num_train_tiles": counts["train"],
        "num_val_tiles": counts["val"],
        "tile_size": tile_size,
        "in_channels": channels[0],
        "num_classes": max_class + 1,
        "image_dtype": str(image_dtype),
        "has_weight_map": with_weight,
        "train_images": sorted(train_stems),
        "val_images": sorted(val_stems),
        "source": {
            "images": str(images_dir.resolve()),
            "masks": str(masks_dir.resolve()),
            "mask_kind": mask_kind,
            "val_fraction": val_fraction,
            "seed": seed,
            "shard_size": shard_size,
            "weight_map": {"w0": w0, "sigma": sigma} if with_weight else None,
            **(source or {}),
        },
    }
    temporary = out_dir / "dataset.json.tmp"
    temporary.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(temporary, out_dir / "dataset.json")
    return meta


def write_synthetic(out_dir: str | Path, count: int, image_size: int, seed: int) -> tuple[Path, Path]:
    """``count`` toy images + instance masks as TIFFs under ``out_dir/raw``; returns (images, masks) dirs."""
    import tifffile

    from unetdist.data.synthetic import synthetic_cells

    if count <= 0:
        raise PrepareError(f"--synthetic needs a positive number of images, got {count}")
    if image_size < 16:
        raise PrepareError(f"--image-size must be at least 16 pixels, got {image_size}")
    images_dir, masks_dir = Path(out_dir) / "raw" / "images", Path(out_dir) / "raw" / "masks"
    images_dir.mkdir(parents=True, exist_ok=True)
    masks_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        image, instances = synthetic_cells(image_size, rng)
        tifffile.imwrite(images_dir / f"cells_{index:04d}.tif", image)
        tifffile.imwrite(masks_dir / f"cells_{index:04d}.tif", instances)
    return images_dir, masks_dir


# ---------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m unetdist.prepare",
        description="Tile images + masks into webdataset shards with a train/val split by image.",
    )
    parser.add_argument("--images", type=Path, help="folder of images (.tif/.tiff/.png)")
    parser.add_argument("--masks", type=Path, help="folder of masks, matched to images by file stem")
    parser.add_argument("--out", type=Path, required=True, help="output folder for shards and dataset.json")
    parser.add_argument("--mask-kind", choices=("instances", "classes"), default="instances")
    parser.add_argument("--tile", type=int, default=96, help="tile size in pixels")
    parser.add_argument("--shard-size", type=int, default=64, help="tiles per shard")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="fraction of IMAGES held out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--w0", type=float, default=10.0, help="border weight amplitude (U-Net paper)")
    parser.add_argument("--sigma", type=float, default=5.0, help="border weight width in pixels")
    parser.add_argument("--no-weight-map", action="store_true", help="skip the border weight map")
    parser.add_argument(
        "--synthetic", type=int, metavar="N", help="generate N toy images first (ignores --images/--masks)"
    )
    parser.add_argument("--image-size", type=int, default=256, help="size of the --synthetic images")
    parser.add_argument("--format", choices=("webdataset", "zarr"), default="webdataset",
                        help="tar shards, or one Zarr v3 store (data.zarr, ~1 MiB chunks of whole tiles)")
    parser.add_argument("--whole-images", action="store_true",
                        help="with --format zarr: store whole images in 256x256 chunks; training samples "
                             "data.tiles_per_image random tiles per image, validation a fixed grid")
    parser.add_argument("--zarr-codec", choices=ZARR_CODECS,
                        help="with --format zarr (tiles): compress the tiles; default none, the fastest to read "
                             "(lz4 and zstd save disk and cost reading time: see unetdist/data/zarr.py)")
    parser.add_argument("--context-for", metavar="PRESET[:DEPTH]",
                        help="overlap-tile: store --tile inputs whose valid-conv output windows cover the "
                             "image, with mirrored context (e.g. paper, paper:4, article:3)")
    return parser


def context_margin(spec: str | None, tile_size: int) -> int:
    """Context margin (pixels per side) that a valid-conv model consumes from a ``tile_size`` input."""
    if not spec:
        return 0
    from unetdist.model import default_depth, output_size

    preset, _, depth_text = spec.partition(":")
    try:
        depth = int(depth_text) if depth_text else default_depth(preset)
        return (tile_size - output_size(preset, depth, tile_size)) // 2
    except ValueError as err:
        raise PrepareError(f"--context-for {spec} with --tile {tile_size}: {err}") from None


def main(argv: list[str] | None = None) -> int:
    """CLI entry; returns 0, or 2 after a one-line error on stderr."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        source: dict = {}
        if args.synthetic is not None:
            images_dir, masks_dir = write_synthetic(args.out, args.synthetic, args.image_size, args.seed)
            source = {"synthetic": {"count": args.synthetic, "image_size": args.image_size}}
        elif args.images is None or args.masks is None:
            raise PrepareError("give --images and --masks, or --synthetic N")
        else:
            images_dir, masks_dir = args.images, args.masks
        meta = prepare_dataset(
            images_dir,
            masks_dir,
            args.out,
            mask_kind=args.mask_kind,
            tile_size=args.tile,
            shard_size=args.shard_size,
            val_fraction=args.val_fraction,
            seed=args.seed,
            w0=args.w0,
            sigma=args.sigma,
            weight_map=not args.no_weight_map,
            source=source,
            output_format=args.format,
            context_margin=context_margin(args.context_for, args.tile),
            whole_images=args.whole_images,
            zarr_codec=args.zarr_codec,
        )
    except (PrepareError, OSError) as err:
        print(f"prepare: error: {err}", file=sys.stderr)
        return 2
    print(
        f"Prepared {args.out}: {len(meta['train_images'])} train images -> {meta['num_train_tiles']} tiles in "
        f"{len(meta['train_shards'])} shard(s), {len(meta['val_images'])} val images -> {meta['num_val_tiles']} "
        f"tiles in {len(meta['val_shards'])} shard(s); {meta['tile_size']}x{meta['tile_size']} tiles, "
        f"{meta['in_channels']} channel(s) of {meta['image_dtype']}, {meta['num_classes']} classes, "
        f"weight map {'yes' if meta['has_weight_map'] else 'no'}. Metadata: {Path(args.out) / 'dataset.json'}"
    )
    return 0
