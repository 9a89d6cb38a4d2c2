"""``python -m unetdist.prepare``: image + mask folders, the user's own shards or OME-Zarr images ->
webdataset shards or a Zarr store.

Examples::

    python -m unetdist.prepare --images raw/images --masks raw/masks --out data/cells --tile 96
    python -m unetdist.prepare --synthetic 32 --out data/toy --format zarr --whole-images
    python -m unetdist.prepare --spatial-dims 3 --images raw/stacks --masks raw/labels --out data/nuclei3d \
        --format zarr --whole-images --tile 64 --tile-depth 16
    python -m unetdist.prepare --synthetic 8 --spatial-dims 3 --image-size 64 --depth-size 48 --spacing 4,1,1 \
        --out data/toy3d --format zarr --whole-images
    python -m unetdist.prepare --images raw/images --masks raw/masks --out s3://bucket/cells
    python -m unetdist.prepare --from-shards 'raw/cells-{000..009}.tar' --image-key png --mask-key seg.png \\
        --out data/cells
    python -m unetdist.prepare --from-ome-zarr raw/a.ome.zarr raw/b.ome.zarr --labels nuclei --out data/nuclei
    python -m unetdist.prepare --spatial-dims 3 --from-ome-zarr raw/embryo.ome.zarr --labels nuclei \
        --out data/embryo --format zarr --whole-images --tile 64 --tile-depth 16
    python -m unetdist.prepare index 's3://bucket/other/train-{000000..000099}.tar'

The work is :func:`unetdist.data.prepare.prepare_pairs`, over the inputs of
:mod:`unetdist.data.inputs`; this module is the command line. An
``--out`` URL is prepared in a local temporary folder and uploaded, ``dataset.json`` last
(:mod:`unetdist.data.upload`). ``--spatial-dims 3`` prepares volumes (:mod:`unetdist.data.volumes`)
into a whole-volume Zarr store. ``index`` writes ``SHARD.index.json`` beside tar shards made
elsewhere (prepare writes it beside its own): remote shards are read by their index.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
from pathlib import Path

from unetdist.data.imageio import PrepareError
from unetdist.data.inputs import FolderPairs, NgffPairs, PairSource, ShardPairs
from unetdist.data.layout import CODECS, DATASET_JSON
from unetdist.data.prepare import MASK_KINDS, prepare_pairs
from unetdist.data.remote import display, is_remote, join, local_path
from unetdist.data.samples import DataError
from unetdist.data.splits import MIN_IMAGES_TO_SPLIT_BY_IMAGE, region_text
from unetdist.data.synthetic import write_synthetic, write_synthetic_volumes
from unetdist.data.upload import index_shard, remote_output
from unetdist.data.volumes import NgffVolumePairs, VolumePairs, check_volume_settings
from unetdist.redaction import redact_log_records

__all__ = ["context_margin", "main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m unetdist.prepare",
        description="Tile images + masks (folders, WebDataset shards or OME-Zarr images) into webdataset "
        "shards or a Zarr store, with a train/val split by image (by region of each image for few images).",
    )
    parser.add_argument(
        "--images",
        type=Path,
        help="folder of images (.tif/.tiff/.png; an OME-TIFF x.ome.tif by its axes, one image per T/Z plane)",
    )
    parser.add_argument("--masks", type=Path, help="folder of masks, matched to images by file stem")
    parser.add_argument(
        "--from-shards",
        metavar="PATTERN",
        help="instead of folders: WebDataset tar shards, a brace pattern of paths or URLs "
        "('raw/cells-{000..009}.tar'); each sample is one image",
    )
    parser.add_argument(
        "--image-key",
        help="with --from-shards: the image member's name after the sample key, as data.image_key "
        "(default image: KEY.image.npy|png|tif|tiff; png: KEY.png)",
    )
    parser.add_argument(
        "--mask-key",
        help="with --from-shards: the mask member's name after the key (default mask, e.g. seg.png)",
    )
    parser.add_argument(
        "--from-ome-zarr",
        nargs="+",
        metavar="URL",
        help="instead of folders: OME-Zarr (NGFF 0.4/0.5) images, paths or URLs; each t/z plane is one image "
        "(--spatial-dims 3: each t one volume, its spacing the level's NGFF scale)",
    )
    parser.add_argument("--labels", metavar="NAME", help="with --from-ome-zarr: the label image labels/NAME")
    parser.add_argument("--level", type=int, help="with --from-ome-zarr: the resolution level (default 0)")
    parser.add_argument(
        "--channels", metavar="I,J", help="with --from-ome-zarr: channel indices to keep (default all)"
    )
    parser.add_argument(
        "--out",
        required=True,
        help="output folder for shards and dataset.json, or a URL (s3://, gs://, az://): prepared in a "
        "temporary folder under TMPDIR (room for the whole data set), then uploaded, dataset.json last",
    )
    parser.add_argument(
        "--mask-kind",
        choices=MASK_KINDS,
        default="instances",
        help="instances: cell ids, 0 background, stored as ids (uint16/uint32) with a border weight map "
        "(2-D; volumes store none: the loader computes it); "
        "classes: class ids 0-255; binary: 0 background, any other value (255 of a 0/255 mask) -> 1",
    )
    parser.add_argument("--tile", type=int, default=96, help="tile size in pixels")
    parser.add_argument("--shard-size", type=int, default=64, help="tiles per shard")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="fraction of IMAGES held out (of stacks, for their planes); with fewer than "
        f"{MIN_IMAGES_TO_SPLIT_BY_IMAGE} images, the last part of each image along its longer axis "
        "(at least a tile, half a tile apart from its training part; of a volume, along the axis of most tiles)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--w0", type=float, default=10.0, help="border weight amplitude (U-Net paper)")
    parser.add_argument("--sigma", type=float, default=5.0, help="border weight width in pixels")
    parser.add_argument("--no-weight-map", action="store_true", help="skip the border weight map")
    parser.add_argument(
        "--synthetic", type=int, metavar="N", help="generate N toy images first (ignores --images/--masks)"
    )
    parser.add_argument(
        "--image-size", type=int, help="size of the --synthetic images (default 256; volumes: 64 in y and x)"
    )
    parser.add_argument(
        "--depth-size", type=int, help="with --synthetic and --spatial-dims 3: planes per volume (default --image-size)"
    )
    parser.add_argument(
        "--spatial-dims",
        type=int,
        choices=(2, 3),
        default=2,
        help="3: the images are volumes, TIFF stacks (z, y, x) or (z, c, y, x) or .npy, with 3-D masks; "
        "stored as --format webdataset shards of (--tile-depth, --tile, --tile) tiles, or whole with "
        "--format zarr --whole-images",
    )
    parser.add_argument(
        "--tile-depth",
        type=int,
        default=0,
        help="with --spatial-dims 3: planes of a tile, (tile_depth, tile, tile); 0: --tile, a cube",
    )
    parser.add_argument(
        "--spacing",
        metavar="Z,Y,X",
        help="with --spatial-dims 3: the voxel size, over the files' metadata (ImageJ, OME-TIFF; else 1,1,1); "
        "with --synthetic it shapes the volumes (4,1,1: a coarse z)",
    )
    parser.add_argument(
        "--format",
        choices=("webdataset", "zarr"),
        default="webdataset",
        help="tar shards, or one Zarr v3 store (data.zarr, ~1 MiB chunks of whole tiles)",
    )
    parser.add_argument(
        "--whole-images",
        action="store_true",
        help="with --format zarr: store whole images in 256x256 chunks; training samples "
        "data.tiles_per_image random tiles per image, validation a fixed grid",
    )
    parser.add_argument(
        "--zarr-codec",
        choices=CODECS,
        help="with --format zarr (tiles): compress the tiles; default none, the fastest to read "
        "(lz4 and zstd save disk and cost reading time: see unetdist/data/writers.py)",
    )
    parser.add_argument(
        "--context-for",
        metavar="PRESET[:DEPTH]",
        help="overlap-tile: store --tile inputs whose valid-conv output windows cover the "
        "image, with mirrored context (e.g. paper, paper:4, article:3)",
    )
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


def _index_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m unetdist.prepare index",
        description="Write SHARD.index.json beside each tar shard (member names, offsets, sizes, shard size "
        "and sha256), for shards that prepare did not write: remote shards are read by their index.",
    )
    parser.add_argument(
        "shards",
        nargs="+",
        metavar="SHARD",
        help="a tar shard: a path or a URL (s3://, gs://, az://, https://), or a brace pattern of them "
        "('s3://bucket/cells/train-{000000..000009}.tar'); a remote shard is downloaded once to index it",
    )
    return parser


def _exit_on_sigterm(signum: int, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: the partial output is removed


def _set_up_logging() -> None:
    # force: a handler left by an earlier set-up in this process may write to a stream that is gone
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    redact_log_records()  # image folders, --out and shards may be URLs with credentials


def _inputs(args: argparse.Namespace, out_dir: Path) -> tuple[PairSource, dict]:
    """The image/mask pairs the options name, and extra provenance for dataset.json."""
    folders = args.synthetic is None and (args.images or args.masks)  # --synthetic N writes its own
    inputs = {
        "--images/--masks": folders,
        "--synthetic": args.synthetic is not None,
        "--from-shards": args.from_shards,
        "--from-ome-zarr": args.from_ome_zarr,
    }
    given = [name for name, value in inputs.items() if value]
    if len(given) > 1:
        raise PrepareError(f"give one input, not {' and '.join(given)}")
    companions = {
        "--from-shards": {"--image-key": args.image_key, "--mask-key": args.mask_key},
        "--from-ome-zarr": {"--labels": args.labels, "--level": args.level, "--channels": args.channels},
    }
    for needs, options in companions.items():
        for option, value in options.items():
            if value is not None and needs not in given:
                raise PrepareError(f"{option} goes with {needs}")
    if args.spatial_dims == 3 and args.from_shards:
        raise PrepareError("--spatial-dims 3 reads volumes from --images/--masks, --from-ome-zarr or --synthetic, "
                           "not --from-shards yet")  # fmt: skip
    volumes = args.spatial_dims == 3
    folders = VolumePairs if volumes else FolderPairs
    if args.synthetic is not None:
        if volumes:
            size, depth = args.image_size or 64, args.depth_size or args.image_size or 64
            spacing = _spacing(args.spacing) or (1.0, 1.0, 1.0)
            images_dir, masks_dir = write_synthetic_volumes(out_dir, args.synthetic, size, depth, args.seed, spacing)
            source = {"synthetic": {"count": args.synthetic, "image_size": size, "depth_size": depth,
                                    "spacing": list(spacing)}}  # fmt: skip
        else:
            size = args.image_size or 256
            images_dir, masks_dir = write_synthetic(out_dir, args.synthetic, size, args.seed)
            source = {"synthetic": {"count": args.synthetic, "image_size": size}}
        if is_remote(args.out):  # uploaded with the data set: named where they will be, not where made
            raw = display(join(args.out, "raw"))
            raw = join(raw, "volumes") if volumes else raw
            source.update(images=join(raw, "images"), masks=join(raw, "masks"))
        return folders(images_dir, masks_dir), source
    if args.from_shards:
        return ShardPairs(args.from_shards, args.image_key or "image", args.mask_key or "mask"), {}
    if args.from_ome_zarr:
        ngff = NgffVolumePairs if volumes else NgffPairs  # volumes: each (image, t) one [C, Z, Y, X] volume
        return ngff(args.from_ome_zarr, args.labels, args.level or 0, _channels(args.channels)), {}
    if args.images is None or args.masks is None:
        raise PrepareError(
            "give --images and --masks, --from-shards PATTERN, --from-ome-zarr URL..., or --synthetic N"
        )
    return folders(args.images, args.masks), {}


def _spacing(text: str | None) -> tuple[float, float, float] | None:
    """``--spacing z,y,x`` as three positive numbers."""
    if text is None:
        return None
    try:
        sizes = tuple(float(size) for size in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or not all(size > 0 for size in sizes):
        raise PrepareError(f"--spacing {text}: expected three positive voxel sizes z,y,x, e.g. 4,1,1")
    return sizes


def _channels(text: str | None) -> list[int] | None:
    try:
        return None if text is None else [int(index) for index in text.split(",")]
    except ValueError:
        raise PrepareError(f"--channels {text}: expected channel indices, e.g. 0 or 0,2") from None


def _prepare(args: argparse.Namespace, out_dir: Path) -> dict:
    """Prepare into the local folder ``out_dir`` (``--out``, or a URL's temporary folder); dataset.json's
    content."""
    # before any --synthetic volumes are written: a refusal costs nothing
    whole_zarr = args.format == "zarr" and args.whole_images
    check_volume_settings(args.spatial_dims, whole_zarr, args.tile_depth, _spacing(args.spacing),
                          webdataset=args.format == "webdataset", context_margin=1 if args.context_for else 0)
    pairs, source = _inputs(args, out_dir)
    with pairs:  # shards at URLs are downloaded to a temporary folder, removed here
        return prepare_pairs(
            pairs,
            out_dir,
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
            spatial_dims=args.spatial_dims,
            tile_depth=args.tile_depth,
            spacing=_spacing(args.spacing),
        )


def index_main(argv: list[str]) -> int:
    """``python -m unetdist.prepare index SHARD...``: 0, or 2 after a one-line error on stderr (the
    first shard that cannot be indexed: not a tar file, missing, no access); 130 after Ctrl-C."""
    import braceexpand

    args = _index_parser().parse_args(argv)
    _set_up_logging()
    try:
        for pattern in args.shards:
            for shard in braceexpand.braceexpand(pattern):
                document = index_shard(shard)
                samples, size = len(document["samples"]), document["size"]
                print(f"indexed {display(shard)}: {samples} samples, {size} bytes")
    except (DataError, OSError) as err:
        print(f"prepare index: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prepare index: interrupted", file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry; returns 0, 2 after a one-line error on stderr, 130 after Ctrl-C, 143 after SIGTERM.

    A failed or interrupted run leaves an earlier data set in a local ``--out`` as it was
    (:mod:`unetdist.data.staging`); at a URL it uploads no dataset.json (:mod:`unetdist.data.upload`).
    ``index`` as the first argument: :func:`index_main`.
    """
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["index"]:
        return index_main(arguments[1:])
    args = _parser().parse_args(arguments)
    _set_up_logging()
    if argv is None:  # the command line, not a caller's process: Slurm and kill send SIGTERM
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    remote = is_remote(args.out)
    output = remote_output(args.out) if remote else contextlib.nullcontext(Path(local_path(args.out)))
    try:
        with output as out_dir:
            meta = _prepare(args, out_dir)
    except (PrepareError, DataError, OSError) as err:
        print(f"prepare: error: {err}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit) as err:  # Ctrl-C, or SIGTERM via _exit_on_sigterm
        left = f"no dataset.json uploaded to {display(args.out)}" if remote else f"{args.out} is as it was"
        print(f"prepare: interrupted before the new data set was complete; {left}", file=sys.stderr)
        return 130 if isinstance(err, KeyboardInterrupt) else int(err.code)
    metadata = display(join(args.out, DATASET_JSON)) if remote else Path(local_path(args.out)) / DATASET_JSON
    train, val = (f"{len(meta[f'{split}_images'])} {split} images -> {meta[f'num_{split}_tiles']} tiles in "
                  f"{len(meta[f'{split}_shards'])} shard(s)" for split in ("train", "val"))  # fmt: skip
    lengths = ([meta["tile_depth"]] if "tile_depth" in meta else []) + [meta["tile_size"]] * 2
    tile = "x".join(map(str, lengths))
    spacing = f", spacing {','.join(f'{size:g}' for size in meta['spacing'])} (z,y,x)" if "spacing" in meta else ""
    print(
        f"Prepared {display(args.out)}: {train}, {val}; {tile} tiles{spacing}, "
        f"{meta['in_channels']} channel(s) of {meta['image_dtype']}, {meta['num_classes']} classes, "
        f"weight map {'yes' if meta['has_weight_map'] else 'no'}. Metadata: {metadata}"
    )
    for stem, region in meta.get("val_regions", {}).items():  # a region split: say where validation is
        trained = meta["train_regions"][stem]
        print(f"  {stem}: validates on {region_text(region)}, trains on {region_text(trained)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
