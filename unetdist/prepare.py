"""``python -m unetdist.prepare``: image + mask folders -> webdataset shards or a Zarr store.

Examples::

    python -m unetdist.prepare --images raw/images --masks raw/masks --out data/cells --tile 96
    python -m unetdist.prepare --synthetic 32 --out data/toy --format zarr --whole-images

The work is :func:`unetdist.data.prepare.prepare_dataset`; this module is the command line.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from unetdist.data.imageio import PrepareError
from unetdist.data.layout import CODECS
from unetdist.data.prepare import MASK_KINDS, prepare_dataset
from unetdist.data.synthetic import write_synthetic
from unetdist.redaction import redact_log_records

__all__ = ["context_margin", "main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m unetdist.prepare",
        description="Tile images + masks into webdataset shards with a train/val split by image.",
    )
    parser.add_argument("--images", type=Path, help="folder of images (.tif/.tiff/.png)")
    parser.add_argument("--masks", type=Path, help="folder of masks, matched to images by file stem")
    parser.add_argument("--out", type=Path, required=True, help="output folder for shards and dataset.json")
    parser.add_argument(
        "--mask-kind",
        choices=MASK_KINDS,
        default="instances",
        help="instances: cell ids, 0 background (border weight map); classes: class ids 0-255; "
        "binary: 0 background, any other value (255 of a 0/255 mask) -> 1",
    )
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


def _exit_on_sigterm(signum: int, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: the partial output is removed


def main(argv: list[str] | None = None) -> int:
    """CLI entry; returns 0, 2 after a one-line error on stderr, 130 after Ctrl-C, 143 after SIGTERM.

    A failed or interrupted run leaves an earlier data set in ``--out`` as it was
    (:mod:`unetdist.data.staging`).
    """
    args = _parser().parse_args(argv)
    # force: a handler left by an earlier set-up in this process may write to a stream that is gone
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    redact_log_records()  # image folders and --out may be URLs with credentials
    if argv is None:  # the command line, not a caller's process: Slurm and kill send SIGTERM
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
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
    except (KeyboardInterrupt, SystemExit) as err:  # Ctrl-C, or SIGTERM via _exit_on_sigterm
        print(
            f"prepare: interrupted before the new data set was complete; {args.out} is as it was",
            file=sys.stderr,
        )
        return 130 if isinstance(err, KeyboardInterrupt) else int(err.code)
    print(
        f"Prepared {args.out}: {len(meta['train_images'])} train images -> {meta['num_train_tiles']} tiles in "
        f"{len(meta['train_shards'])} shard(s), {len(meta['val_images'])} val images -> {meta['num_val_tiles']} "
        f"tiles in {len(meta['val_shards'])} shard(s); {meta['tile_size']}x{meta['tile_size']} tiles, "
        f"{meta['in_channels']} channel(s) of {meta['image_dtype']}, {meta['num_classes']} classes, "
        f"weight map {'yes' if meta['has_weight_map'] else 'no'}. Metadata: {Path(args.out) / 'dataset.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
