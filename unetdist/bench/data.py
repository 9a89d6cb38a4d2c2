"""``python -m unetdist.bench data``: loader throughput vs an in-memory ceiling and other libraries' loaders.

    python -m unetdist.bench data --tiles 1024 --tile 256 --workers 2 --batch 32
    python -m unetdist.bench data --format zarr --tiles 1024 --batch 32 --block-sizes 1,2,4,8
    python -m unetdist.bench data --format ome-zarr --images 8 --image-size 1024   # bench/ngff_data.py
    python -m unetdist.bench data --spatial-dims 3 --volumes 4 --volume 64x192x192 --tile 48   # bench/volume_data.py

Writes ``--tiles`` synthetic uint16 tiles (``--tile`` px) as npy tar shards, a Zarr store and
PNG tar shards into ``--dir`` (and, where Mosaic Streaming is importable, an MDS data set of the
same tiles), then times, with ``--workers`` DataLoader workers each:
the unetdist loader (read + decode + crop + augmentation parameters, compact dtype out),
the in-memory ceiling (the same loader, workers and batches, over tiles already decoded in
memory: everything but the I/O and decoding), and the peers of :mod:`unetdist.bench.peers`:
webdataset's obvious pipeline over the same npy shards (``wds_npy``) and Mosaic Streaming
(``mds``; ``mds=not installed`` where ``import streaming`` fails, with the reason on stderr).
All of them are timed in rounds of one window each, in turn (``--repeats`` rounds), so that
load from other processes hits them alike; ``loader_vs_ceiling``, ``loader_vs_wds_npy`` and
``loader_vs_mds`` are the medians of the rounds' ratios, the rates the medians of the windows.
``other_load_cores`` (median, and ``_max``): the cores that other processes kept busy during the
windows (Linux), so that a slow window can be told from a contended one (on 2 cores, one core
busy elsewhere took windows here from ~3,500 to ~2,000 samples/s, ceiling and loader alike).
Most of the ceiling's cost is the hand-over itself: a worker writes each item into a fresh
shared-memory block, and faulting in its pages (~4 us per 4 KiB page) was half the ceiling's
time here (the same ceiling with one reused block per worker: 2.0-2.4x the rate), so anything
that slows page allocation (memory pressure, a container's memory limit) slows it most.
``--block-sizes 1,2,4,8`` (``--format zarr``) adds a loader per ``data.block_size`` to the rounds
(``zarr_block<k>_samples_per_s``) and, from the sequence alone, the mean number of distinct
storage chunks a micro-batch draws from (``zarr_block<k>_blocks_per_batch``; block size 1 is a
full shuffle). Also reported: the obvious webdataset pipeline on PNGs (``png_wds``, timed once),
a bare copy of random tiles out of an array (no sequence, no augmentation parameters, no keys)
as the floor of the per-batch cost, and the augmentation that runs in the training process
(``to_model_input``: uint16 -> float, flips, intensity, noise, elastic deformation through
``grid_sample``, normalisation) on one CPU thread (per core) and, with ``--device cuda``, on the
GPU (host-to-device copy included), so the cores per GPU that a training rate needs can be read off.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from unetdist.bench import peers
from unetdist.bench.loader_rounds import augmentation_rate, median_ratio, rate, rounds
from unetdist.data.sequence import Blocks, GlobalSequence
from unetdist.data.sources.base import StoredSamples


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # --format, --tile and --batches default to None so that --spatial-dims 3 can tell them unset (its
    # defaults differ, and it refuses the tile formats); 2-D resolves them to the values they always had
    parser.add_argument("--format", choices=("webdataset", "zarr", "ome-zarr"), default=None,
                        help="default webdataset; ome-zarr: OME-Zarr images against the same images prepared "
                             "--whole-images (unetdist/bench/ngff_data.py); --spatial-dims 3: zarr only")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tile", type=int, default=None, help="tile side (default 256; --spatial-dims 3: 48)")
    parser.add_argument("--tiles", type=int, default=512)
    parser.add_argument("--batch", type=int, default=None,
                        help="micro-batch size; none given: 16, --source s3: 32, --spatial-dims 3: 4")
    parser.add_argument("--batches", type=int, default=None,
                        help="micro-batches timed per window (default 96; --spatial-dims 3: 24)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="alternating timing windows of loader and ceiling (none given: 7); --source s3: "
                             "rounds per latency of a local and a remote loader, two epochs each (none given: 3)")
    parser.add_argument("--dir", default="", help="scratch folder (default: a temporary one)")
    parser.add_argument("--images", type=int, default=8, help="--format ome-zarr: whole images written")
    parser.add_argument("--image-size", type=int, default=1024, help="--format ome-zarr: their side in pixels")
    parser.add_argument("--block-sizes", default="",
                        help="--format zarr: also time the loader at each data.block_size (e.g. 1,2,4,8)")
    parser.add_argument("--device", default="cpu", help="also time the augmentation on this device (e.g. cuda)")
    parser.add_argument("--source", choices=("local", "s3"), default="local",
                        help="s3: the tar loader reading from the S3 server at AWS_ENDPOINT_URL, against local "
                             "(unetdist/bench/remote_data.py)")
    parser.add_argument("--url", default="s3://unetdist-bench/data", help="--source s3: the prefix to upload to")
    parser.add_argument("--latency-ms", default="20,50",
                        help="--source s3: latencies injected into GETs through S3_FAULTS_FILE (comma list)")
    parser.add_argument("--fetch-span-mb", type=float, default=None,
                        help="--source s3: data.fetch_span_mb of the remote loader (default: the config's)")
    volumes = parser.add_argument_group("volumes (--spatial-dims 3: unetdist/bench/volume_data.py)")
    volumes.add_argument("--spatial-dims", type=int, choices=(2, 3), default=2,
                         help="3: 3-D windows of whole volumes in a Zarr store against the same windows in memory")
    volumes.add_argument("--volumes", type=int, default=4, help="--spatial-dims 3: synthetic volumes written")
    volumes.add_argument("--volume", default="64x192x192", help="--spatial-dims 3: their shape, ZxYxX voxels")
    volumes.add_argument("--tile-depth", type=int, default=0, help="--spatial-dims 3: the tile's z side; 0: --tile")


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


def _block_sizes(args) -> list[int]:
    """``--block-sizes`` as integers; refused (exit 2) with anything but ``--format zarr``."""
    if not args.block_sizes:
        return []
    if args.format != "zarr":
        raise ValueError(f"--block-sizes {args.block_sizes}: block sizes are timed for --format zarr only")
    try:
        sizes = [int(text) for text in args.block_sizes.split(",") if text.strip()]
    except ValueError:
        raise ValueError(f"--block-sizes {args.block_sizes}: expected comma-separated integers") from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--block-sizes {args.block_sizes}: block sizes are positive integers")
    return sizes


def blocks_per_batch(
    counts: list[int], block_size: int, chunk_tiles: int, batch: int, epochs: int = 3
) -> float:
    """Mean number of distinct storage chunks (``chunk_tiles`` consecutive samples) per micro-batch of
    ``batch`` over the first ``epochs`` epochs of the sequence with ``block_size``: the shuffle's
    quality (neighbouring tiles are alike) and the chunks a batch decodes. Pure: no data is read."""
    blocks = Blocks.from_counts(counts, block_size)
    sequence = GlobalSequence(blocks, seed=0, global_batch_size=batch, epoch_end="pad")
    distinct = []
    for first in range(0, epochs * sequence.epoch_length, batch):
        _, units, indices = sequence.locate(np.arange(first, first + batch))
        distinct.append(len(set(zip(units.tolist(), (indices // chunk_tiles).tolist(), strict=True))))
    return float(np.mean(distinct))


def run(args) -> dict[str, float | int | str]:
    import webdataset as wds
    from torch.utils.data import DataLoader

    from unetdist.config import DataConfig
    from unetdist.data import build_train_loader

    if args.spatial_dims == 3:
        from unetdist.bench import volume_data

        return volume_data.run(args)
    if args.tile_depth:
        raise ValueError(f"--tile-depth {args.tile_depth}: tiles have a depth with --spatial-dims 3 only")
    args = argparse.Namespace(**{**vars(args), "format": args.format or "webdataset", "tile": args.tile or 256,
                                 "batches": args.batches or 96})
    if args.source == "s3":
        from unetdist.bench import remote_data

        return remote_data.run(args, write_tiles=_write)
    if args.format == "ome-zarr":
        from unetdist.bench import ngff_data

        _block_sizes(args)  # refused: block sizes are timed for --format zarr only
        return ngff_data.run(args)
    args = argparse.Namespace(**{**vars(args), "batch": args.batch or 16, "repeats": args.repeats or 7})
    block_sizes = _block_sizes(args)
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
        chunk_tiles = int(group["image"].chunks[0])
        mds_version, mds_missing = peers.mds_available()
        if mds_version:
            peers.write_mds(folder / "mds", images, masks)
        else:
            print(f"mds=not installed ({mds_missing}): pip install mosaicml-streaming", file=sys.stderr)
        buffered = data.prefetch_factor * max(1, args.workers)
        npy_shards = sorted(str(p) for p in folder.glob("train-*.tar"))
        contestants = {
            "loader": (iter(build_train_loader(data, **options)), buffered),
            "ceiling": (iter(build_train_loader(data, **options, source=_InMemoryTiles(images, masks))),
                        buffered),
            "wds_npy": (peers.wds_npy_batches(npy_shards, batch=args.batch, workers=args.workers),
                        peers.in_flight(args.workers)),
        }
        if mds_version:
            contestants["mds"] = (peers.mds_batches(folder / "mds", batch=args.batch, workers=args.workers),
                                  peers.in_flight(args.workers))
        for size in block_sizes:
            blocked = dataclasses.replace(data, block_size=size)
            contestants[f"zarr_block{size}"] = (iter(build_train_loader(blocked, **options)), buffered)
        rates, other_cores = rounds(contestants, args.batches, args.batch, args.repeats)
        medians = {name: float(np.median(values)) for name, values in rates.items()}
        loader_rates, ceiling_rates = rates["loader"], rates["ceiling"]
        sample = next(contestants["loader"][0])
        del contestants  # their workers stop
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        augment_rate = augmentation_rate(sample, "cpu", 4)
        torch.set_num_threads(threads)
        device_rate = augmentation_rate(sample, args.device, 50) if args.device != "cpu" else None

        bare = DataLoader(_BareCopy(images, masks, args.batch), batch_size=None, num_workers=args.workers,
                          persistent_workers=args.workers > 0, prefetch_factor=data.prefetch_factor if args.workers else None)
        bare_rate = rate(iter(bare), args.batches, args.batch, buffered)

        pngs = sorted(str(p) for p in folder.glob("png-*.tar"))
        png_pipeline = wds.WebDataset(pngs, shardshuffle=False, empty_check=False, nodesplitter=None,
                                      workersplitter=wds.split_by_worker).repeat().decode("torch").to_tuple("image.png", "mask.png").batched(args.batch)
        png_rate = rate(iter(DataLoader(png_pipeline, batch_size=None, num_workers=args.workers)), args.batches, args.batch, 0)
    loader_rate = medians["loader"]
    tile_mb = args.tile * args.tile * 2 / 1e6
    cores = max(1, args.workers)
    peer_rates = {"wds_npy_samples_per_s": round(medians["wds_npy"], 1)}
    peer_ratios: dict[str, float | str] = {
        "loader_vs_wds_npy": round(median_ratio(loader_rates, rates["wds_npy"]), 2),
        "mds": mds_version or "not installed",
    }
    if mds_version:
        peer_rates["mds_samples_per_s"] = round(medians["mds"], 1)
        peer_ratios["loader_vs_mds"] = round(median_ratio(loader_rates, rates["mds"]), 2)
    blocks: dict[str, float] = {}
    for size in block_sizes:
        blocks[f"zarr_block{size}_samples_per_s"] = round(medians[f"zarr_block{size}"], 1)
        blocks[f"zarr_block{size}_blocks_per_batch"] = round(
            blocks_per_batch([len(images)], size, chunk_tiles, args.batch), 1)
    return {
        "format": args.format,
        "workers": args.workers,
        "batch": args.batch,
        "samples_per_s": round(loader_rate, 1),
        "mb_per_s": round(loader_rate * tile_mb, 1),
        "ceiling_samples_per_s": round(medians["ceiling"], 1),
        "bare_copy_samples_per_s": round(bare_rate, 1),
        "png_wds_samples_per_s": round(png_rate, 1),
        **peer_rates,
        "loader_vs_ceiling": round(median_ratio(loader_rates, ceiling_rates), 3),
        "loader_vs_ceiling_windows": "/".join(f"{a / b:.2f}" for a, b in zip(loader_rates, ceiling_rates, strict=True)),
        "loader_vs_png_wds": round(loader_rate / png_rate, 2),
        **peer_ratios,
        **blocks,
        **({"zarr_chunk_tiles": chunk_tiles} if block_sizes else {}),
        **({} if not other_cores else {"other_load_cores": round(float(np.median(other_cores)), 2),
                                       "other_load_cores_max": round(max(other_cores), 2)}),
        "tiles_per_s_per_core": round(loader_rate / cores, 1),
        "cpu_augment_tiles_per_s_per_core": round(augment_rate, 1),
        **({} if device_rate is None else {"device": args.device, "device_augment_tiles_per_s": round(device_rate, 1)}),
    }
