"""``python -m unetdist.bench predict --spatial-dims 3``: a volume predicted Zarr -> Zarr next to the bare
forward of the same model.

    python -m unetdist.bench predict --spatial-dims 3 --volume 64x256x256 --base-width 8 --depth 3
    python -m unetdist.bench predict --spatial-dims 3 --volume 32x128x128 --instances --num-classes 3

Writes one synthetic volume (touching ellipsoids, :func:`unetdist.data.synthetic.synthetic_volume`,
uint8) of ``--volume`` voxels as a Zarr array in 64^3 chunks (as prepare stores volumes), builds a
3-D U-Net with random weights (``--preset``, ``--base-width``, ``--depth``, ``--z-pools``) and
times, best of ``--repeats`` after one warm-up each, taking turns:

- ``forward_s``: one bare forward (softmax included) of the whole volume, padded to what the
  model takes, normalised and already on the device: the floor any prediction can reach. Where
  one pass over the whole volume would not fit in memory (``--forward-memory-gb``; default half
  the free memory), the forward of the largest tile that does (``forward_whole=false``): its
  rate, per voxel it yields, stands for the whole volume's;
- ``predict_s``: :func:`unetdist.inference.zarr_io.predict_zarr`, the API ``python -m
  unetdist.predict --input vol.zarr`` runs: statistics pass, blocks (``--block``), the tile plan
  (``--tile``/``--tile-depth``, else from ``--memory-gb``), batches, stitching, labels written to
  Zarr (``--probabilities``: float16 probabilities as well);
- with ``--instances``: ``instances_s``, ``predict_zarr_instances`` (what ``predict --instances``
  runs on a Zarr volume: the blocks' probabilities into a scratch array, read back and decoded
  whole in 3-D, ids written), ``decode_s``, the 3-D decoding alone (the model's default
  ``DecodeParams`` for volumes) of the in-memory probabilities, and ``decode_truth_s`` the same
  decoding of probabilities made from the volume's true cells (what a trained model's look like:
  random weights give ragged blobs, or none; ``truth_cells``, ``truth_instances`` found).

Rates are voxels of the volume per second; ``predict_vs_forward`` = predict's rate over the
forward's (1: the Zarr and tiling machinery costs nothing), ``instances_vs_forward`` likewise.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

VOLUME_CHUNK = 64  # the input's chunks: what prepare writes (unetdist.data.writers.VOLUME_CHUNK)


def _free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _forward_input(model: torch.nn.Module, volume: np.ndarray, device: torch.device,
                   memory_gb: float | None) -> tuple[torch.Tensor, int, bool]:
    """The normalised input of the bare forward on ``device``, the volume voxels it yields, and whether
    it is the whole volume (one pass) rather than the largest tile that fits ``memory_gb``."""
    from unetdist.inference.engine import ChannelStats, ModelGeometry, TilePredictor, normalise
    from unetdist.inference.tiling import read_mirrored

    shape = volume.shape[1:]
    plan = TilePredictor(model, *shape, device=device, memory_gb=1e6).plan  # one pass, any size
    budget = _free_memory_bytes(device) // 2 if memory_gb is None else int(memory_gb * 2**30)
    if ModelGeometry.of(model).bytes_per_pixel * math.prod(plan.input_shape) > budget:
        plan = TilePredictor(model, *shape, device=device, memory_gb=budget / 2**30).plan
    tiles = plan.tiles_for_block(*(value for side in shape for value in (0, side)))
    kept = [math.prod(end - begin for begin, end in tile.keep) for tile in tiles]
    tile = tiles[int(np.argmax(kept))]
    bounds = [value for start, size in zip(tile.input_start, plan.input_shape, strict=True)
              for value in (start, start + size)]  # fmt: skip
    region = normalise(read_mirrored(volume, *bounds), ChannelStats.of(volume))
    return torch.from_numpy(region)[None].to(device), max(kept), len(tiles) == 1


def _truth_probabilities(cells: np.ndarray, num_classes: int) -> np.ndarray:
    """float32 [K, Z, Y, X] probabilities of the true classes (3: background / interior / boundary of
    the cells; else background / cell), 0.8 on the true class: what a well-trained model gives."""
    from unetdist.instance_targets import boundary_classes

    classes = boundary_classes(cells) if num_classes == 3 else (cells > 0).astype(np.uint8)
    probabilities = np.full((num_classes, *cells.shape), 0.2 / (num_classes - 1), np.float32)
    for value in range(num_classes):
        probabilities[value][classes == value] = 0.8
    return probabilities


def run(args: argparse.Namespace) -> dict[str, float | int | str]:
    import zarr

    from unetdist.bench.timing import interleaved
    from unetdist.bench.volume_data import parse_volume
    from unetdist.data.synthetic import synthetic_volume
    from unetdist.inference.engine import TilePredictor, predict_array
    from unetdist.inference.instance_decoding import InstanceDecoder
    from unetdist.inference.zarr_instances import predict_zarr_instances
    from unetdist.inference.zarr_io import predict_zarr
    from unetdist.instances import DecodeParams
    from unetdist.model import build_unet

    shape = parse_volume(args.volume)
    if args.tile_depth and not args.tile:
        raise ValueError(f"--tile-depth {args.tile_depth}: give the in-plane side with --tile as well")
    torch.manual_seed(0)
    device = torch.device(
        "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    )
    z_pools = None if args.z_pools < 0 else args.z_pools
    model = build_unet(args.preset, args.in_channels, args.num_classes, base_width=args.base_width, depth=args.depth,
                       spatial_dims=3, z_pools=z_pools).to(device).eval()  # fmt: skip
    image, cells = synthetic_volume(shape, np.random.default_rng(0))
    volume = np.repeat(image[None], args.in_channels, axis=0)
    options = {"tile": args.tile, "tile_depth": args.tile_depth or None, "batch_size": args.batch,
               "precision": args.precision, "device": device, "memory_gb": args.memory_gb}  # fmt: skip
    forward_input, forward_voxels, forward_whole = _forward_input(model, volume, device, args.forward_memory_gb)
    predictor = TilePredictor(model, *shape, max_block=args.block, **options)
    params = DecodeParams.defaults("boundary" if args.num_classes == 3 else "semantic", spatial_dims=3)
    decoder = InstanceDecoder(params)
    with tempfile.TemporaryDirectory(prefix="unetdist-bench-predict3d-") as scratch:
        folder = Path(scratch)
        zarr.create_array(store=str(folder / "volume.zarr"), data=volume, overwrite=True,
                          chunks=(args.in_channels, *(min(VOLUME_CHUNK, side) for side in shape)))  # fmt: skip
        source = zarr.open_array(str(folder / "volume.zarr"), mode="r")
        probabilities = folder / "volume_prob.zarr" if args.probabilities else None
        summary: dict = {}

        def predict() -> None:
            summary.update(predict_zarr(model, source, "volume", folder / "volume_mask.zarr", probabilities,
                                        block=args.block, **options))  # fmt: skip

        timed = {"forward_s": lambda: predictor.forward(forward_input), "predict_s": predict}
        if args.instances:
            in_memory = predict_array(model, volume, return_probabilities=True, **options)
            locations = {"labels": folder / "volume_mask.zarr", "probabilities": probabilities,
                         "instances": folder / "volume_instances.zarr"}  # fmt: skip

            def instances() -> None:
                summary.update(predict_zarr_instances(model, source, "volume", locations, decoder,
                                                      block=args.block, **options))  # fmt: skip

            timed["instances_s"] = instances
            timed["decode_s"] = lambda: decoder(in_memory)
            truth = _truth_probabilities(cells, args.num_classes)
            timed["decode_truth_s"] = lambda: summary.update(truth_instances=int(decoder(truth).max()))
        seconds = interleaved(timed, device, args.repeats)
    voxels = math.prod(shape)
    forward_rate = forward_voxels / seconds["forward_s"]
    figures: dict[str, float | int | str] = {
        "spatial_dims": 3,
        "volume": "x".join(map(str, shape)),
        "preset": args.preset,
        "base_width": model.base_width,
        "depth": model.depth,
        "z_pools": model.z_pools,
        "tile": summary["tile"],
        "tiles": summary["tiles_this_rank"],
        "blocks": summary["blocks"],
        "block": summary["block"],
        "batch": predictor.batch_size,
        "precision": args.precision,
        "device": str(device),
        "forward_input": "x".join(map(str, forward_input.shape[2:])),
        "forward_whole": forward_whole,
        **{name: round(value, 4) for name, value in seconds.items()},
        "voxels_per_s": round(voxels / seconds["predict_s"]),
        "forward_voxels_per_s": round(forward_rate),
        "predict_vs_forward": round(voxels / seconds["predict_s"] / forward_rate, 4),
    }
    if args.instances:
        figures.update(
            instances=summary["instances"],
            instances_voxels_per_s=round(voxels / seconds["instances_s"]),
            decode_voxels_per_s=round(voxels / seconds["decode_s"]),
            instances_vs_forward=round(voxels / seconds["instances_s"] / forward_rate, 4),
            decode_share=round(seconds["decode_s"] / seconds["instances_s"], 4),
            truth_cells=int(cells.max()),
            truth_instances=summary["truth_instances"],
            decode_truth_voxels_per_s=round(voxels / seconds["decode_truth_s"]),
        )
    return figures
