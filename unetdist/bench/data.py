"""``python -m unetdist.bench data``: loader throughput vs an in-memory ceiling and a plain PNG-in-tar pipeline.

Writes ``--tiles`` synthetic uint16 tiles (``--tile`` px) as npy tar shards, a Zarr store and
PNG tar shards into ``--dir``, then times, with ``--workers`` DataLoader workers each:
the unetdist loader (read + decode + crop + augmentation parameters, compact dtype out),
the in-memory ceiling (the same loader, workers and batches, over tiles already decoded in
memory: everything but the I/O and decoding), and ``webdataset.WebDataset(...).decode("torch")``
on the PNGs (the obvious pipeline). The loader and the ceiling are timed in alternating
windows (``--repeats`` each) so that load from other processes hits both alike;
``loader_vs_ceiling`` is the median of the windows' ratios. Also reported: a bare copy of random tiles out of an array (no
sequence, no augmentation parameters, no keys) as the floor of the per-batch cost, and the
augmentation that runs in the training process (``to_model_input``: uint16 -> float, flips,
intensity, noise, elastic deformation through ``grid_sample``, normalisation) on one CPU thread
(per core) and, with ``--device cuda``, on the GPU (host-to-device copy included), so the
cores per GPU that a training rate needs can be read off.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from unetdist.data.sources.base import StoredSamples


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=("webdataset", "zarr"), default="webdataset")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--tiles", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=96, help="micro-batches timed per window")
    parser.add_argument("--repeats", type=int, default=7, help="alternating timing windows of loader and ceiling")
    parser.add_argument("--dir", default="", help="scratch folder (default: a temporary one)")
    parser.add_argument("--device", default="cpu", help="also time the augmentation on this device (e.g. cuda)")


def _write(folder: Path, tiles: int, size: int) -> None:
    import webdataset as wds
    from PIL import Image

    from unetdist.data.writers import ZarrWriter

    rng = np.random.default_rng(0)
    zarr_writer = ZarrWriter(folder / "data.zarr", "train")
    counts = []
    with wds.ShardWriter(str(folder / "train-%06d.tar"), maxcount=128, verbose=0) as npy, \
            wds.ShardWriter(str(folder / "png-%06d.tar"), maxcount=128, verbose=0) as png:
        for index in range(tiles):
            image = rng.integers(0, 4096, size=(1, size, size), dtype=np.uint16)
            mask = (image[0] > 2048).astype(np.uint8)
            npy.write({"__key__": f"t{index:06d}", "image.npy": image, "mask.npy": mask})
            png.write({"__key__": f"t{index:06d}", "image.png": Image.fromarray(image[0]), "mask.png": Image.fromarray(mask)})
            zarr_writer.write("t", index, 0, image, mask, None)
            if index % 128 == 0:
                counts.append(0)
            counts[-1] += 1
    zarr_writer.close()
    import json

    names = [f"train-{i:06d}.tar" for i in range(len(counts))]
    (folder / "dataset.json").write_text(json.dumps({"train_shards": names, "train_counts": counts, "val_shards": []}))


def _rate(iterator, batches: int, batch: int, buffered: int) -> float:
    for _ in range(buffered + 1):  # started, and what the workers had prefetched while idle is drained
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch / (time.perf_counter() - start)


class _InMemoryTiles(StoredSamples):
    """Decoded tiles in memory as a loader source: the ceiling (no I/O, no decoding)."""

    def __init__(self, images: np.ndarray, masks: np.ndarray) -> None:
        self.images, self.masks, self.counts, self.names = images, masks, [len(images)], ["memory"]

    def read(self, unit: int, indices: list[int]) -> list:
        from unetdist.data.samples import Sample

        return [Sample(f"t{i:06d}", "memory", self.images[i], self.masks[i], None) for i in indices]


class _BareCopy(torch.utils.data.IterableDataset):
    def __init__(self, images: np.ndarray, masks: np.ndarray, batch: int) -> None:
        self.images, self.masks, self.batch = images, masks, batch

    def __iter__(self):
        rng = np.random.default_rng(0)
        while True:
            chosen = np.sort(rng.choice(len(self.images), self.batch, replace=False))
            yield {"image": torch.from_numpy(self.images[chosen]), "mask": torch.from_numpy(self.masks[chosen])}


def _augment_rate(batch: dict, device: str, repeats: int) -> float:
    """Tiles/s of ``to_model_input`` (copy to ``device`` + augmentation + normalisation)."""
    from unetdist.data import to_model_input

    synchronize = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if device.startswith("cuda"):
        batch = {**batch, **{key: batch[key].pin_memory() for key in ("image", "mask") if key in batch}}
    to_model_input(batch, device)  # warm-up: kernels, allocator
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        to_model_input(batch, device)
    synchronize()
    return repeats * len(batch["image"]) / (time.perf_counter() - start)


def run(args) -> dict[str, float | int | str]:
    import webdataset as wds
    from torch.utils.data import DataLoader

    from unetdist.config import DataConfig
    from unetdist.data import build_train_loader

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.dir or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        _write(folder, args.tiles, args.tile)
        data = DataConfig(format=args.format, root=str(folder), tile_size=args.tile, num_workers=args.workers,
                          augment_on="device", augment_elastic=True, augment_intensity=True, augment_noise_std=0.01,
                          block_size=8, prefetch_factor=4)
        options = dict(rank=0, world_size=1, seed=0, micro_batch_size=args.batch, in_channels=1, num_classes=2,
                       use_weight_map=False)
        import zarr

        group = zarr.open_group(str(folder / "data.zarr"), mode="r", path="train")
        images, masks = group["image"][:], group["mask"][:]
        loader = iter(build_train_loader(data, **options))
        memory = iter(build_train_loader(data, **options, source=_InMemoryTiles(images, masks)))
        buffered = data.prefetch_factor * max(1, args.workers)
        loader_rates, ceiling_rates = [], []
        # untimed: both loaders' workers start (the second's would otherwise start during the first's window)
        _rate(loader, 4, args.batch, buffered)
        _rate(memory, 4, args.batch, buffered)
        for _ in range(args.repeats):
            loader_rates.append(_rate(loader, args.batches, args.batch, buffered))
            ceiling_rates.append(_rate(memory, args.batches, args.batch, buffered))
        loader_rate, ceiling_rate = float(np.median(loader_rates)), float(np.median(ceiling_rates))
        ratio = float(np.median(np.divide(loader_rates, ceiling_rates)))
        sample = next(loader)
        del loader, memory  # their workers stop
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        augment_rate = _augment_rate(sample, "cpu", 4)
        torch.set_num_threads(threads)
        device_rate = _augment_rate(sample, args.device, 50) if args.device != "cpu" else None

        bare = DataLoader(_BareCopy(images, masks, args.batch), batch_size=None, num_workers=args.workers,
                          persistent_workers=args.workers > 0, prefetch_factor=data.prefetch_factor if args.workers else None)
        bare_rate = _rate(iter(bare), args.batches, args.batch, buffered)

        pngs = sorted(str(p) for p in folder.glob("png-*.tar"))
        png_pipeline = wds.WebDataset(pngs, shardshuffle=False, empty_check=False, nodesplitter=None,
                                      workersplitter=wds.split_by_worker).repeat().decode("torch").to_tuple("image.png", "mask.png").batched(args.batch)
        png_rate = _rate(iter(DataLoader(png_pipeline, batch_size=None, num_workers=args.workers)), args.batches, args.batch, 0)
    tile_mb = args.tile * args.tile * 2 / 1e6
    cores = max(1, args.workers)
    return {
        "format": args.format,
        "workers": args.workers,
        "samples_per_s": round(loader_rate, 1),
        "mb_per_s": round(loader_rate * tile_mb, 1),
        "ceiling_samples_per_s": round(ceiling_rate, 1),
        "bare_copy_samples_per_s": round(bare_rate, 1),
        "png_wds_samples_per_s": round(png_rate, 1),
        "loader_vs_ceiling": round(ratio, 3),
        "loader_vs_ceiling_windows": "/".join(f"{a / b:.2f}" for a, b in zip(loader_rates, ceiling_rates, strict=True)),
        "loader_vs_png_wds": round(loader_rate / png_rate, 2),
        "tiles_per_s_per_core": round(loader_rate / cores, 1),
        "cpu_augment_tiles_per_s_per_core": round(augment_rate, 1),
        **({} if device_rate is None else {"device": args.device, "device_augment_tiles_per_s": round(device_rate, 1)}),
    }
