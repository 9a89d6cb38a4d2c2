"""Zarr-to-Zarr prediction, block by block, split over ranks: never the whole image in memory.

The output is cut into square blocks (cubes for a 3-D model's volume: ``DEFAULT_BLOCK_3D``) on
the tile step's grid (``aligned_block_shape``);
each block is one output chunk, so ranks that take disjoint blocks write disjoint chunk
files. Rank ``r`` of ``R`` takes blocks ``r, r+R, ...``. Two passes over the input:

1. per-channel statistics of each block (the rank's share), summed over ranks into a
   ``[blocks, C, 3]`` table in which every row has exactly one writer, then combined in
   block order; so every rank, and any rank count, gets bit-identical mean/std;
2. predict each of the rank's blocks (reading its tiles' context, mirrored at the image
   border) and write the labels (and, optionally, float16 probabilities) chunk by chunk.

Input arrays are ``[H, W]`` or channels-first ``[C, H, W]``; a 3-D model's (``spatial_dims`` 3)
``[Z, Y, X]`` or ``[C, Z, Y, X]``, predicted with 3-D tiles into ``[Z, Y, X]`` labels and
``[K, Z, Y, X]`` probabilities, memory bounded by one block and its tiles' context. Inputs and
outputs are local paths or URLs (``s3://bucket/big.zarr``): a URL is opened through zarr's
``ObjectStore`` (:func:`unetdist.data.remote.zarr_store`), made in the process that reads or
writes it.

Ranks stay in step when one fails (an unreadable block, an output that rank 0 cannot create):
each phase ends in a collective that every rank reaches, so none waits for one that has left.

``predict_blocks`` writes into any :class:`BlockOutputs`; the NGFF label images of
:mod:`unetdist.inference.ngff_labels` are one, fed planes of N-D arrays
(:class:`~unetdist.inference.zarr_sources.PlaneView`), and their pyramids are made here too
(:func:`downsample`). Where inputs come from: :mod:`unetdist.inference.zarr_sources`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from unetdist import distributed
from unetdist.data import remote
from unetdist.inference import tiling
from unetdist.inference.engine import ChannelStats, InputError, ModelGeometry, TilePredictor
from unetdist.inference.zarr_sources import ChannelFirst, one_line

log = logging.getLogger(__name__)

DEFAULT_BLOCK = 2048  # the side of a 2-D model's output blocks (and chunks)
# a 3-D model's: 256**3 voxels of float32 probabilities are 64 MiB per class, as 2048**2 are 16
DEFAULT_BLOCK_3D = 256
Block = tuple[int, ...]  # (begin, end) per spatial axis, flat: (top, bottom, left, right)


class OutputError(InputError):
    """An output that cannot be created (no such bucket, no access): a bad ``--output``, exit 2."""


class FailedElsewhere(Exception):
    """Raised on the ranks that did not fail when another did; that rank names the cause."""


def raise_if_any_failed(failure: BaseException | None, name: str) -> None:
    """Every rank calls this at the same point (it is a collective, so also a barrier): the rank
    that failed raises its error, the others :class:`FailedElsewhere`."""
    failed_ranks = int(distributed.all_reduce_sum(torch.tensor([int(failure is not None)]))[0])
    if failure is not None:
        reraise(failure)
    if failed_ranks:
        raise FailedElsewhere(f"{name}: failed on another rank")


def reraise(failure: BaseException) -> None:
    if type(failure).__module__.split(".")[0] == "obstore":  # not an OSError, and a debug dump after line 1
        raise OSError(one_line(failure)) from failure
    raise failure


def block_stats(source: ChannelFirst, blocks: list[Block], rank: int, world_size: int) -> ChannelStats:
    """Whole-image per-channel statistics, the blocks split over ranks (see the module docstring)."""
    channels = source.shape[0]
    table = torch.zeros((len(blocks), channels, 3), dtype=torch.float64)
    failure: BaseException | None = None
    try:
        for index in range(rank, len(blocks), world_size):
            table[index] = torch.from_numpy(ChannelStats.of(source[_index(blocks[index])]).to_array())
    except Exception as err:  # a read that failed (after the store's retries): all ranks stop here
        failure = err
    distributed.all_reduce_sum(table)
    raise_if_any_failed(failure, source.name)
    total = ChannelStats.from_array(table[0].numpy())
    for row in table[1:]:
        total = total.combine(ChannelStats.from_array(row.numpy()))
    return total


def _index(block: Block) -> tuple[slice, ...]:
    """``[:, top:bottom, left:right]`` (and ``z0:z1`` in front) of a ``[C, *spatial]`` array."""
    return (slice(None), *(slice(block[axis], block[axis + 1]) for axis in range(0, len(block), 2)))


class BlockOutputs(Protocol):
    """Where :func:`predict_blocks` puts an image's predictions.

    ``create`` runs on rank 0 once the sizes are known (the others wait for it): the image's
    spatial ``shape`` (``(H, W)`` or ``(Z, Y, X)``), its class count and the block (chunk) shape;
    ``open`` on every rank after that, returning ``write(block, probabilities)`` for one block
    (flat bounds, ``(top, bottom, left, right)``) and its float32 ``[K, *block]`` probabilities."""

    def create(self, shape: tuple[int, ...], num_classes: int, block_shape: tuple[int, ...]) -> None: ...

    def open(self) -> Callable[[Block, np.ndarray], None]: ...


class ZarrOutputs:
    """uint8 (uint16 past 256 classes) class labels (HxW or ZxYxX) and/or float16 ``[K, *spatial]``
    probabilities, each its own Zarr array."""

    def __init__(self, labels_location: str | None, probabilities_location: str | None) -> None:
        self.labels_location, self.probabilities_location = labels_location, probabilities_location

    def create(self, shape: tuple[int, ...], num_classes: int, block_shape: tuple[int, ...]) -> None:
        where = (self.labels_location, self.probabilities_location)
        _create_outputs(*where, shape, num_classes, block_shape)

    def open(self) -> Callable[[Block, np.ndarray], None]:
        labels_out, probabilities_out = _open_outputs(self.labels_location, self.probabilities_location)

        def write(block: Block, probabilities: np.ndarray) -> None:
            index = _index(block)
            if labels_out is not None:
                labels_out[index[1:]] = probabilities.argmax(axis=0).astype(labels_out.dtype)
            if probabilities_out is not None:
                probabilities_out[index] = probabilities.astype(np.float16)

        return write


def predict_zarr(
    model: nn.Module,
    array: Any,
    name: str,
    labels_location: str | os.PathLike[str] | None,
    probabilities_location: str | os.PathLike[str] | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    block: int | None = None,
    **predict_options: Any,
) -> dict[str, Any]:
    """Predict a ``[H, W]``/``[C, H, W]`` array (a 3-D model: ``[Z, Y, X]``/``[C, Z, Y, X]``) into
    Zarr arrays, every rank calling this together.

    ``labels_location``: uint8 class labels; ``probabilities_location``: float16 ``[K, *spatial]``
    (either may be None), each a local path or a URL. ``block``: the output blocks' side (None:
    ``DEFAULT_BLOCK``, a 3-D model ``DEFAULT_BLOCK_3D``). ``predict_options`` go to
    ``TilePredictor`` (tile, tile_depth, overlap, batch_size, precision, device, flips, memory_gb).
    Returns a summary (blocks, tiles, seconds).
    Raises InputError, before any collective, for an array the model cannot take; OutputError
    (on rank 0) for an output that cannot be created; FailedElsewhere on the ranks that did not fail.
    """
    outputs = ZarrOutputs(
        *(None if where is None else str(where) for where in (labels_location, probabilities_location))
    )
    return predict_blocks(
        model, array, name, outputs, rank=rank, world_size=world_size, block=block, **predict_options
    )


def predict_blocks(
    model: nn.Module,
    array: Any,
    name: str,
    outputs: BlockOutputs,
    *,
    rank: int = 0,
    world_size: int = 1,
    block: int | None = None,
    **predict_options: Any,
) -> dict[str, Any]:
    """:func:`predict_zarr` into any :class:`BlockOutputs` (an NGFF label plane, for one)."""
    started = time.perf_counter()
    geometry = ModelGeometry.of(model)
    source = ChannelFirst(array, name, geometry.in_channels, geometry.spatial_dims)
    shape = source.shape[1:]
    if block is None:
        block = DEFAULT_BLOCK_3D if len(shape) == 3 else DEFAULT_BLOCK
    predictor = TilePredictor(model, *shape, max_block=block, **predict_options)
    block_shape = tiling.aligned_block_shape((block,) * len(shape), predictor.plan)
    blocks = tiling.grid_blocks(shape, block_shape)
    if predictor.normalize != "zscore":  # whole-image percentiles would need a pass of their own
        raise InputError(
            f"{source.name}: the model was trained with data.normalize={predictor.normalize}; Zarr inputs are "
            "normalised by a z-score only: predict it from image files, or train with data.normalize=zscore"
        )
    stats = block_stats(source, blocks, rank, world_size)

    failure: BaseException | None = None
    try:
        num_classes = predictor.num_classes or _probe_num_classes(predictor, source, stats)
        if rank == 0:  # one creator; the others open the arrays once it is done (below)
            outputs.create(shape, num_classes, block_shape)
    except Exception as err:
        failure = err
    raise_if_any_failed(failure, name)
    mine = list(range(rank, len(blocks), world_size))
    tiles = 0
    try:
        write = outputs.open()
        for index in mine:
            write(blocks[index], predictor.predict_block(source, stats, blocks[index]))
            tiles += len(predictor.plan.tiles_for_block(*blocks[index]))
            log.debug("%s: block %d/%d done", name, index + 1, len(blocks))
    except Exception as err:  # let the other ranks reach the barrier, then fail
        failure = err
    distributed.barrier()
    if failure is not None:
        reraise(failure)
    return {
        "blocks": len(blocks),
        "blocks_this_rank": len(mine),
        "block_size": block_shape[-1],
        "block_shape": block_shape,
        "block": "x".join(map(str, block_shape)) if len(shape) == 3 else str(block_shape[-1]),
        "tile": "x".join(map(str, predictor.tile_shape)),
        "tiles_this_rank": tiles,
        "seconds": time.perf_counter() - started,
    }


def _probe_num_classes(predictor: TilePredictor, source: ChannelFirst, stats: ChannelStats) -> int:
    probe = tuple(value for size, side in zip(predictor.tile_shape, source.shape[1:], strict=True)
                  for value in (0, min(size, side)))  # fmt: skip
    return int(predictor.predict_block(source, stats, probe).shape[0])


def _create_outputs(
    labels_location: str | None,
    probabilities_location: str | None,
    shape: tuple[int, ...],
    num_classes: int,
    block_shape: tuple[int, ...],
) -> None:
    """Create the (empty) output arrays, replacing what was there. Rank 0 only."""
    if labels_location is not None:
        _create_array(
            labels_location,
            shape=shape,
            chunks=block_shape,
            dtype=np.uint8 if num_classes <= 256 else np.uint16,
            fill_value=0,
        )
    if probabilities_location is not None:
        _create_array(
            probabilities_location,
            shape=(num_classes, *shape),
            chunks=(num_classes, *block_shape),
            dtype=np.float16,
            fill_value=0.0,
        )


def _create_array(location: str, **layout: Any) -> None:
    import zarr

    try:
        zarr.create_array(store=remote.zarr_store(location, writable=True), overwrite=True, **layout)
    except Exception as err:  # zarr's, obstore's and the file system's errors: a bad --output
        raise OutputError(f"{remote.display(location)}: cannot create: {one_line(err)}") from err


def _open_outputs(labels_location: str | None, probabilities_location: str | None) -> tuple[Any, Any]:
    import zarr

    return tuple(
        None if where is None else zarr.open_array(store=remote.zarr_store(where, writable=True), mode="r+")
        for where in (labels_location, probabilities_location)
    )


# ---------------------------------------------------------------- label pyramids


def nearest(size: int, source_size: int, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Source indices of positions ``start..stop-1`` of an axis resampled from ``source_size`` to
    ``size``: the pixel under each target pixel's centre."""
    positions = np.arange(start, size if stop is None else stop)
    return np.minimum((2 * positions + 1) * source_size // (2 * size), source_size - 1)


def downsample(source: Any, target: Any, rank: int = 0, world_size: int = 1) -> None:
    """Fill ``target`` with the nearest samples of ``source`` (same axes), chunk by chunk, rank
    ``rank`` of ``world_size`` taking every ``world_size``-th chunk (so no chunk has two writers)."""
    chunk_h, chunk_w = target.chunks[-2:]
    height, width = target.shape[-2:]
    units = [
        (plane, (top, min(top + chunk_h, height), left, min(left + chunk_w, width)))
        for plane in np.ndindex(*target.shape[:-2])
        for top in range(0, height, chunk_h)
        for left in range(0, width, chunk_w)
    ]
    for plane, (top, bottom, left, right) in units[rank::world_size]:
        source_plane = tuple(
            int(nearest(size, source_size, p, p + 1)[0])
            for p, size, source_size in zip(plane, target.shape[:-2], source.shape[:-2], strict=True)
        )
        rows = nearest(target.shape[-2], source.shape[-2], top, bottom)
        cols = nearest(target.shape[-1], source.shape[-1], left, right)
        box = np.asarray(
            source[(*source_plane, slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))]
        )
        target[(*plane, slice(top, bottom), slice(left, right))] = box[np.ix_(rows - rows[0], cols - cols[0])]
