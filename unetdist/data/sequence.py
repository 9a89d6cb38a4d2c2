"""The global sample sequence: which stored sample sits at each global position, and who reads it.

Pure integer arithmetic, no I/O, so it is cheap to test and every rank and worker computes
the same answer from the same arguments.

Design (exactness first, then streaming):

* A data set is a list of *units* (tar shards, or one pre-tiled Zarr array) with a known
  sample count each. Each unit is cut into *blocks* of ``block_size`` consecutive samples
  (a Zarr chunk, or a run of neighbouring tar members); a unit's last block
  may be shorter.
* Epoch ``e`` is a seeded permutation of all blocks (seed, e); the epoch's sample sequence
  is the concatenation of the permuted blocks, samples of a block in stored order. Its
  length is the sample count N, padded up (``epoch_end="pad"``: the epoch's first samples
  repeat) or cut down (``"drop"``) to a multiple of the global batch G, so every global
  step lies within one epoch and every rank does the same number of steps.
* Global position ``p`` (counted from the start of training over all epochs) is position
  ``p % L`` of epoch ``p // L`` (L = the padded/cut epoch length). Optimizer step ``s``
  consumes positions ``[s*G, (s+1)*G)``; rank ``r`` takes the contiguous slice
  ``[s*G + r*B, s*G + (r+1)*B)`` (B = G / world size), cut into micro-batches of ``micro``
  in order. A rank's micro-batch ``q`` (counted from the start of training) is read by its
  DataLoader worker ``(q // k) % W``, which hands over k = ``data.prefetch_factor``
  consecutive micro-batches at a time (see :mod:`unetdist.data.loader`).

So the sequence, and (with augmentation seeded by the position) every tile the model
sees, depends only on (seed, data set, G, block_size, epoch_end), never on the world size
or worker count; resuming from ``start_sample = step * G`` is exact, at any world size
that divides G. Readers never read each other's samples: every reader random-accesses
exactly the blocks holding its positions (a block that straddles two micro-batches is
read, in part, by both).

The trade-off: blocks must be random-accessible (local or mounted files, Zarr stores), and
samples within a block stay together, so a micro-batch holds runs of ``block_size``
neighbouring tiles. ``block_size`` 1 (tar default) shuffles sample by sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

EPOCH_END_MODES = ("pad", "drop")

# Distinct first words keep the seed streams apart (numpy pads SeedSequence entropy with zeros).
_BLOCK_ORDER_STREAM = 0x424C4B
SAMPLE_STREAM = 0x534D50


@dataclass(frozen=True)
class Blocks:
    """The blocks of a data set: ``unit[i]`` holds samples ``[start[i], start[i] + length[i])``."""

    unit: np.ndarray
    start: np.ndarray
    length: np.ndarray

    @classmethod
    def from_counts(cls, counts: list[int], block_size: int) -> Blocks:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        units, starts, lengths = [], [], []
        for unit, count in enumerate(counts):
            for start in range(0, count, block_size):
                units.append(unit)
                starts.append(start)
                lengths.append(min(block_size, count - start))
        as_array = lambda values: np.asarray(values, dtype=np.int64)  # noqa: E731
        return cls(as_array(units), as_array(starts), as_array(lengths))

    @cached_property
    def num_samples(self) -> int:
        return int(self.length.sum())


def epoch_length(num_samples: int, global_batch_size: int, epoch_end: str) -> int:
    """Positions per epoch: ``num_samples`` padded up or cut down to a multiple of the global batch."""
    if epoch_end not in EPOCH_END_MODES:
        raise ValueError(f"epoch_end must be one of {EPOCH_END_MODES}, got {epoch_end!r}")
    if num_samples < 1:
        raise ValueError("the training set holds no samples")
    if epoch_end == "pad":
        return -(-num_samples // global_batch_size) * global_batch_size
    length = num_samples // global_batch_size * global_batch_size
    if length == 0:
        raise ValueError(
            f"data.epoch_end=drop with {num_samples} training samples and train.global_batch_size="
            f"{global_batch_size}: no full step per epoch; use epoch_end=pad or a smaller global batch"
        )
    return length


class GlobalSequence:
    """Global position -> (epoch, unit, sample index in unit); caches the current epoch's order."""

    def __init__(self, blocks: Blocks, *, seed: int, global_batch_size: int, epoch_end: str) -> None:
        self.blocks = blocks
        self.seed = seed
        self.global_batch_size = global_batch_size
        self.epoch_length = epoch_length(blocks.num_samples, global_batch_size, epoch_end)
        self._cached_epoch = -1
        self._order = self._ends = np.empty(0, np.int64)

    def block_order(self, epoch: int) -> np.ndarray:
        """Indices into ``blocks`` in the order epoch ``epoch`` visits them."""
        rng = np.random.default_rng([_BLOCK_ORDER_STREAM, self.seed, epoch])
        return rng.permutation(len(self.blocks.unit))

    def _epoch_tables(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if epoch != self._cached_epoch:
            self._order = self.block_order(epoch)
            self._ends = np.cumsum(self.blocks.length[self._order])
            self._cached_epoch = epoch
        return self._order, self._ends

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(epoch, unit, index in unit) of each global position (all within one epoch)."""
        positions = np.asarray(positions, dtype=np.int64)
        epochs = positions // self.epoch_length
        if positions.size and epochs.min() != epochs.max():
            raise ValueError("locate: positions span two epochs")
        epoch = int(epochs[0]) if positions.size else 0
        offsets = positions % self.epoch_length % self.blocks.num_samples  # pad: wrap to the epoch's start
        order, ends = self._epoch_tables(epoch)
        slot = np.searchsorted(ends, offsets, side="right")
        block = order[slot]
        within = offsets - (ends[slot] - self.blocks.length[block])
        return epochs, self.blocks.unit[block], self.blocks.start[block] + within

    def next_use(self, units: np.ndarray, indices: np.ndarray, after: int) -> np.ndarray:
        """The first global position >= ``after`` that reads sample (``units[i]``, ``indices[i]``):
        this epoch's if it is still ahead, else the next epoch's (a node cache evicts by it).
        An epoch's padding (its first samples again) is not counted: a later use, never a wrong one."""
        units, indices = np.asarray(units, np.int64), np.asarray(indices, np.int64)
        first_block = self._unit_first_block
        block_size = int(self.blocks.length.max()) if len(self.blocks.length) else 1
        block = first_block[units] + indices // block_size
        within = indices - self.blocks.start[block]
        epoch = after // self.epoch_length
        found = np.full(units.shape, np.iinfo(np.int64).max, np.int64)
        for candidate in (epoch, epoch + 1):
            order = self.block_order(candidate)
            offset_of_block = np.empty(len(order), np.int64)
            offset_of_block[order] = np.cumsum(self.blocks.length[order]) - self.blocks.length[order]
            offset = offset_of_block[block] + within
            position = candidate * self.epoch_length + offset
            usable = (offset < self.epoch_length) & (position >= after) & (found == np.iinfo(np.int64).max)
            found[usable] = position[usable]
        return found

    @cached_property
    def _unit_first_block(self) -> np.ndarray:
        """Index of each unit's first block (blocks are laid out unit by unit)."""
        units = int(self.blocks.unit.max()) + 1 if len(self.blocks.unit) else 0
        firsts = np.zeros(units, np.int64)
        starts = np.flatnonzero(self.blocks.start == 0)
        firsts[self.blocks.unit[starts]] = starts
        return firsts


@dataclass(frozen=True)
class RankLayout:
    """How a global step's positions are cut over ranks and micro-batches."""

    global_batch_size: int
    world_size: int
    rank: int
    micro_batch_size: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} out of range for world size {self.world_size}")
        per_rank, remainder = divmod(self.global_batch_size, self.world_size)
        if remainder or per_rank % self.micro_batch_size:
            raise ValueError(
                f"global batch {self.global_batch_size} does not split into {self.world_size} rank(s) "
                f"x whole micro-batches of {self.micro_batch_size}"
            )

    @property
    def per_rank_batch_size(self) -> int:
        return self.global_batch_size // self.world_size

    @property
    def accumulation_steps(self) -> int:
        return self.per_rank_batch_size // self.micro_batch_size

    def micro_batch_positions(self, micro_index: int) -> np.ndarray:
        """Global positions of this rank's micro-batch ``micro_index`` (counted from step 0)."""
        step, within_step = divmod(micro_index, self.accumulation_steps)
        first = (
            step * self.global_batch_size
            + self.rank * self.per_rank_batch_size
            + within_step * self.micro_batch_size
        )
        return np.arange(first, first + self.micro_batch_size, dtype=np.int64)

    def first_micro_batch(self, start_sample: int) -> int:
        """This rank's micro-batch index at global sample ``start_sample`` (a step boundary)."""
        if start_sample < 0 or start_sample % self.global_batch_size:
            raise ValueError(
                f"start_sample={start_sample} must be a non-negative multiple of the global batch "
                f"{self.global_batch_size} (= optimizer steps taken x global batch)"
            )
        return start_sample // self.global_batch_size * self.accumulation_steps
