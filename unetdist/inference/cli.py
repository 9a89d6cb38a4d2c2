"""``python -m unetdist.predict``: segment image files or Zarr arrays with a trained U-Net.

    python -m unetdist.predict --model runs/quickstart --input images/ --output preds/ [--instances]
    python -m unetdist.predict --model runs:/<run_id>/model --input big.zarr --output preds/ --block 2048
    torchrun --nproc_per_node=2 -m unetdist.predict --model ckpt.pt --input big.zarr --output preds/
    python -m unetdist.predict --model ckpt.pt --input s3://bucket/big.zarr --output s3://bucket/preds/

Inputs: image files (.tif/.tiff/.png), folders of them, and Zarr arrays ([H, W] or [C, H, W])
or groups of arrays. For each image ``<stem>``, in ``--output``: ``<stem>_mask.tif`` (uint8
class labels), with ``--probabilities`` ``<stem>_prob.tif`` (float16 [K, H, W]), with
``--instances`` ``<stem>_instances.tif`` (uint16/uint32); a Zarr input gives
``<stem>_mask.zarr`` (and ``<stem>_prob.zarr``), written block by block.

``--input`` and ``--output`` may be URLs (``s3://``, ``gs://``, ``az://``, ``https://``; credentials
from the environment only, see :mod:`unetdist.data.remote`): a Zarr store at a URL is read, and
outputs are written there, through zarr's ``ObjectStore``. A URL input must end in ``.zarr`` or
hold ``zarr.json``; image files at URLs are refused (copy them here first).

Under torchrun the ranks split the files, and every Zarr image's blocks; the output equals
a single process's. A file that cannot be predicted (unreadable, wrong channel count) is
named and skipped; the run goes on and exits 2 at the end, listing the failures. Exit
codes: 0 done; 2 bad model or input; 1 any other failure.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unetdist import distributed
from unetdist.data import remote
from unetdist.data.imageio import SUPPORTED_SUFFIXES, read_array
from unetdist.inference.engine import (
    ChannelStats,
    InputError,
    TilePredictor,
    as_chw,
    labels_from_probabilities,
)
from unetdist.inference.loading import ModelLoadError, load_model
from unetdist.inference.zarr_io import (
    DEFAULT_BLOCK,
    FailedElsewhere,
    location_name,
    one_line,
    open_zarr_inputs,
    predict_zarr,
)
from unetdist.instances import DEFAULT_MIN_DISTANCE, instances_from_labels
from unetdist.precision import PRECISIONS

log = logging.getLogger("unetdist.predict")
ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup")  # v3, then v2 array and group


@dataclass(frozen=True)
class InputItem:
    stem: str
    path: str  # a local path or a URL
    is_zarr: bool

    @property
    def shown(self) -> str:
        """The path or URL for messages (a URL without its query string)."""
        return remote.display(self.path)


def is_zarr_path(path: Path) -> bool:
    return path.suffix == ".zarr" or (
        path.is_dir() and any((path / marker).exists() for marker in ZARR_MARKERS)
    )


def remote_input(url: str) -> InputItem:
    """The Zarr store at ``url``; a missing one, or an image file at a URL, is an InputError."""
    name = location_name(url)
    if Path(name).suffix.lower() in SUPPORTED_SUFFIXES:
        raise InputError(
            f"{remote.display(url)}: image files at URLs are not read yet: copy it here first, "
            "or convert it to Zarr"
        )
    # one HEAD for a v3 store; a missing object, bucket or credential is named here, before any work
    if not any(remote.exists(remote.join(url, marker)) for marker in ZARR_MARKERS):
        what = "no such Zarr store" if name.endswith(".zarr") else "not a Zarr store"
        raise InputError(f"{remote.display(url)}: {what} (no {' or '.join(ZARR_MARKERS)} there)")
    return InputItem(name.removesuffix(".zarr"), url, True)


def list_inputs(locations: list[str]) -> list[InputItem]:
    """Every image named by ``locations`` (files, folders of files, Zarr stores; Zarr stores at
    URLs), in order.

    A missing path or two images with one stem (their outputs would collide) is an InputError.
    """
    items: list[InputItem] = []
    for location in locations:
        if remote.is_remote(location):
            items.append(remote_input(location))
            continue
        path = Path(remote.local_path(location))
        if not path.exists():
            raise InputError(f"{path}: no such file or folder")
        if is_zarr_path(path):
            items.append(InputItem(path.name.removesuffix(".zarr"), str(path), True))
        elif path.is_dir():
            for child in sorted(path.iterdir()):
                if child.name.startswith("."):
                    continue
                if is_zarr_path(child):
                    items.append(InputItem(child.name.removesuffix(".zarr"), str(child), True))
                elif child.is_file() and child.suffix.lower() in SUPPORTED_SUFFIXES:
                    items.append(InputItem(child.stem, str(child), False))
                else:
                    log.warning(
                        "skipping %s: not one of %s or a Zarr store", child, ", ".join(SUPPORTED_SUFFIXES)
                    )
        else:
            items.append(InputItem(path.stem, str(path), False))
    seen: dict[str, InputItem] = {}
    for item in items:
        if item.stem in seen:
            raise InputError(
                f"{seen[item.stem].shown} and {item.shown} have the same stem {item.stem!r}: "
                "outputs would collide"
            )
        seen[item.stem] = item
    if not items:
        raise InputError(f"no images found in {', '.join(remote.display(str(p)) for p in locations)}")
    return items


def read_image_for_model(path: Path, in_channels: int | None) -> np.ndarray:
    """``[C, H, W]`` from a TIFF/PNG: HxW, CxHxW or HxWxC (decided by the model's channel count)."""
    try:
        image = read_array(path)
    except ValueError as err:  # PrepareError names the file
        raise InputError(str(err)) from err
    if (
        image.ndim == 3
        and in_channels is not None
        and image.shape[0] != in_channels
        and image.shape[-1] == in_channels
    ):
        image = np.moveaxis(image, -1, 0)
    return as_chw(image, in_channels, str(path))


def write_tiff(location: str, array: np.ndarray) -> None:
    """Write under a temporary name, then rename: a crash leaves no half-written output. At a URL:
    one PUT of the encoded file, which makes the object appear whole or not at all."""
    import tifffile

    if remote.is_remote(location):
        encoded = io.BytesIO()
        tifffile.imwrite(encoded, array)
        remote.write_bytes(location, encoded.getvalue())
        return
    path = Path(location)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tifffile.imwrite(temporary, array)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def prepare_output(location: str) -> None:
    """Create a local output folder; refuse a URL that no credential reaches, before any work."""
    if not remote.is_remote(location):
        Path(remote.local_path(location)).mkdir(parents=True, exist_ok=True)
        return
    try:
        remote.zarr_store(location, writable=True)  # a client only: no request, nothing written
    except remote.RemoteError:
        raise
    except Exception as err:  # obstore's configuration errors (a malformed URL, an unknown option)
        raise InputError(f"{remote.display(location)}: {one_line(err)}") from err


def predict_file(model: torch.nn.Module, item: InputItem, args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    image = read_image_for_model(Path(item.path), getattr(model, "in_channels", None))
    height, width = image.shape[1:]
    predictor = TilePredictor(model, height, width, **_predict_options(args))
    probabilities = predictor.predict_block(image, ChannelStats.of(image), (0, height, 0, width))
    labels = labels_from_probabilities(probabilities)
    write_tiff(remote.join(args.output, f"{item.stem}_mask.tif"), labels)
    if args.probabilities:
        write_tiff(remote.join(args.output, f"{item.stem}_prob.tif"), probabilities.astype(np.float16))
    count = None
    if args.instances:
        instances = instances_from_labels(
            labels, border_class=args.border_class, min_distance=args.min_distance
        )
        write_tiff(remote.join(args.output, f"{item.stem}_instances.tif"), instances)
        count = int(instances.max())
    seconds = time.perf_counter() - started
    log.info(
        "%s: %dx%d, %d tile(s) of %d, %.2f s%s",
        item.path,
        height,
        width,
        predictor.plan.num_tiles,
        predictor.tile,
        seconds,
        "" if count is None else f", {count} instances",
    )
    return {"seconds": seconds, "pixels": height * width}


def predict_zarr_item(model: torch.nn.Module, item: InputItem, args: argparse.Namespace, ctx: Any) -> None:
    for stem, array in open_zarr_inputs(item.path):
        labels_location = remote.join(args.output, f"{stem}_mask.zarr")
        summary = predict_zarr(
            model,
            array,
            item.shown if stem == item.stem else f"{item.shown}/{stem.removeprefix(item.stem + '_')}",
            labels_location,
            remote.join(args.output, f"{stem}_prob.zarr") if args.probabilities else None,
            rank=ctx.rank,
            world_size=ctx.world_size,
            block=args.block,
            **_predict_options(args),
        )
        log.info(
            "%s -> %s: %d blocks of %d (this rank %d), tile %d, %.1f s",
            item.shown,
            remote.display(labels_location),
            summary["blocks"],
            summary["block_size"],
            summary["blocks_this_rank"],
            summary["tile"],
            summary["seconds"],
        )


def _predict_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "tile": args.tile,
        "overlap": args.overlap,
        "batch_size": args.batch,
        "precision": args.precision,
        "device": args.device_resolved,
        "flips": args.flips,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m unetdist.predict", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", required=True, help="checkpoint file, run folder, or MLflow URI (runs:/..., models:/...)"
    )
    parser.add_argument(
        "--input", required=True, nargs="+", help="image files, folders, Zarr arrays/groups (also at URLs)"
    )
    parser.add_argument("--output", required=True, help="output folder (created), or a URL")
    parser.add_argument("--tile", type=int, help="model input tile side (default: fits the image / model)")
    parser.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap, padded models")
    parser.add_argument("--batch", type=int, default=8, help="tiles per forward pass")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--flips", action="store_true", help="average over horizontal/vertical flips")
    parser.add_argument("--probabilities", action="store_true", help="also write float16 class probabilities")
    parser.add_argument(
        "--instances", action="store_true", help="also write instance labels (image files only)"
    )
    parser.add_argument("--border-class", type=int, help="class id of cell borders, if the model has one")
    parser.add_argument(
        "--min-distance", type=int, default=DEFAULT_MIN_DISTANCE, help="instances: seed spacing (px)"
    )
    parser.add_argument("--block", type=int, default=DEFAULT_BLOCK, help="Zarr: output block/chunk side (px)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ctx = distributed.init_distributed(args.device)
    from unetdist.logs import setup_logging

    setup_logging(ctx.is_main)
    args.device_resolved = ctx.device
    try:
        return _run(args, ctx)
    except (ModelLoadError, InputError, remote.RemoteError) as err:
        print(f"predict: error: {err}", file=sys.stderr)
        return 2
    finally:
        distributed.cleanup()


def _run(args: argparse.Namespace, ctx: Any) -> int:
    model, meta = load_model(args.model, map_location=ctx.device)
    items = list_inputs(args.input)
    if args.instances and any(item.is_zarr for item in items):
        raise InputError("--instances works on image files only, not on Zarr inputs")
    prepare_output(args.output)
    log.info(
        "model %s (%s, %s in, %s classes); %d input(s) on %d rank(s)",
        meta["source"],
        meta["preset"],
        meta["in_channels"],
        meta["num_classes"],
        len(items),
        ctx.world_size,
    )
    failures: list[str] = []
    files = [item for item in items if not item.is_zarr]
    for item in files[ctx.rank :: ctx.world_size]:
        try:
            predict_file(model, item, args)
        except (InputError, ValueError, OSError) as err:
            message = str(err)  # reading errors name the file already: name it once
            failures.append(message if message.startswith(item.shown) else f"{item.shown}: {message}")
    for item in (item for item in items if item.is_zarr):
        try:
            predict_zarr_item(model, item, args, ctx)
        except FailedElsewhere:
            pass  # the rank that failed reports it
        except (InputError, ValueError, OSError) as err:
            # every rank sees the same bad metadata; rank 0 reports it once
            if ctx.is_main or not isinstance(err, InputError):
                failures.append(f"{item.shown}: {err}")
    total_failures = int(distributed.all_reduce_sum(torch.tensor([len(failures)]))[0])
    for failure in failures:
        print(f"predict: failed: {failure}", file=sys.stderr)
    if total_failures:
        if ctx.is_main:
            print(
                f"predict: {total_failures} of {len(items)} input(s) failed (listed above)", file=sys.stderr
            )
        return 2
    return 0
