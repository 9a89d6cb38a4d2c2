"""``python -m unetdist.bench data --format ome-zarr``: OME-Zarr images read as they are, against the same
images prepared as a whole-image Zarr store, and the cost of border weight maps computed in workers.

    python -m unetdist.bench data --format ome-zarr --images 8 --image-size 1024 --tile 256 --batch 16

Writes ``--images`` synthetic ``--image-size`` uint16 images with uint16 instance labels as OME-Zarr
0.5 (``IMAGE/labels/cells``; 256 x 256 chunks, zstd level 1: as prepare writes whole images) and
the same images through ``python -m unetdist.prepare --format zarr --whole-images`` (class masks,
no weight maps), then times in alternating rounds (:func:`unetdist.bench.loader_rounds.rounds`) the
training loader over each (random ``--tile`` windows, ``data.mask_kind=instances`` for the labels):
``ngff_vs_zarr`` is the median of the rounds' ratios (target >= 0.9). ``ngff_weights`` is the
OME-Zarr loader with ``loss.use_weight_map=auto``, timed alone afterwards: each worker computes the
paper's border weight map of every tile from its instance ids; ``weight_map_ms_per_tile`` is that
map alone, :func:`unetdist.weight_map.border_weight_map` on one ``--tile`` instance tile, one thread.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CHUNK = 256  # as prepare --whole-images chunks its images (unetdist.data.writers.IMAGE_CHUNK)
LABELS = "cells"


def instance_image(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """uint16 pixels and uint16 instance ids of blob-shaped cells (thresholded smooth noise, labelled):
    synthetic_cells' look is not needed for reading speed, and it takes seconds per megapixel."""
    from scipy import ndimage

    noise = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma=6.0)
    foreground = noise > np.quantile(noise, 0.55)
    instances, _ = ndimage.label(foreground)
    pixels = np.clip((noise - noise.min()) / (np.ptp(noise) + 1e-9) * 4095, 0, 4095).astype(np.uint16)
    return pixels, instances.astype(np.uint16)


def write_ngff(path: Path, pixels: np.ndarray, instances: np.ndarray, levels: int = 3) -> None:
    """An OME-Zarr 0.5 image [c, y, x] with its label image labels/cells [y, x], ``levels`` levels (by 2)."""
    import zarr
    from zarr.codecs import ZstdCodec

    def multiscales(name: str, axes: list[dict]) -> list[dict]:
        spatial = [1.0] * (len(axes) - 2)
        datasets = [{"path": str(level), "coordinateTransformations": [
            {"type": "scale", "scale": spatial + [float(2**level)] * 2}]} for level in range(levels)]
        return [{"name": name, "axes": axes, "datasets": datasets}]

    space = [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    channel = {"name": "c", "type": "channel"}
    root.attrs["ome"] = {"version": "0.5", "multiscales": multiscales(path.name, [channel, *space])}
    labels = root.create_group("labels")
    labels.attrs["ome"] = {"version": "0.5", "labels": [LABELS]}
    label = labels.create_group(LABELS)
    label.attrs["ome"] = {"version": "0.5", "multiscales": multiscales(LABELS, space), "image-label": {}}
    for level in range(levels):
        step = 2**level
        for group, array, chunks in ((root, pixels[None, ::step, ::step], (1, CHUNK, CHUNK)),
                                     (label, instances[::step, ::step], (CHUNK, CHUNK))):
            out = group.create_array(str(level), shape=array.shape, dtype=array.dtype, chunks=chunks,
                                     compressors=[ZstdCodec(level=1)])
            out[...] = array


def weight_map_ms_per_tile(instances: np.ndarray, tile: int, repeats: int = 5) -> float:
    """Median ms of the border weight map of a ``tile`` instance tile (one thread)."""
    from unetdist.data.samples import COMPUTED_SIGMA, COMPUTED_W0
    from unetdist.weight_map import border_weight_map

    window = instances[:tile, :tile]
    timings = []
    for _ in range(repeats + 1):  # the first: warm-up
        start = time.perf_counter()
        border_weight_map(window, w0=COMPUTED_W0, sigma=COMPUTED_SIGMA)
        timings.append(time.perf_counter() - start)
    return float(np.median(timings[1:]) * 1000)


def run(args: argparse.Namespace) -> dict[str, float | int | str]:
    import tifffile

    from unetdist.bench.loader_rounds import median_ratio, rate, rounds
    from unetdist.config import DataConfig
    from unetdist.data import build_train_loader
    from unetdist.prepare import main as prepare_main

    batch, repeats = args.batch or 16, args.repeats or 7
    if args.image_size < args.tile:
        raise ValueError(f"--image-size {args.image_size} is smaller than --tile {args.tile}")
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.dir or scratch)
        for name in ("ngff", "images", "masks"):
            (folder / name).mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for index in range(args.images):
            pixels, instances = instance_image(args.image_size, rng)
            write_ngff(folder / "ngff" / f"img{index:03d}.ome.zarr", pixels, instances)
            tifffile.imwrite(folder / "images" / f"img{index:03d}.tif", pixels)
            tifffile.imwrite(folder / "masks" / f"img{index:03d}.tif", instances)
        code = prepare_main(["--images", str(folder / "images"), "--masks", str(folder / "masks"), "--out",
                             str(folder / "prepared"), "--format", "zarr", "--whole-images", "--tile",
                             str(args.tile), "--val-fraction", "0", "--no-weight-map"])
        if code != 0:
            raise RuntimeError(f"prepare --whole-images exited with {code}")
        common = dict(tile_size=args.tile, num_workers=args.workers, tiles_per_image=64, augment_on="device",
                      prefetch_factor=4, mask_kind="instances")
        ngff = DataConfig(format="ome-zarr", images=[str(folder / "ngff" / "img*.ome.zarr")], labels=LABELS,
                          val_fraction=0.0, **common)
        prepared = DataConfig(format="zarr", root=str(folder / "prepared"), **common)
        options = dict(rank=0, world_size=1, seed=0, micro_batch_size=batch, in_channels=1, num_classes=2)
        buffered = common["prefetch_factor"] * max(1, args.workers)
        contestants = {
            "ngff": (iter(build_train_loader(ngff, **options, use_weight_map=False)), buffered),
            "zarr": (iter(build_train_loader(prepared, **options, use_weight_map=False)), buffered),
        }
        rates, other_cores = rounds(contestants, args.batches, batch, repeats)
        del contestants  # their workers stop
        # alone: its workers refilling their buffers (weight maps) would slow whichever loader is timed next
        with_weights = iter(build_train_loader(ngff, **options, use_weight_map="auto"))
        if "weight" not in next(with_weights):  # its workers start
            raise RuntimeError("bench data --format ome-zarr: the loader computed no border weight maps")
        weight_batches = max(4, args.batches // 4)  # a weight map costs a worker far more than its read
        rates["ngff_weights"] = [rate(with_weights, weight_batches, batch, buffered) for _ in range(3)]
        del with_weights
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        weight_ms = weight_map_ms_per_tile(instance_image(args.tile, np.random.default_rng(1))[1], args.tile)
        torch.set_num_threads(threads)
    medians = {name: float(np.median(values)) for name, values in rates.items()}
    windows = rates["ngff"], rates["zarr"]
    return {
        "format": "ome-zarr",
        "workers": args.workers,
        "batch": batch,
        "images": args.images,
        "image_size": args.image_size,
        "tile": args.tile,
        "ngff_samples_per_s": round(medians["ngff"], 1),
        "zarr_samples_per_s": round(medians["zarr"], 1),
        "ngff_weights_samples_per_s": round(medians["ngff_weights"], 1),
        "ngff_vs_zarr_windows": "/".join(f"{ngff / zarr:.2f}" for ngff, zarr in zip(*windows, strict=True)),
        **({} if not other_cores else {"other_load_cores": round(float(np.median(other_cores)), 2)}),
        "weight_map_ms_per_tile": round(weight_ms, 2),
        "ngff_weights_vs_ngff": round(medians["ngff_weights"] / medians["ngff"], 3),
        "ngff_vs_zarr": round(median_ratio(rates["ngff"], rates["zarr"]), 3),
    }
