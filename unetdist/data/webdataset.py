"""Streaming training/validation tiles from webdataset shards written by ``unetdist.prepare``.

Flow per reader (one DataLoader worker of one rank): its shards -> webdataset tar reading
and .npy decoding -> checks (channels, labels, sizes) -> shuffle buffer (train) -> crop,
flips/rot90 (train) -> z-score -> collated batches of
``{"image": f32 [B,C,T,T], "mask": i64 [B,T,T], "weight": f32 [B,T,T] (optional), "key": list[str]}``.

The rank/worker split is done here rather than by webdataset's ``split_by_node`` (which
reads RANK from the environment) so that it is a pure function of explicit arguments.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from itertools import count
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from unetdist.data import transforms

# Distinct first words keep the seed streams apart: numpy's SeedSequence pads entropy with
# zeros, so [seed, epoch] and [seed, epoch, 0, 0] would otherwise be the same stream.
_SHARD_ORDER_STREAM = 0x5348
_SAMPLE_STREAM = 0x534D


# ---------------------------------------------------------------- shard lists


def _expand_pattern(pattern: str) -> list[str]:
    import braceexpand

    urls = [url for part in pattern.split("::") for url in braceexpand.braceexpand(part.strip()) if url]
    if not urls:
        raise ValueError(f"shard pattern {pattern!r} expands to no shards")
    missing = [
        url for url in urls if urlparse(url).scheme in ("", "file") and not Path(_local_path(url)).is_file()
    ]
    if missing:
        raise ValueError(
            f"shard pattern {pattern!r}: {len(missing)} shard(s) do not exist, e.g. {missing[:3]}"
        )
    return urls


def _local_path(url: str) -> str:
    return urlparse(url).path if url.startswith("file:") else url


def list_shards(root: str | None, split: str, pattern: str | None = None) -> list[str]:
    """Shard URLs for ``split`` ("train"/"val").

    ``pattern`` wins when given: brace-expanded (``dir/train-{000000..000007}.tar``), several
    joined with ``::``, any URL webdataset opens (``pipe:``, ``file:``, ...). Otherwise
    ``ROOT/dataset.json``'s ``"<split>_shards"`` joined to ROOT (may be empty for val).
    """
    if pattern:
        return _expand_pattern(pattern)
    if not root:
        raise ValueError(
            f"no {split} shard pattern and no data root: set data.root (a prepare output folder)"
        )
    meta_path = Path(root) / "dataset.json"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise ValueError(
            f"{meta_path} not found: is {root} a folder written by `python -m unetdist.prepare`?"
        ) from None
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{meta_path}: cannot read: {err}") from err
    names = meta.get(f"{split}_shards") if isinstance(meta, dict) else None
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"{meta_path}: expected a list of shard file names under {split + '_shards'!r}")
    paths = [os.path.join(root, name) for name in names]
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise ValueError(
            f"{meta_path}: {len(missing)} listed {split} shard(s) are missing, e.g. {missing[:3]}"
        )
    return paths


def shard_order(shards: list[str], epoch: int, seed: int) -> list[str]:
    """The shard list permuted for ``epoch``; every rank computes the same order."""
    rng = np.random.default_rng([_SHARD_ORDER_STREAM, seed, epoch])
    return [shards[i] for i in rng.permutation(len(shards))]


def assign_shards(
    shards: list[str], epoch: int, seed: int, rank: int, world_size: int, worker: int, num_workers: int
) -> list[str]:
    """The shards that reader slot (rank, worker) reads in ``epoch``.

    The R*W slots (W = max(1, num_workers)), numbered ``rank * W + worker``, take every
    (R*W)-th shard of the epoch's permutation, so each shard is read by exactly one slot.
    """
    workers = max(1, num_workers)
    if not (0 <= rank < world_size and 0 <= worker < workers):
        raise ValueError(f"reader slot rank={rank}/{world_size}, worker={worker}/{workers} out of range")
    readers = world_size * workers
    return shard_order(shards, epoch, seed)[rank * workers + worker :: readers]


def check_enough_shards(num_shards: int, world_size: int, num_workers: int) -> None:
    """Every reader needs at least one shard, else ranks would drift apart in samples per epoch."""
    readers = world_size * max(1, num_workers)
    if num_shards < readers:
        raise ValueError(
            f"{num_shards} train shard(s) for {world_size} rank(s) x {max(1, num_workers)} data worker(s) = "
            f"{readers} readers; each needs at least one shard: write more, smaller shards "
            "(prepare --shard-size) or use fewer data workers (data.num_workers)"
        )


# ---------------------------------------------------------------- decoding and checks


@dataclass(frozen=True)
class TileChecks:
    """What a decoded sample must look like for the model it feeds."""

    tile_size: int
    in_channels: int
    num_classes: int
    use_weight_map: bool


@dataclass
class Tile:
    """One checked sample on its way through the stream."""

    key: str
    shard: str
    image: np.ndarray  # [C, H, W], stored dtype
    mask: np.ndarray  # [H, W], integer class ids
    weight: np.ndarray | None  # [H, W] float32


def check_tile(sample: dict, checks: TileChecks) -> Tile:
    """A webdataset-decoded sample as a checked :class:`Tile`; errors name shard and key."""
    key, shard = sample.get("__key__", "?"), sample.get("__url__", "?")
    where = f"shard {shard} sample {key}"
    fields = ["image.npy", "mask.npy"] + (["weight.npy"] if checks.use_weight_map else [])
    absent = [name for name in fields if name not in sample]
    if absent:
        hint = " (prepare with instance masks and without --no-weight-map, or turn off loss.use_weight_map)"
        raise ValueError(
            f"{where}: missing {absent}; it has {sorted(k for k in sample if not k.startswith('__'))}"
            + (hint if "weight.npy" in absent else "")
        )
    image, mask = sample["image.npy"], sample["mask.npy"]
    if image.ndim != 3 or image.shape[0] != checks.in_channels:
        raise ValueError(
            f"{where}: image shape {image.shape}, expected [{checks.in_channels}, H, W] (model.in_channels)"
        )
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"{where}: mask must be an integer HxW array, got {mask.dtype} {mask.shape}")
    if image.shape[1:] != mask.shape:
        raise ValueError(f"{where}: image size {image.shape[1:]} differs from mask size {mask.shape}")
    low, high = int(mask.min()), int(mask.max())
    if low < 0 or high >= checks.num_classes:
        bad = high if high >= checks.num_classes else low
        raise ValueError(
            f"{where}: mask label {bad} out of range for num_classes={checks.num_classes} (data/model.num_classes)"
        )
    if min(mask.shape) < checks.tile_size:
        raise ValueError(f"{where}: tile {mask.shape} is smaller than data.tile_size={checks.tile_size}")
    weight = None
    if checks.use_weight_map:
        weight = sample["weight.npy"]
        if weight.shape != mask.shape:
            raise ValueError(f"{where}: weight shape {weight.shape} differs from mask shape {mask.shape}")
    return Tile(key, shard, image, mask, weight)


def read_tiles(urls: list[str], checks: TileChecks, start: int = 0, step: int = 1) -> Iterator[Tile]:
    """Checked tiles from ``urls`` in order; with ``start``/``step`` only every step-th sample
    is decoded (the others are only read past)."""
    import webdataset as wds

    pipeline = wds.WebDataset(
        urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False
    )
    if step > 1 or start > 0:
        pipeline = pipeline.slice(start, None, step)
    for sample in pipeline.decode():
        yield check_tile(sample, checks)


def buffered_shuffle(items: Iterable, buffer_size: int, rng: np.random.Generator) -> Iterator:
    """Shuffle a stream with a bounded buffer: each new item swaps out a random buffered one."""
    if buffer_size <= 1:
        yield from items
        return
    buffer: list = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        index = int(rng.integers(0, buffer_size))
        yield buffer[index]
        buffer[index] = item
    for index in rng.permutation(len(buffer)):
        yield buffer[index]


def to_batch_item(tile: Tile) -> dict:
    item = {
        "image": torch.from_numpy(np.ascontiguousarray(transforms.zscore_per_channel(tile.image))),
        "mask": torch.from_numpy(np.ascontiguousarray(tile.mask, dtype=np.int64)),
        "key": tile.key,
    }
    if tile.weight is not None:
        item["weight"] = torch.from_numpy(np.ascontiguousarray(tile.weight, dtype=np.float32))
    return item


def _reader_slot(num_workers: int) -> tuple[int, int]:
    """(worker id, worker count) of the calling process; checks the loader has the expected count."""
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    if workers != max(1, num_workers):
        raise RuntimeError(
            f"dataset built for {max(1, num_workers)} data worker(s) runs in a loader with {workers}"
        )
    return worker, workers


# ---------------------------------------------------------------- streams


class TrainTileStream(IterableDataset):
    """Shuffled, augmented training tiles, epoch after epoch (``epochs=None``: forever).

    Epoch ``e`` of reader (rank, worker) reads ``assign_shards(shards, e, ...)`` and shuffles
    its samples with a generator seeded from (seed, e, rank, worker), so the stream is
    deterministic and, per epoch, every shard is read by exactly one reader.
    """

    def __init__(
        self,
        shards: list[str],
        *,
        checks: TileChecks,
        rank: int,
        world_size: int,
        num_workers: int,
        seed: int,
        augment: bool,
        shuffle_buffer: int = 256,
        epochs: int | None = None,
        start_epoch: int = 0,
    ) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        check_enough_shards(len(shards), world_size, num_workers)
        self.shards = list(shards)
        self.checks = checks
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.seed, self.augment, self.shuffle_buffer = seed, augment, shuffle_buffer
        self.epochs, self.start_epoch = epochs, start_epoch

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _reader_slot(self.num_workers)
        first = self.start_epoch
        for epoch in count(first) if self.epochs is None else range(first, first + self.epochs):
            urls = assign_shards(self.shards, epoch, self.seed, self.rank, self.world_size, worker, workers)
            shuffle_seq, augment_seq = np.random.SeedSequence(
                [_SAMPLE_STREAM, self.seed, epoch, self.rank, worker]
            ).spawn(2)
            augment_rng = np.random.default_rng(augment_seq)
            tiles = buffered_shuffle(
                read_tiles(urls, self.checks), self.shuffle_buffer, np.random.default_rng(shuffle_seq)
            )
            for tile in tiles:
                image, mask, weight = transforms.random_crop(
                    tile.image, tile.mask, tile.weight, self.checks.tile_size, augment_rng
                )
                if self.augment:
                    image, mask, weight = transforms.random_flip_rot90(image, mask, weight, augment_rng)
                yield to_batch_item(replace(tile, image=image, mask=mask, weight=weight))


class ValTileStream(IterableDataset):
    """Every validation tile exactly once across all ranks and workers; center-cropped, in order.

    Split by sample index, not by shard: a val set often has fewer shards than ranks, and a
    shard split would leave ranks empty or unequal. Every reader reads all val shards (small)
    and decodes only the samples with ``index % (R*W) == worker * R + rank``; so rank r's
    share is exactly ``index % R == r`` whatever the worker count, and ranks differ by at
    most one sample.
    """

    def __init__(
        self, shards: list[str], *, checks: TileChecks, rank: int, world_size: int, num_workers: int
    ) -> None:
        super().__init__()
        if not shards:
            raise ValueError("no val shards: prepare with --val-fraction > 0 or skip validation")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        self.shards = list(shards)
        self.checks = checks
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _reader_slot(self.num_workers)
        slot, size = worker * self.world_size + self.rank, self.checks.tile_size
        for tile in read_tiles(self.shards, self.checks, start=slot, step=self.world_size * workers):
            image, mask, weight = transforms.center_crop(tile.image, tile.mask, tile.weight, size)
            yield to_batch_item(replace(tile, image=image, mask=mask, weight=weight))


# ---------------------------------------------------------------- loaders


def _init_worker(worker_id: int) -> None:
    # Each rank runs several workers next to its training process: one thread each avoids
    # oversubscribing the CPU cores.
    torch.set_num_threads(1)


def make_loader(
    dataset: IterableDataset, *, micro_batch_size: int, num_workers: int, pin_memory: bool, drop_last: bool
) -> DataLoader:
    """The DataLoader settings shared by train and val streams."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    return DataLoader(
        dataset,
        batch_size=micro_batch_size,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None,
        pin_memory=pin_memory,
        drop_last=drop_last,
        worker_init_fn=_init_worker if num_workers > 0 else None,
    )


def build_train_loader(
    shards: list[str],
    *,
    tile_size: int,
    micro_batch_size: int,
    num_workers: int,
    rank: int,
    world_size: int,
    seed: int,
    in_channels: int,
    num_classes: int,
    use_weight_map: bool,
    augment: bool,
    shuffle_buffer: int = 256,
    pin_memory: bool = False,
) -> DataLoader:
    """An endless loader of training batches for ``rank`` of ``world_size``."""
    dataset = TrainTileStream(
        shards,
        checks=TileChecks(tile_size, in_channels, num_classes, use_weight_map),
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        seed=seed,
        augment=augment,
        shuffle_buffer=shuffle_buffer,
    )
    return make_loader(
        dataset,
        micro_batch_size=micro_batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=True,
    )


def build_val_loader(
    shards: list[str],
    *,
    tile_size: int,
    micro_batch_size: int,
    num_workers: int,
    rank: int,
    world_size: int,
    in_channels: int,
    num_classes: int,
    use_weight_map: bool,
) -> DataLoader:
    """A finite loader of this rank's share of the validation tiles (may end with a short batch)."""
    dataset = ValTileStream(
        shards,
        checks=TileChecks(tile_size, in_channels, num_classes, use_weight_map),
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
    )
    return make_loader(
        dataset, micro_batch_size=micro_batch_size, num_workers=num_workers, pin_memory=False, drop_last=False
    )
