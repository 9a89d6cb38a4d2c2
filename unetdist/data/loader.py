"""Train and validation loaders over a tar or Zarr source: exact, resumable, deterministic.

Usage (what ``unetdist.train`` does)::

    train = build_train_loader(config.data, rank=r, world_size=R, seed=config.train.seed,
                               global_batch_size=G, micro_batch_size=m, in_channels=C,
                               num_classes=K, use_weight_map=True, start_sample=step * G)
    for micro_batch in train:                   # endless; accumulation_steps per optimizer step
        batch = to_model_input(micro_batch, device)   # data.augment_on=device: augment + normalise here
    train.state_dict()  # {"start_sample": ..., "epoch": ..., "skipped_samples": ...}

Which sample each micro-batch holds is defined in :mod:`unetdist.data.sequence`. A worker
hands over ``k = data.prefetch_factor`` consecutive micro-batches at a time, in one
shared-memory block (each hand-over has a fixed cost on the training thread, see
:func:`_pack`): worker ``w`` makes the rank's items ``i`` with ``i % W == w``, holding
micro-batches ``[i*k, (i+1)*k)`` from the start position, and the DataLoader keeps one item
per worker in flight and returns them round-robin, in order; each micro-batch carries its
index and :class:`TrainLoader` checks it. A worker reads its samples
(:mod:`unetdist.data.webdataset` / :mod:`unetdist.data.zarr`), crops them (random window,
or centred on foreground with ``data.foreground_fraction``), draws each sample's
augmentation parameters from (seed, position) and builds a batch of ``{"image": [B,C,T,T]
stored dtype, "mask": [B,T,T] uint8, "weight": [B,T,T] f32, "key": [...], "augment": ...,
"normalize": ...}`` — or, with ``data.augment_on=worker``, the model-ready float32 batch
(:func:`unetdist.data.augment.to_model_input` already run).

Bad samples: ``data.on_error=raise`` stops with the :class:`DataError` naming store, key
and problem; ``skip`` logs it, counts it (``batch["skipped"]``, ``TrainLoader.skipped_samples``)
and fills its slot with the next good sample of the same micro-batch, so batch shapes and
the positions of all other samples stay as they were.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import signal
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from unetdist.config import ConfigError, DataConfig
from unetdist.data.augment import AugmentSpec, crop_windows, draw_params, sample_words, to_model_input
from unetdist.data.samples import DataError, Sample, SampleChecks
from unetdist.data.sequence import Blocks, GlobalSequence, RankLayout
from unetdist.data.webdataset import TarShards, list_shards, shard_counts
from unetdist.data.zarr import STORE_NAME, ZarrTiles
from unetdist.data.zarr_images import ZarrImages, is_whole_image_store

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- sources


def open_source(data: DataConfig, split: str, checks: SampleChecks, shards: list[str] | None = None):
    """The tar or Zarr source of ``split`` named by the data config (or an explicit shard list)."""
    if data.format == "zarr":
        store = data.zarr_store or (str(Path(data.root) / STORE_NAME) if data.root else "")
        if not store:
            raise ValueError("data.format=zarr needs data.root (a prepare --format zarr folder) or data.zarr_store")
        if is_whole_image_store(store, split):  # prepare --format zarr --whole-images
            return ZarrImages(store, split, checks, data.tiles_per_image,
                              foreground_fraction=data.foreground_fraction if split == "train" else 0.0)
        return ZarrTiles(store, split, checks)
    pattern = data.train_shards if split == "train" else data.val_shards
    if shards is None:
        shards = list_shards(data.root or None, split, pattern or None)
    counts = None if pattern or not data.root else shard_counts(data.root, split, shards)
    return TarShards(shards, checks, counts)


def _read(source, units: np.ndarray, indices: np.ndarray) -> list[Sample | DataError]:
    """Samples at (unit, index) pairs, reading each unit's indices together in ascending order."""
    out: list[Sample | DataError | None] = [None] * len(units)
    for unit in np.unique(units):
        where = np.flatnonzero(units == unit)
        wanted = sorted(set(int(i) for i in indices[where]))
        by_index = dict(zip(wanted, source.read(int(unit), wanted), strict=False))
        for slot in where:
            out[slot] = by_index[int(indices[slot])]
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class BatchOptions:
    tile_size: int
    augment_on: str
    normalize: str
    on_error: str
    foreground_fraction: float
    spec: AugmentSpec | None  # None: no augmentation (validation, or data.augment off)


def _batch_array(shape: tuple[int, ...], dtype: np.dtype, shared: bool = True) -> tuple[torch.Tensor, np.ndarray]:
    """An empty batch tensor and its numpy view; in a DataLoader worker, when ``shared``, it
    lives in shared memory (as ``default_collate`` does), so handing it to the training process
    copies nothing. Not ``shared``: the tensor is copied on before the hand-over (packed, or
    converted to model input in the worker) and only needs to be ordinary memory."""
    dtype = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
    if not shared or get_worker_info() is None:
        tensor = torch.empty(shape, dtype=dtype)
    else:
        storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
        tensor = torch.empty(0, dtype=dtype).set_(storage).view(shape)
    return tensor, tensor.numpy()


def collate(samples: list[Sample], windows: list[tuple[int, int]], options: BatchOptions,
            shared: bool = True) -> dict[str, Any]:
    """Crop each sample to its window, copied straight into the compact batch (stored dtypes);
    ``shared``: see :func:`_batch_array`."""
    size, count = options.tile_size, len(samples)
    channels = samples[0].image.shape[0]
    image_dtype = np.result_type(*(s.image for s in samples))
    image, image_out = _batch_array((count, channels, size, size), image_dtype, shared)
    mask, mask_out = _batch_array((count, size, size), np.dtype(np.uint8), shared)
    weight, weight_out = (None, None)
    if samples[0].weight is not None:
        weight, weight_out = _batch_array((count, size, size), np.dtype(np.float32), shared)
    for slot, (sample, (top, left)) in enumerate(zip(samples, windows, strict=True)):
        ys, xs = slice(top, top + size), slice(left, left + size)
        image_out[slot] = sample.image[:, ys, xs]
        mask_out[slot] = sample.mask[ys, xs]
        if weight_out is not None:
            weight_out[slot] = sample.weight[ys, xs]
    batch: dict[str, Any] = {"image": image, "mask": mask, "key": [s.key for s in samples], "normalize": options.normalize}
    if weight is not None:
        batch["weight"] = weight
    return batch


_PACK_ALIGN_BYTES = 64


def _pack(batches: list[dict[str, Any]]) -> dict[str, Any]:
    """A worker's micro-batches as one hand-over: all their tensors in one shared-memory block.

    Why: the training process fetches a file descriptor from the worker for every shared
    block it unpickles, over a socket with an authentication handshake (several round trips,
    each a wake-up of another process), and each DataLoader item costs it a few more
    wake-ups (the index queue's feeder thread, the result pipe). That is fixed per item and
    paid on the training thread: ~4 ms per item with three blocks (image, mask, weight) on
    the quickstart's 2 cores shared by 2 ranks and 2 workers, ~5% of its step. One block
    per item, and ``data.prefetch_factor`` micro-batches per item, divide it accordingly.
    :func:`_unpack` gives the micro-batches back, their tensors as views of the block.
    """
    layouts, size = [], 0
    for batch in batches:
        layout = []
        for name, value in batch.items():
            if isinstance(value, torch.Tensor):
                layout.append((name, value.dtype, tuple(value.shape), size))
                size += -(-value.numel() * value.element_size() // _PACK_ALIGN_BYTES) * _PACK_ALIGN_BYTES
        layouts.append(layout)
    block, _ = _batch_array((max(size, 1),), np.dtype(np.uint8))
    rest = []
    for batch, layout in zip(batches, layouts, strict=True):
        for name, dtype, shape, offset in layout:
            _view(block, dtype, shape, offset).copy_(batch[name])
        rest.append({name: value for name, value in batch.items() if not isinstance(value, torch.Tensor)})
    return {"packed": block, "layouts": layouts, "batches": rest}


def _unpack(item: dict[str, Any]) -> list[dict[str, Any]]:
    """The micro-batches of a DataLoader item: a :func:`_pack` item, or one plain batch."""
    if "packed" not in item:
        return [item]
    for batch, layout in zip(item["batches"], item["layouts"], strict=True):
        for name, dtype, shape, offset in layout:
            batch[name] = _view(item["packed"], dtype, shape, offset)
    return item["batches"]


def _view(block: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], offset: int) -> torch.Tensor:
    return block[offset : offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)


def _reader_slot(num_workers: int) -> tuple[int, int]:
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    if workers != max(1, num_workers):
        raise RuntimeError(f"dataset built for {max(1, num_workers)} data worker(s) runs in a loader with {workers}")
    return worker, workers


# ---------------------------------------------------------------- training


class TrainStream(IterableDataset):
    """Endless micro-batches of one rank, from ``start_micro`` on (see the module docstring)."""

    def __init__(self, source, sequence: GlobalSequence, layout: RankLayout, options: BatchOptions, *,
                 num_workers: int, start_micro: int = 0, group: int = 1) -> None:
        super().__init__()
        self.source, self.sequence, self.layout, self.options = source, sequence, layout, options
        self.num_workers, self.start_micro, self.group = num_workers, start_micro, group

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, workers = _reader_slot(self.num_workers)
        in_worker = get_worker_info() is not None
        group = self.group if in_worker else 1  # in the training process there is nothing to hand over
        item = worker  # items of `group` consecutive micro-batches; worker w makes items i with i % W == w
        while True:
            first = self.start_micro + item * group
            batches = [self.micro_batch(first + offset) for offset in range(group)]
            yield _pack(batches) if in_worker else batches[0]
            item += workers

    def micro_batch(self, micro_index: int) -> dict[str, Any]:
        """This rank's micro-batch ``micro_index``: a pure function of the arguments and the data."""
        positions = self.layout.micro_batch_positions(micro_index)
        epochs, units, indices = self.sequence.locate(positions)
        words = sample_words(self.sequence.seed, positions)  # this batch's random numbers, per position
        read_windows = getattr(self.source, "read_windows", None)  # whole images: the window is read
        read = read_windows(units, indices, words) if read_windows else _read(self.source, units, indices)
        samples, skipped = _replace_bad(read, self.options.on_error, f"micro-batch {micro_index}")
        spec, size = self.options.spec, self.options.tile_size
        windows = crop_windows([s.mask for s in samples], size, words, self.options.foreground_fraction)
        batch = collate(samples, windows, self.options, shared=False)  # a worker packs it (see _pack)
        if spec is not None:
            params, noise_seeds = draw_params(words, spec)
            # numpy, not tensors: small arrays travel pickled inline, while every tensor costs
            # the training process a file-descriptor handoff from the worker.
            batch["augment"] = (spec, params, noise_seeds)
        batch.update(index=micro_index, epoch=int(epochs[0]), skipped=skipped)
        return to_model_input(batch, "cpu") if self.options.augment_on == "worker" else batch


def _replace_bad(read: list[Sample | DataError], on_error: str, where: str) -> tuple[list[Sample], int]:
    bad = [i for i, item in enumerate(read) if isinstance(item, DataError)]
    if not bad:
        return read, 0  # type: ignore[return-value]
    if on_error == "raise":
        raise read[bad[0]]
    good = [i for i, item in enumerate(read) if not isinstance(item, DataError)]
    for i in bad:
        log.warning("data.on_error=skip: %s", read[i])
    if not good:
        raise DataError(f"{where}: every sample is bad, e.g. {read[bad[0]]}")
    out = list(read)
    for i in bad:  # the next good sample of the batch, cyclically: shapes and other positions unchanged
        out[i] = read[next((g for g in good if g > i), good[0])]
    return out, len(bad)  # type: ignore[return-value]


class TrainLoader:
    """The DataLoader over a :class:`TrainStream`, with the position it has reached.

    Iterate it once. ``state_dict()["start_sample"]`` is the number of global samples of the
    optimizer steps whose micro-batches were all handed out; pass it back as
    ``start_sample`` (or through :meth:`load_state_dict` before iterating) to resume.
    """

    def __init__(self, stream: TrainStream, loader_kwargs: dict[str, Any]) -> None:
        self.stream, self.loader_kwargs = stream, loader_kwargs
        self.layout, self.sequence = stream.layout, stream.sequence
        self.next_micro = stream.start_micro
        self.skipped_samples = 0
        self.loader = _worker_loader(stream, loader_kwargs)

    @property
    def samples_per_epoch(self) -> int:
        return self.sequence.epoch_length

    @property
    def steps_per_epoch(self) -> int:
        return self.sequence.epoch_length // self.layout.global_batch_size

    @property
    def epoch(self) -> int:
        return self.state_dict()["start_sample"] // self.sequence.epoch_length

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # The workers start here, not at the first next(): Trainer.fit calls iter() before its
        # step-0 validation, which so overlaps their start-up and first items.
        return self._in_order(iter(self.loader))

    def _in_order(self, items: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for item in items:
            for batch in _unpack(item):
                if batch["index"] != self.next_micro:
                    raise RuntimeError(f"data loader out of order: micro-batch {batch['index']}, expected {self.next_micro}")
                self.next_micro += 1
                self.skipped_samples += int(batch.pop("skipped"))
                yield batch

    def state_dict(self) -> dict[str, int]:
        steps = self.next_micro // self.layout.accumulation_steps
        start = steps * self.layout.global_batch_size
        return {"start_sample": start, "epoch": start // self.sequence.epoch_length, "skipped_samples": self.skipped_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        start_micro = self.layout.first_micro_batch(int(state["start_sample"]))
        self.stream.start_micro = self.next_micro = start_micro
        self.skipped_samples = int(state.get("skipped_samples", 0))
        self.loader = _worker_loader(self.stream, self.loader_kwargs)


# ---------------------------------------------------------------- validation


class ValStream(IterableDataset):
    """Every validation sample exactly once across all ranks and workers, centre-cropped, in order.

    Stored order, split by sample index: reader slot ``worker * R + rank`` takes the
    samples with ``index % (R*W) == slot``, so rank r's share is ``index % R == r``
    whatever the worker count, and ranks differ by at most one sample.
    """

    def __init__(self, source, options: BatchOptions, *, rank: int, world_size: int, num_workers: int,
                 micro_batch_size: int) -> None:
        super().__init__()
        self.source, self.options = source, options
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.micro_batch_size = micro_batch_size
        self.skipped = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, workers = _reader_slot(self.num_workers)
        ends = np.cumsum(self.source.counts)
        mine = np.arange(worker * self.world_size + self.rank, int(ends[-1]) if len(ends) else 0, self.world_size * workers)
        size = self.options.tile_size
        for begin in range(0, len(mine), self.micro_batch_size):
            chosen = mine[begin : begin + self.micro_batch_size]
            units = np.searchsorted(ends, chosen, side="right")
            indices = chosen - (ends[units] - np.asarray(self.source.counts)[units])
            samples = []
            for item in _read(self.source, units, indices):
                if isinstance(item, DataError):
                    if self.options.on_error == "raise":
                        raise item
                    log.warning("data.on_error=skip: %s", item)
                    continue
                samples.append(item)
            if not samples:
                continue
            windows = [((s.mask.shape[0] - size) // 2, (s.mask.shape[1] - size) // 2) for s in samples]
            batch = collate(samples, windows, self.options, shared=self.options.augment_on != "worker")
            yield to_model_input(batch, "cpu") if self.options.augment_on == "worker" else batch


# ---------------------------------------------------------------- building


def _init_worker(worker_id: int) -> None:
    # Several workers share each rank's cores with the training process: one thread each.
    torch.set_num_threads(1)
    # Slurm and torchrun signal every process of a job; a worker that died of SIGTERM would
    # fail the step before the trainer can save. The training process stops its workers itself.
    for stop_signal in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(stop_signal, signal.SIG_IGN)


_LIVE_LOADERS: weakref.WeakSet[DataLoader] = weakref.WeakSet()


def _worker_loader(stream: IterableDataset, loader_kwargs: dict[str, Any]) -> DataLoader:
    """A DataLoader over ``stream`` whose workers :func:`_stop_workers_at_exit` stops."""
    loader = DataLoader(stream, batch_size=None, **loader_kwargs)
    _LIVE_LOADERS.add(loader)
    return loader


@atexit.register  # registered after multiprocessing's exit handler, so it runs before it
def _stop_workers_at_exit() -> None:
    """Stop the workers the DataLoader's own way (done event, join) at interpreter exit.

    Our workers ignore SIGTERM (:func:`_init_worker`), and multiprocessing's exit handler
    ends daemonic children with SIGTERM and then joins them: after an uncaught error, while
    the traceback still holds the loader's iterator, a run would wait for its workers forever
    instead of exiting and letting torchrun or Slurm act.
    """
    for loader in list(_LIVE_LOADERS):
        iterator = getattr(loader, "_iterator", None)  # persistent workers: the DataLoader keeps it
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()


def _loader_kwargs(data: DataConfig, pin_memory: bool, multiprocessing_context: str | None) -> dict[str, Any]:
    workers = data.num_workers
    context = multiprocessing_context or (None if data.worker_start_method == "default" else data.worker_start_method)
    return dict(
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=data.prefetch_factor if workers > 0 else None,
        pin_memory=pin_memory and torch.cuda.is_available(),  # pinned pages only help CUDA copies
        worker_init_fn=_init_worker if workers > 0 else None,
        multiprocessing_context=context if workers > 0 else None,
    )


def _options(data: DataConfig, *, train: bool) -> BatchOptions:
    spec = None
    if train:
        spec = AugmentSpec(
            flips=data.augment,
            intensity=data.augment_intensity,
            noise_std=data.augment_noise_std,
            elastic=data.augment_elastic,
            elastic_sigma_px=data.elastic_sigma_px,
            normalize=data.normalize,
        )
        spec = spec if spec.any else None
    return BatchOptions(
        tile_size=data.tile_size,
        augment_on=data.augment_on,
        normalize=data.normalize,
        on_error=data.on_error,
        foreground_fraction=data.foreground_fraction if train else 0.0,
        spec=spec,
    )


def _legacy_config(shards: list[str], legacy: dict[str, Any]) -> DataConfig:
    """The spine's call (a shard list + tile_size/num_workers/augment/... keywords) as a DataConfig."""
    known = {"tile_size", "num_workers", "augment", "shuffle_buffer", "pin_memory"}
    unknown = set(legacy) - known
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {sorted(unknown)}")
    legacy.pop("shuffle_buffer", None)
    return DataConfig(root="", train_shards="", **legacy)


def build_train_loader(
    data: DataConfig | list[str],
    *,
    rank: int,
    world_size: int,
    seed: int,
    micro_batch_size: int,
    in_channels: int,
    num_classes: int,
    use_weight_map: bool,
    global_batch_size: int = 0,
    start_sample: int = 0,
    multiprocessing_context: str | None = None,
    source: Any = None,
    **legacy: Any,
) -> TrainLoader:
    """This rank's endless training micro-batches, continuing the global sequence at ``start_sample``.

    ``global_batch_size`` 0 means ``micro_batch_size * world_size`` (no accumulation).
    A shard list as ``data`` with the spine's keywords (tile_size=, num_workers=, augment=,
    pin_memory=) still works. ``source`` replaces the configured store with an already open
    one (anything with ``counts`` and ``read``, e.g. the bench's in-memory tiles).
    """
    shards = None
    if not isinstance(data, DataConfig):
        shards, data = list(data), _legacy_config(list(data), legacy)
    elif legacy:
        raise TypeError(f"unexpected keyword argument(s) {sorted(legacy)} next to a DataConfig")
    checks = SampleChecks(data.tile_size, in_channels, num_classes, use_weight_map)
    if source is None:
        check_tile_size(data)
        source = open_source(data, "train", checks, shards)
    layout = RankLayout(global_batch_size or micro_batch_size * world_size, world_size, rank, micro_batch_size)
    block_size = data.block_size or getattr(source, "chunk_tiles", 1)
    sequence = GlobalSequence(
        Blocks.from_counts(source.counts, block_size),
        seed=seed,
        global_batch_size=layout.global_batch_size,
        epoch_end=data.epoch_end,
    )
    if rank == 0:
        log_topology(data, source, sequence, layout, block_size)
    # A worker hands over its data.prefetch_factor micro-batches in flight as one item (see _pack),
    # so the DataLoader keeps one item per worker in flight.
    group = data.prefetch_factor if data.num_workers > 0 else 1
    stream = TrainStream(
        source, sequence, layout, _options(data, train=True),
        num_workers=data.num_workers, start_micro=layout.first_micro_batch(start_sample), group=group,
    )
    loader_kwargs = _loader_kwargs(data, data.pin_memory, multiprocessing_context)
    if data.num_workers > 0:
        loader_kwargs["prefetch_factor"] = 1
    return TrainLoader(stream, loader_kwargs)


def _unit_name(source) -> str:
    """What one unit of ``source`` is: a tar shard, a whole image, a pre-tiled Zarr array."""
    if isinstance(source, TarShards):
        return "shard"
    if isinstance(source, ZarrImages):
        return "image"
    return "array" if isinstance(source, ZarrTiles) else "unit"


def log_topology(data: DataConfig, source, sequence: GlobalSequence, layout: RankLayout, block_size: int) -> None:
    """The start-up line: ranks x workers x units, and how the global batch and the epoch are cut.

    Workers are not tied to units: a worker makes every W-th item of its rank's endless
    micro-batch sequence by random access, so no count of workers, shards or images leaves
    one without work. What cannot run is refused where it is built: an epoch of no step
    (:func:`unetdist.data.sequence.epoch_length`), tiles smaller than ``data.tile_size``
    (:func:`check_tile_size`), fewer validation samples than ranks (:func:`build_val_loader`).
    """
    samples, length = sequence.blocks.num_samples, sequence.epoch_length
    change = (
        f"pads {length - samples} repeated sample(s)" if length > samples else
        f"drops {samples - length} sample(s)" if length < samples else "neither pads nor drops"
    )
    workers, units = max(1, data.num_workers), len(source.counts)
    handover = f"; a worker hands over {data.prefetch_factor} micro-batches at a time" if data.num_workers > 0 else ""
    log.info(
        "data: %d rank(s) x %d worker(s) x %d %s(s) (%s, %d train samples in blocks of %d); global batch %d "
        "= %d rank(s) x %d x %d; epoch of %d steps (epoch_end=%s %s)%s",
        layout.world_size, workers, units, _unit_name(source), data.format, samples, block_size,
        layout.global_batch_size, layout.world_size, layout.accumulation_steps, layout.micro_batch_size,
        length // layout.global_batch_size, data.epoch_end, change, handover,
    )


def check_tile_size(data: DataConfig) -> None:
    """Refuse a ``data.tile_size`` larger than the tiles of the prepare folder ``data.root``.

    Otherwise every sample fails its check in the workers, after the start-up. Stores of
    whole images check their images themselves; explicit shard lists are checked per sample.
    """
    explicit = data.train_shards if data.format == "webdataset" else data.zarr_store
    if not data.root or explicit:
        return
    try:
        meta = json.loads((Path(data.root) / "dataset.json").read_text())
    except (OSError, ValueError):
        return  # the source names a missing or unreadable dataset.json itself
    if not isinstance(meta, dict) or meta.get("layout") == "whole-images" or meta.get("format") != data.format:
        return
    stored = meta.get("tile_size")
    if isinstance(stored, int) and data.tile_size > stored:
        raise ConfigError(
            f"data.tile_size={data.tile_size} is larger than the {stored}x{stored} tiles stored in {data.root} "
            f"(its dataset.json): set data.tile_size to at most {stored}, or prepare the data again with "
            f"--tile {data.tile_size} or more"
        )


def build_val_loader(
    data: DataConfig | list[str],
    *,
    rank: int,
    world_size: int,
    micro_batch_size: int,
    in_channels: int,
    num_classes: int,
    use_weight_map: bool,
    multiprocessing_context: str | None = None,
    **legacy: Any,
) -> DataLoader:
    """A finite loader of this rank's share of the validation samples (the last batch may be short)."""
    shards = None
    if not isinstance(data, DataConfig):
        shards, data = list(data), _legacy_config(list(data), legacy)
        if not shards:
            raise ValueError("no val shards: prepare with --val-fraction > 0 or skip validation")
    checks = SampleChecks(data.tile_size, in_channels, num_classes, use_weight_map)
    source = open_source(data, "val", checks, shards)
    if sum(source.counts) == 0:
        raise ValueError("no validation samples: prepare with --val-fraction > 0")
    samples = sum(source.counts)
    if samples < world_size:
        # A rank without a validation batch makes no forward pass there, so it skips the buffer
        # broadcast (BatchNorm statistics) that DDP makes at each rank's first forward after
        # training, and the other ranks wait for it until train.timeout_s.
        idle = f"rank {samples}" if samples == world_size - 1 else f"ranks {samples}..{world_size - 1}"
        raise ConfigError(
            f"the validation split has {samples} sample(s) for {world_size} ranks: {idle} would get none "
            "and validation would hang; hold out more validation data (prepare --val-fraction, or a larger "
            "split in data.val_shards / data.root) or run fewer ranks (--nproc_per_node)"
        )
    stream = ValStream(
        source, _options(data, train=False), rank=rank, world_size=world_size,
        num_workers=data.num_workers, micro_batch_size=micro_batch_size,
    )
    return _worker_loader(stream, _loader_kwargs(data, False, multiprocessing_context))
