"""Train and validation loaders over a tar or Zarr source: exact, resumable, deterministic.

Usage (what ``unetdist.train`` does)::

    train = build_train_loader(config.data, rank=r, world_size=R, seed=config.train.seed,
                               global_batch_size=G, micro_batch_size=m, in_channels=C,
                               num_classes=K, use_weight_map=True, start_sample=step * G)
    for micro_batch in train:                   # endless; accumulation_steps per optimizer step
        batch = to_model_input(micro_batch, device)   # data.augment_on=device: augment + normalise here
    train.state_dict()  # {"start_sample": ..., "epoch": ..., "skipped_samples": ...}

Which sample each micro-batch holds is defined in :mod:`unetdist.data.sequence`; a worker
produces the rank's micro-batches ``q`` with ``q % W == worker`` (the DataLoader returns
them round-robin, in order; each batch carries its index and :class:`TrainLoader` checks
it). A worker reads its samples (:mod:`unetdist.data.webdataset` / :mod:`unetdist.data.zarr`),
crops them (random window, or centred on foreground with ``data.foreground_fraction``),
draws each sample's augmentation parameters from (seed, position) and builds, in shared
memory (handing it over copies nothing), a batch of ``{"image": [B,C,T,T] stored dtype,
"mask": [B,T,T] uint8, "weight": [B,T,T] f32, "key": [...], "augment": ..., "normalize": ...}`` — or, with ``data.augment_on=worker``,
the model-ready float32 batch (:func:`unetdist.data.augment.to_model_input` already run).

Bad samples: ``data.on_error=raise`` stops with the :class:`DataError` naming store, key
and problem; ``skip`` logs it, counts it (``batch["skipped"]``, ``TrainLoader.skipped_samples``)
and fills its slot with the next good sample of the same micro-batch, so batch shapes and
the positions of all other samples stay as they were.
"""

from __future__ import annotations

import logging
import math
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from unetdist.config import DataConfig
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


def _batch_array(shape: tuple[int, ...], dtype: np.dtype) -> tuple[torch.Tensor, np.ndarray]:
    """An empty batch tensor and its numpy view; in a DataLoader worker it lives in shared
    memory (as ``default_collate`` does), so handing it to the training process copies nothing."""
    dtype = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
    if get_worker_info() is None:
        tensor = torch.empty(shape, dtype=dtype)
    else:
        storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
        tensor = torch.empty(0, dtype=dtype).set_(storage).view(shape)
    return tensor, tensor.numpy()


def collate(samples: list[Sample], windows: list[tuple[int, int]], options: BatchOptions) -> dict[str, Any]:
    """Crop each sample to its window, copied straight into the compact batch (stored dtypes)."""
    size, count = options.tile_size, len(samples)
    channels = samples[0].image.shape[0]
    image, image_out = _batch_array((count, channels, size, size), np.result_type(*(s.image for s in samples)))
    mask, mask_out = _batch_array((count, size, size), np.dtype(np.uint8))
    weight, weight_out = (None, None)
    if samples[0].weight is not None:
        weight, weight_out = _batch_array((count, size, size), np.dtype(np.float32))
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
                 num_workers: int, start_micro: int = 0) -> None:
        super().__init__()
        self.source, self.sequence, self.layout, self.options = source, sequence, layout, options
        self.num_workers, self.start_micro = num_workers, start_micro

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, workers = _reader_slot(self.num_workers)
        micro_index = self.start_micro + worker
        while True:
            yield self.micro_batch(micro_index)
            micro_index += workers

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
        batch = collate(samples, windows, self.options)
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
        self.loader = DataLoader(stream, batch_size=None, **loader_kwargs)

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
        for batch in self.loader:
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
        self.loader = DataLoader(self.stream, batch_size=None, **self.loader_kwargs)


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
            batch = collate(samples, windows, self.options)
            yield to_model_input(batch, "cpu") if self.options.augment_on == "worker" else batch


# ---------------------------------------------------------------- building


def _init_worker(worker_id: int) -> None:
    # Several workers share each rank's cores with the training process: one thread each.
    torch.set_num_threads(1)
    # Slurm and torchrun signal every process of a job; a worker that died of SIGTERM would
    # fail the step before the trainer can save. The training process stops its workers itself.
    for stop_signal in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(stop_signal, signal.SIG_IGN)


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
    source = source if source is not None else open_source(data, "train", checks, shards)
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
    stream = TrainStream(
        source, sequence, layout, _options(data, train=True),
        num_workers=data.num_workers, start_micro=layout.first_micro_batch(start_sample),
    )
    return TrainLoader(stream, _loader_kwargs(data, data.pin_memory, multiprocessing_context))


def log_topology(data: DataConfig, source, sequence: GlobalSequence, layout: RankLayout, block_size: int) -> None:
    samples, length = sequence.blocks.num_samples, sequence.epoch_length
    change = (
        f"pads {length - samples} repeated sample(s)" if length > samples else
        f"drops {samples - length} sample(s)" if length < samples else "neither pads nor drops"
    )
    log.info(
        "data: %s, %d unit(s), %d train samples in blocks of %d; %d rank(s) x %d worker(s); global batch %d "
        "= %d x %d per rank; epoch of %d steps (epoch_end=%s %s)",
        data.format, len(source.counts), samples, block_size, layout.world_size, max(1, data.num_workers),
        layout.global_batch_size, layout.accumulation_steps, layout.micro_batch_size,
        length // layout.global_batch_size, data.epoch_end, change,
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
    stream = ValStream(
        source, _options(data, train=False), rank=rank, world_size=world_size,
        num_workers=data.num_workers, micro_batch_size=micro_batch_size,
    )
    return DataLoader(stream, batch_size=None, **_loader_kwargs(data, False, multiprocessing_context))
