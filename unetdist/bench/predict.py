"""``python -m unetdist.bench predict``: prediction and instance decoding next to the bare forward.

    python -m unetdist.bench predict --height 700 --width 1100 --images 6 --base-width 8 --depth 3
    python -m unetdist.bench predict --size 2048 --preset paper --base-width 16
    python -m unetdist.bench predict --spatial-dims 3 --volume 64x256x256 --instances   # bench/volume_predict.py

On ``--images`` synthetic cell images of ``height`` x ``width`` (``unetdist.data.synthetic``),
times, summed over the images, best of ``--repeats``:

- ``whole_forward_s``: one bare forward (softmax included) over each whole image, padded to
  what the model takes (a multiple of ``2**depth``; valid-conv models: their context margin),
  pre-normalised and already on the device: the floor any prediction can reach;
- ``predict_s``: ``predict_array``'s probabilities (normalise, the tile plan of
  :mod:`unetdist.inference.planning`, batches, stitching) and ``forward_s`` the bare forwards
  of exactly its tiles (``predict_vs_forward`` near 1: the tiling machinery costs little);
- ``decode_s``: ``decode_instances`` of those probabilities with the default ``DecodeParams``;
- ``instances_vs_forward`` = whole_forward_s / (predict_s + decode_s): what predicting and
  decoding one after the other keep of the bare forward's throughput (1: all of it);
- ``cli_instances_s``: ``predict --instances``'s own loop over the images as TIFF files
  (:func:`unetdist.inference.files.predict_files`: reading, predicting, and on its worker
  thread the class labels, decoding and TIFF writes, overlapping the next forward), and
  ``cli_vs_forward`` = whole_forward_s / cli_instances_s;
- ``sliding_s``: the probabilities by the Gaussian sliding window of 512 tiles overlapping by
  0.25 (padded models; the plan before the memory budget), ``sliding_vs_predict`` its time
  over ``predict_s``.

Each function is run once to warm up, then they take turns ``--repeats`` times (the best of
each is reported), so a shared machine's changing load skews the ratios little.

The model has random weights: speed does not depend on them, except the decoding's, which
depends on what the probabilities look like (random weights give ragged blobs; expect a
trained model's cells to decode at least as fast).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from unetdist.bench.timing import interleaved
from unetdist.model.sizes import PRESETS

if TYPE_CHECKING:
    from unetdist.inference.tiling import TilePlan
    from unetdist.instances import DecodeParams

SMALL_ARGS = ["--size", "256", "--images", "2", "--repeats", "1"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--height", type=int, default=700, help="image height in pixels")
    parser.add_argument("--width", type=int, default=1100, help="image width in pixels")
    parser.add_argument("--size", type=int, help="square images of this side (instead of --height/--width)")
    parser.add_argument("--images", type=int, default=6, help="images per timed run")
    parser.add_argument("--preset", default="padded", choices=PRESETS)
    parser.add_argument("--base-width", type=int, default=8)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument("--num-classes", type=int, default=2, help="2: semantic decoding; 3: boundary")
    parser.add_argument("--tile", type=int, help="model input tile (default: from the memory budget)")
    parser.add_argument("--memory-gb", type=float, help="activation budget (default: sized for the device)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs; the best is reported")
    volumes = parser.add_argument_group("volumes (--spatial-dims 3: unetdist/bench/volume_predict.py)")
    volumes.add_argument("--spatial-dims", type=int, choices=(2, 3), default=2,
                         help="3: one volume predicted Zarr -> Zarr by a 3-D U-Net, against its bare forward")
    volumes.add_argument("--volume", default="64x256x256", help="--spatial-dims 3: its shape, ZxYxX voxels")
    volumes.add_argument("--tile-depth", type=int, default=0, help="--spatial-dims 3: the tile's z side (with --tile)")
    volumes.add_argument("--z-pools", type=int, default=-1,
                         help="--spatial-dims 3: how many of the deepest levels pool z; -1: every level")
    volumes.add_argument("--block", type=int, help="--spatial-dims 3: output block side (default: predict's, 256)")
    volumes.add_argument("--instances", action="store_true",
                         help="--spatial-dims 3: also predict --instances and the 3-D decoding alone (2-D: always)")
    volumes.add_argument("--probabilities", action="store_true",
                         help="--spatial-dims 3: write float16 probabilities beside the labels")
    volumes.add_argument("--forward-memory-gb", type=float,
                         help="--spatial-dims 3: the bare forward's budget (default: half the free memory); "
                              "a volume over it is timed by its largest tile that fits")


def run(args: argparse.Namespace) -> dict[str, float | int | str]:
    from unetdist.data.synthetic import synthetic_cells
    from unetdist.inference.engine import TilePredictor, predict_array
    from unetdist.instances import DecodeParams, decode_instances
    from unetdist.model import build_unet

    if args.spatial_dims == 3:
        from unetdist.bench import volume_predict

        return volume_predict.run(args)
    if args.tile_depth or args.z_pools != -1 or args.block or args.probabilities or args.forward_memory_gb:
        raise ValueError("--tile-depth, --z-pools, --block, --probabilities and --forward-memory-gb are for "
                         "volumes: add --spatial-dims 3")
    height, width = (args.size, args.size) if args.size else (args.height, args.width)
    torch.manual_seed(0)
    device = torch.device(
        "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    )
    model = (
        build_unet(
            args.preset, args.in_channels, args.num_classes, base_width=args.base_width, depth=args.depth
        )
        .to(device)
        .eval()
    )
    rng = np.random.default_rng(0)
    side = max(height, width, 16)
    images = [
        np.repeat(synthetic_cells(side, rng)[0][None, :height, :width], args.in_channels, axis=0)
        for _ in range(args.images)
    ]
    options = {
        "tile": args.tile, "batch_size": args.batch, "precision": args.precision, "memory_gb": args.memory_gb
    }
    predictor = TilePredictor(model, height, width, device=device, **options)
    params = DecodeParams(target="boundary" if args.num_classes == 3 else "semantic")
    probabilities = [
        predict_array(model, image, device=device, return_probabilities=True, **options) for image in images
    ]
    whole_plan = TilePredictor(model, height, width, device=device, memory_gb=1e6).plan  # one pass, any size
    whole_inputs = [_tiles_of(image, whole_plan, device) for image in images]
    tile_inputs = [_tiles_of(image, predictor.plan, device) for image in images]

    def forward_all(inputs: list[list[torch.Tensor]]) -> None:
        for tiles in inputs:
            for start in range(0, len(tiles), predictor.batch_size):
                predictor.forward(torch.stack(tiles[start : start + predictor.batch_size]))

    with tempfile.TemporaryDirectory(prefix="unetdist-bench-predict-") as scratch:
        cli = _cli_loop(model, images, Path(scratch), {**options, "device": device}, params)
        timed: dict[str, Callable[[], object]] = {
            "whole_forward_s": lambda: forward_all(whole_inputs),
            "forward_s": lambda: forward_all(tile_inputs),
            "predict_s": lambda: [
                predict_array(model, image, device=device, return_probabilities=True, **options)
                for image in images
            ],
            "decode_s": lambda: [decode_instances(p, params) for p in probabilities],
            "cli_instances_s": cli,
        }
        if predictor.geometry.padded:
            sliding = {**options, "tile": 512, "overlap": 0.25}
            timed["sliding_s"] = lambda: [
                predict_array(model, image, device=device, **sliding) for image in images
            ]
        seconds = interleaved(timed, device, args.repeats)
    instances_s = seconds["predict_s"] + seconds["decode_s"]
    figures: dict[str, float | int | str] = {
        "image_px": f"{height}x{width}",
        "images": args.images,
        "preset": args.preset,
        "base_width": args.base_width,
        "depth": args.depth,
        "tile": "x".join(map(str, predictor.tile_shape)),
        "tiles": predictor.plan.num_tiles,
        "batch": predictor.batch_size,
        "precision": args.precision,
        "device": str(device),
        **{name: round(value, 4) for name, value in seconds.items()},
        "instances_s": round(instances_s, 4),
        "predict_vs_forward": round(seconds["forward_s"] / seconds["predict_s"], 4),
        "predict_vs_whole_forward": round(seconds["whole_forward_s"] / seconds["predict_s"], 4),
        "instances_vs_forward": round(seconds["whole_forward_s"] / instances_s, 4),
        "cli_vs_forward": round(seconds["whole_forward_s"] / seconds["cli_instances_s"], 4),
    }
    if "sliding_s" in seconds:
        figures["sliding_vs_predict"] = round(seconds["sliding_s"] / seconds["predict_s"], 4)
    megapixels = args.images * height * width / 1e6
    figures.update(
        predict_mpix_per_s=round(megapixels / seconds["predict_s"], 4),
        instances_mpix_per_s=round(megapixels / seconds["cli_instances_s"], 4),
        whole_forward_mpix_per_s=round(megapixels / seconds["whole_forward_s"], 4),
    )
    return figures


def _cli_loop(
    model: torch.nn.Module, images: list[np.ndarray], scratch: Path, options: dict, params: DecodeParams
) -> Callable[[], None]:
    """``predict --instances``'s loop over ``images``, written as TIFF files into ``scratch``."""
    import tifffile

    from unetdist.inference.files import predict_files
    from unetdist.inference.inputs import list_inputs
    from unetdist.inference.instance_decoding import InstanceDecoder

    folder = scratch / "images"
    folder.mkdir()
    for index, image in enumerate(images):
        tifffile.imwrite(folder / f"image{index:03d}.tif", image)
    items = list_inputs([str(folder)])

    def predict() -> None:
        decoder = InstanceDecoder(params)
        failures = predict_files(model, items, output=str(scratch), options=options, decoder=decoder)
        if failures:
            raise RuntimeError(f"bench predict: {failures[0]}")

    return predict


def _tiles_of(image: np.ndarray, plan: TilePlan, device: torch.device) -> list[torch.Tensor]:
    """The normalised model inputs of ``plan``'s tiles of ``image``, on ``device``."""
    from unetdist.inference.engine import ChannelStats, normalise
    from unetdist.inference.tiling import read_mirrored

    size_y, size_x = plan.input_shape
    stats = ChannelStats.of(image)
    inputs = []
    for t in plan.tiles_for_block(0, plan.height, 0, plan.width):
        region = read_mirrored(image, t.input_top, t.input_top + size_y, t.input_left, t.input_left + size_x)
        inputs.append(torch.from_numpy(normalise(region, stats)).to(device))
    return inputs


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        prog="python -m unetdist.bench.predict", description=__doc__.split("\n")[0]
    )
    add_arguments(parser)
    figures = run(parser.parse_args())
    print(" ".join(f"{key}={value}" for key, value in figures.items()))
