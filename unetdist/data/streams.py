"""The two IterableDatasets a DataLoader runs: endless training micro-batches, and one pass of validation.

:class:`TrainStream`: a rank's micro-batch ``q`` is a pure function of (seed, q, the data):
which samples (:mod:`unetdist.data.sequence`), their windows and augmentation parameters
(:mod:`unetdist.data.augment`, from each sample's position). Worker ``w`` of ``W`` makes the
rank's items ``i`` with ``i % W == w``, each of ``group`` consecutive micro-batches packed
into one hand-over (:func:`unetdist.data.batching.pack`). :class:`ValStream`: every validation
sample exactly once across ranks and workers, centre-cropped, in stored order.

A :class:`DataError` in a DataLoader worker travels as an item (:func:`errors_as_items`) and
is raised again, as itself, by :func:`raise_shipped_error` in the training process.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from unetdist.data.augment import crop_windows, draw_params, sample_words, to_model_input
from unetdist.data.batching import BatchOptions, collate, pack, replace_bad
from unetdist.data.node_cache import Schedule
from unetdist.data.readahead import MAX_DEPTH, Readahead
from unetdist.data.samples import DataError
from unetdist.data.sequence import GlobalSequence, RankLayout
from unetdist.data.sources.base import Source, read_by_unit

log = logging.getLogger(__name__)

DATA_ERROR = "data_error"  # the key of an item that carries a worker's DataError message


def errors_as_items(items: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """``items`` unchanged in the training process; in a DataLoader worker, the items and a
    :class:`DataError` as a last item ``{DATA_ERROR: message}``.

    Why: the DataLoader re-raises a worker's exception with the worker's traceback folded
    into its message ("Caught DataError in DataLoader worker process 0. Original Traceback
    ..."), which buries the one line naming the shard, the key and the problem. As an item it
    reaches the training process in its place in the order, where :func:`raise_shipped_error`
    raises it as it was.
    """
    if get_worker_info() is None:
        return items
    return _shipping_errors(items)


def _shipping_errors(items: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    try:
        yield from items
    except DataError as err:
        yield {DATA_ERROR: str(err)}


def raise_shipped_error(item: dict[str, Any]) -> dict[str, Any]:
    """``item`` itself, unless it carries a worker's :class:`DataError` (:func:`errors_as_items`): raised here."""
    if DATA_ERROR in item:
        raise DataError(item[DATA_ERROR])
    return item


def _reader_slot(num_workers: int) -> tuple[int, int]:
    """(this DataLoader worker, the worker count); (0, 1) in the training process."""
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    if workers != max(1, num_workers):
        raise RuntimeError(
            f"dataset built for {max(1, num_workers)} data worker(s) runs in a loader with {workers}"
        )
    return worker, workers


class TrainStream(IterableDataset):
    """Endless micro-batches of one rank, from ``start_micro`` on (see the module docstring)."""

    def __init__(
        self,
        source: Source,
        sequence: GlobalSequence,
        layout: RankLayout,
        options: BatchOptions,
        *,
        num_workers: int,
        start_micro: int = 0,
        group: int = 1,
        readahead_bytes: float = 0.0,
    ) -> None:
        super().__init__()
        self.source, self.sequence, self.layout, self.options = source, sequence, layout, options
        self.num_workers, self.start_micro, self.group = num_workers, start_micro, group
        self.readahead_bytes = readahead_bytes  # remote sources: data.readahead_mb
        self._readahead: Readahead | None = None
        self._schedule: Schedule | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return errors_as_items(self._items())

    def _items(self) -> Iterator[dict[str, Any]]:
        worker, workers = _reader_slot(self.num_workers)
        in_worker = get_worker_info() is not None
        group = self.group if in_worker else 1  # in the training process there is nothing to hand over
        if self.source.remote:
            self._follow_training(worker, workers, group)
        item = worker  # items of `group` consecutive micro-batches; worker w makes items i with i % W == w
        while True:
            first = self.start_micro + item * group
            batches = [self.micro_batch(first + offset) for offset in range(group)]
            yield pack(batches) if in_worker else batches[0]
            item += workers

    def _follow_training(self, worker: int, workers: int, group: int) -> None:
        """Remote source: read this worker's coming micro-batches ahead, and give the node cache
        training's future, so that it evicts what is needed furthest ahead."""

        def mine() -> Iterator[int]:
            item = worker
            while True:
                yield from range(self.start_micro + item * group, self.start_micro + (item + 1) * group)
                item += workers

        if self.readahead_bytes > 0:
            self._readahead = Readahead(self._read_ahead, mine(), self.readahead_bytes)
        # the node's readers are at most this far ahead (each worker: its hand-over and its readahead)
        steps_ahead = -(-workers * (group + MAX_DEPTH) // self.layout.accumulation_steps) + 2
        self._schedule = Schedule(self.sequence.next_use, protect=steps_ahead * self.layout.global_batch_size)
        self.source.follow(self._schedule)

    def _read(self, micro_index: int) -> list:
        """The samples (or errors) of micro-batch ``micro_index``, as read from the source."""
        positions = self.layout.micro_batch_positions(micro_index)
        _, units, indices = self.sequence.locate(positions)
        words = sample_words(self.sequence.seed, positions)
        return self.source.read_windows(units, indices, words)  # whole images: the window is read

    def _read_ahead(self, micro_index: int) -> list | int:
        """Ahead of training: the bytes of micro-batch ``micro_index`` brought to the node cache
        (the count of those not there before) where the source can (reads from it then cost what
        local reads do, and decoding on the readahead's threads would contend for this process's
        GIL); else its samples."""
        positions = self.layout.micro_batch_positions(micro_index)
        _, units, indices = self.sequence.locate(positions)
        brought = self.source.prefetch(units, indices)
        return self._read(micro_index) if brought is None else brought

    def micro_batch(self, micro_index: int) -> dict[str, Any]:
        """This rank's micro-batch ``micro_index``: a pure function of the arguments and the data."""
        positions = self.layout.micro_batch_positions(micro_index)
        epoch = int(positions[0]) // self.sequence.epoch_length  # a micro-batch lies within one epoch
        words = sample_words(self.sequence.seed, positions)  # this batch's random numbers, per position
        if self._schedule is not None:  # one step back: a slower rank may still read the step before
            step_start = int(positions[0]) // self.layout.global_batch_size * self.layout.global_batch_size
            self._schedule.now = max(0, step_start - self.layout.global_batch_size)
        read = self._readahead.take(micro_index) if self._readahead is not None else self._read(micro_index)
        if read is None or isinstance(read, int):  # prefetched into the node cache, or no longer read ahead
            read = self._read(micro_index)
        samples, skipped = replace_bad(read, self.options.on_error, f"micro-batch {micro_index}")
        spec, options = self.options.spec, self.options
        tile = options.tile_shape if options.tile_depth else options.tile_size  # 2-D: the square's side, as ever
        windows = crop_windows([s.mask for s in samples], tile, words, options.foreground_fraction)
        batch = collate(samples, windows, self.options, shared=False)  # a worker packs it (see pack)
        if spec is not None:
            params, noise_seeds = draw_params(words, spec)
            # numpy, not tensors: small arrays travel pickled inline, while every tensor costs
            # the training process a file-descriptor handoff from the worker.
            batch["augment"] = (spec, params, noise_seeds)
        batch.update(index=micro_index, epoch=epoch, skipped=skipped)
        return to_model_input(batch, "cpu") if self.options.augment_on == "worker" else batch


class ValStream(IterableDataset):
    """Every validation sample exactly once across all ranks and workers, centre-cropped, in order.

    Stored order, split by sample index: reader slot ``worker * R + rank`` takes the
    samples with ``index % (R*W) == slot``, so rank r's share is ``index % R == r``
    whatever the worker count, and ranks differ by at most one sample.
    """

    def __init__(
        self,
        source: Source,
        options: BatchOptions,
        *,
        rank: int,
        world_size: int,
        num_workers: int,
        micro_batch_size: int,
    ) -> None:
        super().__init__()
        self.source, self.options = source, options
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.micro_batch_size = micro_batch_size
        self.skipped = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return errors_as_items(self._items())

    def _items(self) -> Iterator[dict[str, Any]]:
        worker, workers = _reader_slot(self.num_workers)
        ends = np.cumsum(self.source.counts)
        mine = np.arange(
            worker * self.world_size + self.rank, int(ends[-1]) if len(ends) else 0, self.world_size * workers
        )
        shape = self.options.tile_shape
        for begin in range(0, len(mine), self.micro_batch_size):
            chosen = mine[begin : begin + self.micro_batch_size]
            units = np.searchsorted(ends, chosen, side="right")
            indices = chosen - (ends[units] - np.asarray(self.source.counts)[units])
            samples = []
            for item in read_by_unit(self.source, units, indices):
                if isinstance(item, DataError):
                    if self.options.on_error == "raise":
                        raise item
                    log.warning("data.on_error=skip: %s", item)
                    continue
                samples.append(item)
            if not samples:
                continue
            windows = [tuple((n - size) // 2 for n, size in zip(s.mask.shape, shape, strict=True)) for s in samples]
            batch = collate(samples, windows, self.options, shared=self.options.augment_on != "worker")
            yield to_model_input(batch, "cpu") if self.options.augment_on == "worker" else batch
