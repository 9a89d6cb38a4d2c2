"""``python -m unetdist.predict``: segment image files or Zarr arrays with a trained U-Net.

    python -m unetdist.predict --model runs/quickstart --input images/ --output preds/ [--instances]
    python -m unetdist.predict --model runs:/<run_id>/model --input big.zarr --output preds/ --block 2048
    torchrun --nproc_per_node=2 -m unetdist.predict --model ckpt.pt --input big.zarr --output preds/
    python -m unetdist.predict --model ckpt.pt --input s3://bucket/big.zarr --output s3://bucket/preds/
    python -m unetdist.predict --model ckpt.pt --input cells.ome.zarr [--label-name nuclei --overwrite]

Inputs: image files (.tif/.tiff/.png), folders of them, Zarr arrays ([H, W] or [C, H, W]) or
groups of arrays, and OME-Zarr (NGFF 0.4/0.5) images. For each image ``<stem>``, in ``--output``:
``<stem>_mask.tif`` (uint8 class labels), with ``--probabilities`` ``<stem>_prob.tif`` (float16
[K, H, W]), with ``--instances`` ``<stem>_instances.tif`` (uint16/uint32); a Zarr input gives
``<stem>_mask.zarr`` (and ``<stem>_prob.zarr``), written block by block. An OME-Zarr image gets
an NGFF label image, ``labels/<--label-name>`` in the image itself (without ``--output``) or
``<stem>_<label-name>.zarr`` in ``--output``; see :mod:`unetdist.inference.ngff_labels`.

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
from unetdist.data.imageio import SUPPORTED_SUFFIXES, file_stem, read_array
from unetdist.inference.engine import (
    ChannelStats,
    InputError,
    TilePredictor,
    as_chw,
    labels_from_probabilities,
)
from unetdist.inference.loading import ModelLoadError, load_model
from unetdist.inference.ngff_labels import DEFAULT_LABEL_NAME, NgffJob, predict_ngff, prepare_ngff
from unetdist.inference.zarr_io import (
    DEFAULT_BLOCK,
    FailedElsewhere,
    is_ngff_image,
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
    is_ngff: bool = False  # an OME-Zarr image (a Zarr group with NGFF multiscales metadata)

    @property
    def shown(self) -> str:
        """The path or URL for messages (a URL without its query string)."""
        return remote.display(self.path)


def zarr_input(name: str, location: str) -> InputItem:
    """The Zarr store ``name`` at ``location``: an OME-Zarr image, or plain arrays."""
    if is_ngff_image(location):
        return InputItem(name.removesuffix(".zarr").removesuffix(".ome"), location, True, is_ngff=True)
    return InputItem(name.removesuffix(".zarr"), location, True)


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
    return zarr_input(name, url)


def list_inputs(locations: list[str], ngff_in_place: bool = False) -> list[InputItem]:
    """Every image named by ``locations`` (files, folders of files, Zarr stores; Zarr stores at
    URLs), in order.

    A missing path or two images with one stem (their outputs would collide; not OME-Zarr images
    written ``ngff_in_place``, into their own labels/) is an InputError.
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
            items.append(zarr_input(path.name, str(path)))
        elif path.is_dir():
            for child in sorted(path.iterdir()):
                if child.name.startswith("."):
                    continue
                if is_zarr_path(child):
                    items.append(zarr_input(child.name, str(child)))
                elif child.is_file() and child.suffix.lower() in SUPPORTED_SUFFIXES:
                    items.append(InputItem(file_stem(child), str(child), False))
                else:
                    log.warning(
                        "skipping %s: not one of %s or a Zarr store", child, ", ".join(SUPPORTED_SUFFIXES)
                    )
        else:
            items.append(InputItem(file_stem(path), str(path), False))
    seen: dict[str, InputItem] = {}
    for item in items:
        if item.is_ngff and ngff_in_place:
            continue
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


def predict_ngff_item(model: torch.nn.Module, job: NgffJob, args: argparse.Namespace, ctx: Any) -> None:
    instances = {"border_class": args.border_class, "min_distance": args.min_distance}
    summary = predict_ngff(
        model,
        job,
        rank=ctx.rank,
        world_size=ctx.world_size,
        block=args.block,
        instances=instances if args.instances else None,
        **_predict_options(args),
    )
    log.info(
        "%s -> %s: level %d, %d plane(s) of %s, %d label level(s), %.1f s%s",
        job.shown,
        remote.display(job.target.location),
        job.level,
        summary["planes"],
        "x".join(map(str, summary["shape"][-2:])),
        summary["levels"],
        summary["seconds"],
        f"; labels/ lists {', '.join(summary['labels'])}" if summary["labels"] else "",
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
    parser.add_argument(
        "--output", help="output folder (created), or a URL; OME-Zarr images: optional (into their labels/)"
    )
    parser.add_argument("--tile", type=int, help="model input tile side (default: fits the image / model)")
    parser.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap, padded models")
    parser.add_argument("--batch", type=int, default=8, help="tiles per forward pass")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--flips", action="store_true", help="average over horizontal/vertical flips")
    parser.add_argument("--probabilities", action="store_true", help="also write float16 class probabilities")
    parser.add_argument(
        "--instances", action="store_true",
        help="also write instance labels (image files); OME-Zarr: uint32 instance ids instead of classes",
    )
    parser.add_argument("--border-class", type=int, help="class id of cell borders, if the model has one")
    parser.add_argument(
        "--min-distance", type=int, default=DEFAULT_MIN_DISTANCE, help="instances: seed spacing (px)"
    )
    parser.add_argument("--block", type=int, default=DEFAULT_BLOCK, help="Zarr: output block/chunk side (px)")
    parser.add_argument("--level", type=int, default=0, help="OME-Zarr: the resolution level to read")
    parser.add_argument(
        "--label-name", default=DEFAULT_LABEL_NAME, help="OME-Zarr: the label image's name (labels/<name>)"
    )
    parser.add_argument("--overwrite", action="store_true", help="OME-Zarr: replace a label image so named")
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
    items = list_inputs(args.input, ngff_in_place=args.output is None)
    jobs = _prepare_ngff_jobs(model, items, args)
    if args.instances and any(item.is_zarr and not item.is_ngff for item in items):
        raise InputError("--instances works on image files and OME-Zarr images only, not on Zarr arrays")
    if args.output is not None:
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
    store_work = [
        (item.shown, lambda item=item: predict_zarr_item(model, item, args, ctx))
        for item in items
        if item.is_zarr and not item.is_ngff
    ]
    store_work += [(job.shown, lambda job=job: predict_ngff_item(model, job, args, ctx)) for job in jobs]
    for shown, predict in store_work:
        try:
            predict()
        except FailedElsewhere:
            pass  # the rank that failed reports it
        except (InputError, ValueError, OSError) as err:
            # every rank sees the same bad metadata; rank 0 reports it once
            if ctx.is_main or not isinstance(err, InputError):
                failures.append(f"{shown}: {err}")
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


def _prepare_ngff_jobs(
    model: torch.nn.Module, items: list[InputItem], args: argparse.Namespace
) -> list[NgffJob]:
    """The OME-Zarr inputs, read and checked before any work: one line naming the first bad one."""
    name = args.label_name
    if not name or "/" in name or name.startswith((".", "__")) or name.strip() != name:
        raise InputError(f"--label-name {name!r}: expected a plain name (no '/', no leading '.' or '__')")
    others = [item.shown for item in items if not item.is_ngff]
    if others and (args.output is None or args.level != 0):
        option = "--output is needed" if args.output is None else "--level applies to OME-Zarr images only"
        raise InputError(
            f"{others[0]}: not an OME-Zarr (NGFF) image, a Zarr group with multiscales metadata, so {option}"
        )
    ngff_items = [item for item in items if item.is_ngff]
    if args.probabilities and ngff_items:
        raise InputError(f"{ngff_items[0].shown}: an OME-Zarr image gets labels only, not --probabilities")
    return [
        prepare_ngff(item.path, item.stem, level=args.level, name=name, output=args.output,
                     overwrite=args.overwrite, in_channels=getattr(model, "in_channels", None))
        for item in ngff_items
    ]  # fmt: skip
