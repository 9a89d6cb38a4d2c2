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
:func:`unetdist.data.batching.pack`): worker ``w`` makes the rank's items ``i`` with
``i % W == w``, holding micro-batches ``[i*k, (i+1)*k)`` from the start position, and the
DataLoader keeps one item per worker in flight and returns them round-robin, in order; each
micro-batch carries its index and :class:`TrainLoader` checks it. A worker reads its samples
(:mod:`unetdist.data.sources`), crops them (random window, or centred on foreground with
``data.foreground_fraction``), draws each sample's augmentation parameters from (seed, position) and builds a batch of ``{"image": [B,C,T,T]
stored dtype, "mask": [B,T,T] uint8, "weight": [B,T,T] f32, "key": [...], "augment": ...,
"normalize": ...}`` — or, with ``data.augment_on=worker``, the model-ready float32 batch
(:func:`unetdist.data.augment.to_model_input` already run). Validation batches of instance
masks also carry ``"instances": [B,T,T] int32``, the ids of the same window.

Masks (``data.mask_kind``, resolved at start-up: ``auto`` reads a prepared data set's
dataset.json): class ids are trained as they are; instance ids as background / foreground, or,
with ``target="boundary"`` (``loss.target``), as background / interior / boundary.

Bad samples: ``data.on_error=raise`` stops with the :class:`DataError` naming store, key
and problem; ``skip`` logs it, counts it (``batch["skipped"]``, ``TrainLoader.skipped_samples``)
and fills its slot with the next good sample of the same micro-batch, so batch shapes and
the positions of all other samples stay as they were. A worker's :class:`DataError` reaches the
training process as the one-line error it is (not wrapped in the worker's traceback), for the
training and the validation loader alike.

Where the parts live: the streams a worker runs (:mod:`unetdist.data.streams`), batches and
hand-overs (:mod:`unetdist.data.batching`), start-up checks (:mod:`unetdist.data.preflight`);
this module builds them from the config and controls the worker processes.
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import os
import signal
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from unetdist.config import DataConfig
from unetdist.data.augment import AugmentSpec
from unetdist.data.batching import BatchOptions, unpack
from unetdist.data.preflight import (
    check_cache_limit,
    check_tile_size,
    check_val_samples,
    log_masks,
    log_topology,
    log_weight_maps,
    resolve_mask_kind,
)
from unetdist.data.samples import SampleChecks
from unetdist.data.sequence import Blocks, GlobalSequence, RankLayout
from unetdist.data.sources import Source, open_source
from unetdist.data.streams import TrainStream, ValStream, raise_shipped_error

# ---------------------------------------------------------------- training


class TrainLoader:
    """The DataLoader over a :class:`TrainStream`, with the position it has reached.

    Iterate it once. ``state_dict()["start_sample"]`` is the number of global samples of the
    optimizer steps whose micro-batches were all handed out; pass it back as
    ``start_sample`` (or through :meth:`load_state_dict` before iterating) to resume.
    """

    def __init__(self, stream: TrainStream, loader_kwargs: dict[str, Any]) -> None:
        self.stream, self.loader_kwargs = stream, loader_kwargs
        self.source = stream.source
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
            for batch in unpack(raise_shipped_error(item)):
                if batch["index"] != self.next_micro:
                    raise RuntimeError(
                        f"data loader out of order: micro-batch {batch['index']}, expected {self.next_micro}"
                    )
                self.next_micro += 1
                self.skipped_samples += int(batch.pop("skipped"))
                yield batch

    def state_dict(self) -> dict[str, int]:
        steps = self.next_micro // self.layout.accumulation_steps
        start = steps * self.layout.global_batch_size
        return {
            "start_sample": start,
            "epoch": start // self.sequence.epoch_length,
            "skipped_samples": self.skipped_samples,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        start_micro = self.layout.first_micro_batch(int(state["start_sample"]))
        self.stream.start_micro = self.next_micro = start_micro
        self.skipped_samples = int(state.get("skipped_samples", 0))
        self.loader = _worker_loader(self.stream, self.loader_kwargs)


class ValLoader:
    """The DataLoader over a :class:`ValStream`: one pass over this rank's validation share per iteration."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    @property
    def source(self) -> Source:
        """The source the validation samples come from (what the run logs as its data lineage)."""
        return self.loader.dataset.source

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for item in self.loader:
            yield raise_shipped_error(item)


# ---------------------------------------------------------------- workers


def _init_worker(worker_id: int, environment: dict[str, str] | None = None) -> None:
    # A forkserver's workers inherit the environment the server started in, which may be older
    # than the loader (credentials or an endpoint set since): they take the loader's, as a forked
    # or spawned worker would (it travels through the server's pipe, never a file).
    if environment is not None:
        os.environ.clear()
        os.environ.update(environment)
    # Several workers share each rank's cores with the training process: one thread each.
    torch.set_num_threads(1)
    # Slurm and torchrun signal every process of a job, and a terminal's Ctrl-C every process of
    # its foreground group; a worker that died of SIGTERM or SIGINT would fail the step before the
    # trainer can save. The training process stops its workers itself.
    for stop_signal in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(stop_signal, signal.SIG_IGN)


# Every worker iterator still alive: held by a loader (persistent workers) or only by a
# generator frame or a traceback (an error mid-epoch), which the exit handler cannot reach.
_LIVE_ITERATORS: weakref.WeakSet[Any] = weakref.WeakSet()


class _StoppableDataLoader(DataLoader):
    """A DataLoader whose worker iterators :func:`_stop_workers_at_exit` can find and stop."""

    def _get_iterator(self) -> Any:
        iterator = super()._get_iterator()
        if hasattr(iterator, "_shutdown_workers"):
            _LIVE_ITERATORS.add(iterator)
        return iterator


def _worker_loader(stream: IterableDataset, loader_kwargs: dict[str, Any]) -> DataLoader:
    """A DataLoader over ``stream`` whose workers :func:`_stop_workers_at_exit` stops."""
    return _StoppableDataLoader(stream, batch_size=None, **loader_kwargs)


@atexit.register  # registered after multiprocessing's exit handler, so it runs before it
def _stop_workers_at_exit() -> None:
    """Stop the workers the DataLoader's own way (done event, join) at interpreter exit.

    Our workers ignore SIGTERM and SIGINT (:func:`_init_worker`), and multiprocessing's exit
    handler ends daemonic children with SIGTERM and then joins them: after an uncaught error,
    while a traceback still holds the loader's iterator, a run would wait for its workers
    forever instead of exiting and letting torchrun or Slurm act.
    """
    for iterator in list(_LIVE_ITERATORS):
        iterator._shutdown_workers()
    # a worker the DataLoader could not stop (it ignores the SIGTERM that shutdown and
    # multiprocessing's handler send) would make the exit wait forever: nothing it holds is needed now
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


# ---------------------------------------------------------------- building


def _loader_kwargs(
    data: DataConfig, pin_memory: bool, multiprocessing_context: str | None, source: Source
) -> dict[str, Any]:
    workers = data.num_workers
    context = multiprocessing_context or (
        None if data.worker_start_method == "default" else data.worker_start_method
    )
    if source.remote and workers > 0:
        context = _remote_start_method(context, source)
    init = _init_worker
    start = context if isinstance(context, str | None) else context.get_start_method()
    if workers > 0 and start == "forkserver":
        init = functools.partial(_init_worker, environment=dict(os.environ))
    return dict(
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=data.prefetch_factor if workers > 0 else None,
        pin_memory=pin_memory and torch.cuda.is_available(),  # pinned pages only help CUDA copies
        worker_init_fn=init if workers > 0 else None,
        multiprocessing_context=context if workers > 0 else None,
    )


def _remote_start_method(context: str | None, source: Source) -> Any:
    """How workers over remote data start: never by fork, which hangs once this process has used
    the object-store client (it has: dataset.json, shard indexes); forkserver by default, with the
    data package preloaded in the server, so a worker starts in ~0.1 s instead of importing torch."""
    if context == "fork":
        raise ValueError(
            f"data.worker_start_method=fork with remote data ({source.names[0]}): a forked worker hangs in "
            "the object-store client this process already started; set data.worker_start_method=forkserver "
            "(the default for remote data) or spawn"
        )
    if context not in (None, "forkserver"):
        return context
    forkserver = multiprocessing.get_context("forkserver")
    forkserver.set_forkserver_preload(["unetdist.data.streams"])  # imports torch, never uses obstore
    return forkserver


def _options(data: DataConfig, *, train: bool, spatial_dims: int = 2) -> BatchOptions:
    spec = None
    if train:
        spec = AugmentSpec(
            flips=data.augment,
            intensity=data.augment_intensity,
            noise_std=data.augment_noise_std,
            elastic=data.augment_elastic,
            elastic_sigma_px=data.elastic_sigma_px,
            normalize=data.normalize,
            rotate_3d=data.augment_rotate_3d,
        )
        spec = spec if spec.any else None
    return BatchOptions(
        tile_size=data.tile_size,
        augment_on=data.augment_on,
        normalize=data.normalize,
        on_error=data.on_error,
        foreground_fraction=data.foreground_fraction if train else 0.0,
        spec=spec,
        instances=not train and data.mask_kind == "instances",  # for validation's instance AP; not training
        tile_depth=(data.tile_depth or data.tile_size) if spatial_dims == 3 else 0,
    )


def sample_checks(
    data: DataConfig,
    in_channels: int,
    num_classes: int,
    use_weight_map: bool | str,
    target: str = "semantic",
    boundary_width_px: int = 2,
    spatial_dims: int = 2,
) -> SampleChecks:
    """What the model needs of a sample, and how the data config names and reads its fields."""
    keys = (data.image_key, data.mask_key, data.weight_key)
    return SampleChecks(data.tile_size, in_channels, num_classes, use_weight_map, data.mask_kind, keys,
                        target, boundary_width_px, spatial_dims, data.tile_depth, data.ignore_index)  # fmt: skip


def build_train_loader(
    data: DataConfig,
    *,
    rank: int,
    world_size: int,
    seed: int,
    micro_batch_size: int,
    in_channels: int,
    num_classes: int,
    use_weight_map: bool | str,
    global_batch_size: int = 0,
    start_sample: int = 0,
    multiprocessing_context: str | None = None,
    source: Source | None = None,
    target: str = "semantic",
    boundary_width_px: int = 2,
    spatial_dims: int = 2,
) -> TrainLoader:
    """This rank's endless training micro-batches, continuing the global sequence at ``start_sample``.

    ``global_batch_size`` 0 means ``micro_batch_size * world_size`` (no accumulation).
    ``source`` replaces the configured store with an already open
    :class:`~unetdist.data.sources.base.Source` (e.g. the bench's in-memory tiles).
    ``target``, ``boundary_width_px``: ``loss.target`` and ``loss.boundary_width_px`` (boundary:
    the masks' instance ids become background / interior / boundary). ``spatial_dims``: the model's
    (``model.spatial_dims``; 3: volumes).
    """
    opened = source is None
    if opened:
        check_tile_size(data, spatial_dims)
    data, mask_origin = resolve_mask_kind(data, target)
    checks = sample_checks(data, in_channels, num_classes, use_weight_map, target, boundary_width_px, spatial_dims)
    if opened:
        source = open_source(data, "train", checks)
    layout = RankLayout(
        global_batch_size or micro_batch_size * world_size, world_size, rank, micro_batch_size
    )
    block_size = data.block_size or source.block_size
    sequence = GlobalSequence(
        Blocks.from_counts(source.counts, block_size),
        seed=seed,
        global_batch_size=layout.global_batch_size,
        epoch_end=data.epoch_end,
    )
    if rank == 0:
        log_topology(data, source, sequence, layout, block_size)
        if opened:  # a source given ready (the bench's tiles in memory) has no data set to describe
            log_masks(checks, mask_origin)
            log_weight_maps(source, checks, seed)
    if source.remote:
        check_cache_limit(data)
    # A worker hands over its data.prefetch_factor micro-batches in flight as one item (see pack),
    # so the DataLoader keeps one item per worker in flight.
    group = data.prefetch_factor if data.num_workers > 0 else 1
    stream = TrainStream(
        source,
        sequence,
        layout,
        _options(data, train=True, spatial_dims=spatial_dims),
        num_workers=data.num_workers,
        start_micro=layout.first_micro_batch(start_sample),
        group=group,
        readahead_bytes=data.readahead_mb * 2**20 if source.remote else 0.0,
    )
    loader_kwargs = _loader_kwargs(data, data.pin_memory, multiprocessing_context, source)
    if data.num_workers > 0:
        loader_kwargs["prefetch_factor"] = 1
    return TrainLoader(stream, loader_kwargs)


def build_val_loader(
    data: DataConfig,
    *,
    rank: int,
    world_size: int,
    micro_batch_size: int,
    in_channels: int,
    num_classes: int,
    use_weight_map: bool | str,
    multiprocessing_context: str | None = None,
    target: str = "semantic",
    boundary_width_px: int = 2,
    spatial_dims: int = 2,
) -> ValLoader:
    """A finite loader of this rank's share of the validation samples (the last batch may be short);
    with instance masks each batch carries their ids, ``"instances"`` int32 [B, T, T]."""
    data, _ = resolve_mask_kind(data, target)
    checks = sample_checks(data, in_channels, num_classes, use_weight_map, target, boundary_width_px, spatial_dims)
    source = open_source(data, "val", checks)
    check_val_samples(sum(source.counts), world_size)
    stream = ValStream(
        source,
        _options(data, train=False, spatial_dims=spatial_dims),
        rank=rank,
        world_size=world_size,
        num_workers=data.num_workers,
        micro_batch_size=micro_batch_size,
    )
    return ValLoader(_worker_loader(stream, _loader_kwargs(data, False, multiprocessing_context, source)))
