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
``<stem>_mask.zarr`` (and ``<stem>_prob.zarr``, ``<stem>_instances.zarr`` uint32), written block
by block. An OME-Zarr image gets an NGFF label image, ``labels/<--label-name>`` in the image
itself (without ``--output``) or ``<stem>_<label-name>.zarr`` in ``--output`` (class ids, or with
``--instances`` instance ids); see :mod:`unetdist.inference.ngff_labels`.

How fast: each image is one forward pass when its activations fit ``--memory-gb`` (default sized
for the device), else the largest tiles that do, overlapping only by the network's receptive
field (:mod:`unetdist.inference.planning`); the result does not depend on the tiling.

Instances (``--instances``) are decoded from the class probabilities (averaged over ``--flips``
first) with the decoding the model was trained with, tuned on its validation data
(:mod:`unetdist.inference.instance_decoding`); ``--threshold``, ``--seed-threshold``,
``--min-size`` and ``--min-distance`` override single fields, and ``--tune DATA`` chooses them
anew on annotated images, writes them to ``<output>/decoding.json`` and predicts with them
(:mod:`unetdist.inference.tuning`). ``--border-class`` decodes the class labels of a model
trained with a border class, as before the boundary target. A 3-D model's volumes (TIFF stacks,
Zarr arrays) decode in 3-D, ``--min-size`` in voxels; ``--tune`` takes annotated volumes.

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
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from unetdist import distributed
from unetdist.data import remote
from unetdist.inference.engine import InputError
from unetdist.inference.files import predict_files
from unetdist.inference.inputs import InputItem, list_inputs
from unetdist.inference.instance_decoding import OVERRIDABLE, InstanceDecoder, write_decoding_json
from unetdist.inference.loading import ModelLoadError, load_model
from unetdist.inference.ngff_labels import DEFAULT_LABEL_NAME, NgffJob, prepare_ngff
from unetdist.inference.ngff_predict import predict_ngff
from unetdist.inference.zarr_instances import predict_zarr_instances
from unetdist.inference.zarr_io import DEFAULT_BLOCK, DEFAULT_BLOCK_3D, FailedElsewhere, predict_zarr
from unetdist.inference.zarr_sources import one_line, open_zarr_inputs
from unetdist.precision import PRECISIONS

log = logging.getLogger("unetdist.predict")


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


def predict_zarr_item(
    model: torch.nn.Module,
    item: InputItem,
    args: argparse.Namespace,
    ctx: Any,
    decoder: InstanceDecoder | None,
) -> None:
    for stem, array in open_zarr_inputs(item.path):
        locations = {
            "labels": remote.join(args.output, f"{stem}_mask.zarr"),
            "probabilities": remote.join(args.output, f"{stem}_prob.zarr") if args.probabilities else None,
            "instances": remote.join(args.output, f"{stem}_instances.zarr"),
        }
        name = item.shown if stem == item.stem else f"{item.shown}/{stem.removeprefix(item.stem + '_')}"
        common = {"rank": ctx.rank, "world_size": ctx.world_size, "block": args.block}
        common.update(_predict_options(args))
        if decoder is None:
            labels, probabilities = locations["labels"], locations["probabilities"]
            summary = predict_zarr(model, array, name, labels, probabilities, **common)
        else:
            summary = predict_zarr_instances(model, array, name, locations, decoder, **common)
        log.info(
            "%s -> %s: %d blocks of %s (this rank %d), tile %s, %.1f s%s",
            item.shown,
            remote.display(locations["labels"]),
            summary["blocks"],
            summary["block"],
            summary["blocks_this_rank"],
            summary["tile"],
            summary["seconds"],
            f"; {summary['instances']} instances" if "instances" in summary else "",
        )


def predict_ngff_item(
    model: torch.nn.Module,
    job: NgffJob,
    args: argparse.Namespace,
    ctx: Any,
    decoder: InstanceDecoder | None,
) -> None:
    summary = predict_ngff(
        model,
        job,
        rank=ctx.rank,
        world_size=ctx.world_size,
        block=args.block,
        instances=decoder,
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
        "tile_depth": args.tile_depth,
        "overlap": args.overlap,
        "batch_size": args.batch,
        "precision": args.precision,
        "device": args.device_resolved,
        "flips": args.flips,
        "memory_gb": args.memory_gb,
        "normalize": args.normalize,  # as the model was trained (its data.normalize)
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
    parser.add_argument("--tile", type=int, help="model input tile side (default: from image, --memory-gb)")
    parser.add_argument(
        "--tile-depth", type=int,
        help="3-D models: the tile's z side, --tile its in-plane side (default: a cube)",
    )
    parser.add_argument(
        "--memory-gb", type=float,
        help="activation memory of one forward (default: 3 on a CPU, half of a GPU's free memory)",
    )
    parser.add_argument(
        "--overlap", type=float,
        help="padded models: a Gaussian sliding window overlapping by this fraction of a tile (default: "
        "tiles overlapping by the receptive field, equal to one pass over the whole image)",
    )
    parser.add_argument("--batch", type=int, default=8, help="tiles per forward pass, at most")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--flips", action="store_true", help="average over horizontal/vertical flips")
    parser.add_argument("--probabilities", action="store_true", help="also write float16 class probabilities")
    parser.add_argument(
        "--instances", action="store_true",
        help="also write instance ids (image files, Zarr arrays); OME-Zarr: uint32 instance ids, not classes",
    )
    decoding = parser.add_argument_group("instance decoding (default: as stored with the model)")
    decoding.add_argument("--threshold", type=float, help="P(foreground) above which a pixel is in an object")
    decoding.add_argument("--seed-threshold", type=float, help="boundary target: P(interior) of a seed pixel")
    decoding.add_argument("--min-size", type=int, help="objects smaller than this (px; voxels: 3-D) are dropped")
    decoding.add_argument("--min-distance", type=int, help="semantic target: spacing of the seeds (px)")
    decoding.add_argument(
        "--border-class", type=int, help="decode the class labels of a model trained with this border class"
    )
    decoding.add_argument(
        "--tune", metavar="DATA",
        help="choose the decoding on a prepared data set's validation split, or a folder of images with "
        "--tune-masks; implies --instances; written to <output>/decoding.json",
    )
    decoding.add_argument(
        "--tune-masks", metavar="MASKS", help="the instance masks of the --tune images, matched by stem"
    )
    parser.add_argument(
        "--block", type=int,
        help=f"Zarr: output block/chunk side (px; default {DEFAULT_BLOCK}, a 3-D model's {DEFAULT_BLOCK_3D})",
    )
    parser.add_argument("--level", type=int, default=0, help="OME-Zarr: the resolution level to read")
    parser.add_argument(
        "--label-name", default=DEFAULT_LABEL_NAME, help="OME-Zarr: the label image's name (labels/<name>)"
    )
    parser.add_argument("--overwrite", action="store_true", help="OME-Zarr: replace a label image so named")
    args = parser.parse_args(argv)
    if args.tune_masks is not None and args.tune is None:
        parser.error("--tune-masks needs --tune IMAGES")
    if args.tile_depth is not None and args.tile is None:
        parser.error("--tile-depth needs --tile (the tile's in-plane side)")
    args.instances = args.instances or args.tune is not None
    return args


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
    args.normalize = meta["normalize"]
    items = list_inputs(args.input, ngff_in_place=args.output is None)
    jobs = _prepare_ngff_jobs(model, items, args)
    decoder = _decoder(args, meta) if args.instances else None  # checked before any work
    if args.output is not None:
        prepare_output(args.output)
    log.info(
        "model %s (%s%s, %s in, %s classes); %d input(s) on %d rank(s)",
        meta["source"],
        meta["preset"],
        ", 3-D" if meta.get("spatial_dims") == 3 else "",
        meta["in_channels"],
        meta["num_classes"],
        len(items),
        ctx.world_size,
    )
    if args.tune is not None:
        decoder = _tuned_decoder(model, meta, args, ctx)
    if decoder is not None:
        log.info("instances: %s", decoder.describe())
    files = [item for item in items if not item.is_zarr]
    failures = predict_files(model, files[ctx.rank :: ctx.world_size], output=args.output,
                             options=_predict_options(args), probabilities=args.probabilities,
                             decoder=decoder)  # fmt: skip
    store_work = [
        (item.shown, lambda item=item: predict_zarr_item(model, item, args, ctx, decoder))
        for item in items
        if item.is_zarr and not item.is_ngff
    ]
    store_work += [
        (job.shown, lambda job=job: predict_ngff_item(model, job, args, ctx, decoder)) for job in jobs
    ]
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


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {key: getattr(args, key) for key in OVERRIDABLE}


def _decoder(args: argparse.Namespace, meta: dict[str, Any]) -> InstanceDecoder:
    decoder = InstanceDecoder.of(meta, _overrides(args), args.border_class)
    decoder.check_classes(meta["num_classes"], meta["source"])
    return decoder


def _tuned_decoder(
    model: torch.nn.Module, meta: dict[str, Any], args: argparse.Namespace, ctx: Any
) -> InstanceDecoder:
    """The decoding chosen on ``--tune``'s images (every rank the same), with the overrides; logged
    and written to ``<output>/decoding.json``."""
    from unetdist.inference.tuning import tune_decoding, tuning_samples

    samples = tuning_samples(args.tune, args.tune_masks, meta["in_channels"], meta.get("spatial_dims", 2))
    ranks = {"rank": ctx.rank, "world_size": ctx.world_size}
    result = tune_decoding(model, samples, meta["target"], **ranks, **_predict_options(args))
    log.info(
        "decoding tuned on %s (%d samples, %d objects, %d grid points): AP@0.5 %.4f with %s",
        remote.display(args.tune), result.samples, result.objects, result.grid_points, result.ap50,
        result.params.to_dict(),
    )  # fmt: skip
    decoder = InstanceDecoder.of(meta, _overrides(args), args.border_class, tuned=result.params)
    if ctx.is_main and args.output is not None:
        details = result.details(args.tune)
        if decoder.params != result.params:
            details["tuned"] = result.params.to_dict()  # the command line overrode some of it
        written = write_decoding_json(args.output, decoder.params, details)
        log.info("decoding written to %s", remote.display(written))
    return decoder


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
    if ngff_items and getattr(model, "spatial_dims", 2) == 3:
        raise InputError(f"{ngff_items[0].shown}: OME-Zarr images are predicted plane by plane by 2-D models "
                         "only; for a 3-D model give the level's [C, Z, Y, X] volume as a plain Zarr array")
    if args.probabilities and ngff_items:
        raise InputError(f"{ngff_items[0].shown}: an OME-Zarr image gets labels only, not --probabilities")
    return [
        prepare_ngff(item.path, item.stem, level=args.level, name=name, output=args.output,
                     overwrite=args.overwrite, in_channels=getattr(model, "in_channels", None))
        for item in ngff_items
    ]  # fmt: skip
