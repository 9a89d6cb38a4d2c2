"""What the loader asks of a data source: the declared :class:`Source` protocol.

A source is a list of *units* (tar shards, one pre-tiled Zarr array, whole images) with a
known sample count each; the global sequence (:mod:`unetdist.data.sequence`) numbers their
samples and the loader reads them by (unit, index). A new storage format is one new module
beside the others that satisfies this protocol, plus a branch in
:func:`unetdist.data.sources.open_source`.

Sources are pickled into DataLoader workers, so they open files lazily, per process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np

from unetdist.data.node_cache import Schedule
from unetdist.data.samples import DataError, Sample
from unetdist.data.weight_cache import WeightMapCache

WeightsOf = Callable[[np.ndarray], np.ndarray]  # an instance mask -> its border weight map


@runtime_checkable
class Source(Protocol):
    """Random access to the samples of one split."""

    unit_name: str
    """What one unit is, in messages: "shard", "array", "image"."""
    counts: list[int]
    """Samples per unit, in unit order."""
    block_size: int
    """Consecutive samples that are cheapest read together (a Zarr chunk): the sequence's block
    size when ``data.block_size`` is 0."""
    remote: bool
    """Its bytes come over the network: the training stream reads ahead
    (:mod:`unetdist.data.readahead`) and tells it where training is (:meth:`follow`)."""

    @property
    def names(self) -> list[str]:
        """Each unit's file or store path, for messages."""
        ...

    def read(self, unit: int, indices: list[int]) -> list[Sample | DataError]:
        """Samples ``indices`` of ``unit``, in that order (validation: the stored samples)."""
        ...

    def read_windows(
        self, units: np.ndarray, indices: np.ndarray, words: np.ndarray
    ) -> list[Sample | DataError]:
        """Training samples at (``units[i]``, ``indices[i]``), in that order. ``words[i]`` are the
        random words of sample i's global position (:func:`unetdist.data.augment.sample_words`):
        a source whose tile window depends on the position (whole images) draws it from them;
        one that stores its samples whole ignores them (the loader crops them later)."""
        ...

    def follow(self, schedule: Schedule) -> None:
        """Training's position and future (a remote source's node cache evicts by it); local: nothing."""
        ...

    def prefetch(self, units: np.ndarray, indices: np.ndarray) -> int | None:
        """Bring the bytes of these samples to where a read finds them at local speed (the node
        cache), without decoding; the count of bytes that were not there yet (0: all were). None:
        this source cannot, the training stream reads ahead whole samples instead (a read then
        decodes on the readahead's threads)."""
        ...


def read_by_unit(source: Source, units: np.ndarray, indices: np.ndarray) -> list[Sample | DataError]:
    """Samples at (unit, index) pairs, reading each unit's indices together in ascending order."""
    out: list[Sample | DataError | None] = [None] * len(units)
    for unit in np.unique(units):
        where = np.flatnonzero(units == unit)
        wanted = sorted(set(int(i) for i in indices[where]))
        by_index = dict(zip(wanted, source.read(int(unit), wanted), strict=False))
        for slot in where:
            out[slot] = by_index[int(indices[slot])]
    return out  # type: ignore[return-value]


class StoredSamples:
    """Base of sources whose samples are stored whole (tar shards, pre-tiled Zarr): training reads
    them like validation, by (unit, index), and the loader cuts each sample's window. Subclasses
    set ``counts`` and ``names`` and implement ``read``."""

    unit_name = "unit"
    block_size = 1
    remote = False
    counts: list[int]
    weight_cache: WeightMapCache | None = None  # computed weight maps in the node cache (open_source sets it)

    def follow(self, schedule: Schedule) -> None:
        if self.weight_cache is not None:
            self.weight_cache.follow(schedule)

    def weights_of(self, unit: int, index: int) -> WeightsOf | None:
        """How sample (unit, index)'s weight map is made from its instance mask: cached, or None (computed)."""
        return self.weight_cache.weights_of(unit, index) if self.weight_cache is not None else None

    def read(self, unit: int, indices: list[int]) -> list[Sample | DataError]:
        raise NotImplementedError

    def prefetch(self, units: np.ndarray, indices: np.ndarray) -> int | None:
        return None

    def read_windows(
        self, units: np.ndarray, indices: np.ndarray, words: np.ndarray
    ) -> list[Sample | DataError]:
        return read_by_unit(self, units, indices)
