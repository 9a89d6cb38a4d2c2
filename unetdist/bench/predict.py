"""``python -m unetdist.bench predict``: whole-image prediction speed next to the raw forward.

    python -m unetdist.bench predict --size 2048 --preset padded --base-width 8 --depth 3

Times ``predict_array`` on one ``size`` x ``size`` image (normalise, cut tiles, batches,
Gaussian blend or overlap-tile stitching, argmax) and then only the model's forward passes
over exactly the same tiles, pre-cut and pre-normalised. Both in image megapixels per
second; ``predict_vs_forward`` near 1 means the tiling machinery costs little. The model
has random weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

SMALL_ARGS = ["--size", "512", "--repeats", "1"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, default=2048, help="image side in pixels")
    parser.add_argument("--preset", default="padded", choices=("paper", "article", "padded"))
    parser.add_argument("--base-width", type=int, default=8)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument("--num-classes", type=int, default=2)
    parser.add_argument("--tile", type=int, help="model input tile (default: predict_array's choice)")
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs; the best is reported")


def run(args: argparse.Namespace) -> dict[str, float | int | str]:
    from unetdist.inference.engine import ChannelStats, TilePredictor, normalise, predict_array
    from unetdist.model import build_unet

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
    image = (
        np.random.default_rng(0).integers(0, 255, (args.in_channels, args.size, args.size)).astype(np.uint8)
    )
    options = {
        "tile": args.tile,
        "overlap": args.overlap,
        "batch_size": args.batch,
        "precision": args.precision,
    }
    predictor = TilePredictor(model, args.size, args.size, device=device, **options)
    megapixels = args.size * args.size / 1e6

    predict_array(model, image[:, : predictor.tile, : predictor.tile], device=device, **options)  # warm-up
    predict_s = min(
        _timed(lambda: predict_array(model, image, device=device, **options), device)
        for _ in range(args.repeats)
    )

    tiles = predictor.plan.tiles_for_block(0, args.size, 0, args.size)
    size = predictor.tile
    stats = ChannelStats.of(image)
    from unetdist.inference.tiling import read_mirrored

    batches = []
    for start in range(0, len(tiles), args.batch):
        cut = [
            read_mirrored(image, t.input_top, t.input_top + size, t.input_left, t.input_left + size)
            for t in tiles[start : start + args.batch]
        ]
        batches.append(
            torch.from_numpy(normalise(np.stack(cut).reshape(-1, size, size), stats))
            .reshape(len(cut), -1, size, size)
            .to(device)
        )

    def forward_all() -> None:
        for batch in batches:
            predictor.forward(batch)

    forward_s = min(_timed(forward_all, device) for _ in range(args.repeats))
    return {
        "image_px": args.size,
        "preset": args.preset,
        "base_width": args.base_width,
        "depth": args.depth,
        "tile": size,
        "tiles": len(tiles),
        "batch": args.batch,
        "precision": args.precision,
        "device": str(device),
        "predict_s": round(predict_s, 3),
        "forward_s": round(forward_s, 3),
        "predict_mpix_per_s": round(megapixels / predict_s, 4),
        "forward_mpix_per_s": round(megapixels / forward_s, 4),
        "predict_vs_forward": round(forward_s / predict_s, 4),
    }


def _timed(function, device: torch.device) -> float:  # noqa: ANN001
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    function()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        prog="python -m unetdist.bench.predict", description=__doc__.split("\n")[0]
    )
    add_arguments(parser)
    figures = run(parser.parse_args())
    print(" ".join(f"{key}={value}" for key, value in figures.items()))
