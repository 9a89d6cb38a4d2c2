"""Zarr-to-Zarr prediction, block by block, split over ranks: never the whole image in memory.

The output is cut into square blocks on the tile step's grid (``aligned_block_size``);
each block is one output chunk, so ranks that take disjoint blocks write disjoint chunk
files. Rank ``r`` of ``R`` takes blocks ``r, r+R, ...``. Two passes over the input:

1. per-channel statistics of each block (the rank's share), summed over ranks into a
   ``[blocks, C, 3]`` table in which every row has exactly one writer, then combined in
   block order; so every rank, and any rank count, gets bit-identical mean/std;
2. predict each of the rank's blocks (reading its tiles' context, mirrored at the image
   border) and write the labels (and, optionally, float16 probabilities) chunk by chunk.

Input arrays are ``[H, W]`` or channels-first ``[C, H, W]``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from unetdist import distributed
from unetdist.inference import tiling
from unetdist.inference.engine import ChannelStats, InputError, ModelGeometry, TilePredictor

log = logging.getLogger(__name__)

DEFAULT_BLOCK = 2048


class ChannelFirst:
    """A ``[C, H, W]`` read-only view of a 2-D or channels-first 3-D array (Zarr or numpy)."""

    def __init__(self, array: Any, name: str, in_channels: int | None) -> None:
        if array.ndim == 2:
            self.shape = (1, *array.shape)
        elif array.ndim == 3:
            self.shape = tuple(array.shape)
        else:
            raise InputError(
                f"{name}: expected a 2-D HxW or channels-first CxHxW array, got shape {array.shape}"
            )
        dtype = np.dtype(array.dtype)
        if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating) or dtype.kind == "b"):
            raise InputError(f"{name}: dtype {dtype} is not a real number type")
        if in_channels is not None and self.shape[0] != in_channels:
            raise InputError(
                f"{name}: has {self.shape[0]} channel(s) (shape {tuple(array.shape)}, channels first), "
                f"the model expects {in_channels}"
            )
        self.array, self.name, self.ndim, self.dtype = array, name, 3, dtype

    def __getitem__(self, key: tuple[slice, slice, slice]) -> np.ndarray:
        channels, rows, cols = key
        if self.array.ndim == 2:
            return np.asarray(self.array[rows, cols])[None][channels]
        return np.asarray(self.array[channels, rows, cols])


def open_zarr_inputs(path: Path) -> list[tuple[str, Any]]:
    """``(stem, array)`` for a Zarr array, or for every array directly inside a Zarr group."""
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as err:  # zarr raises several types for a missing/corrupt store
        raise InputError(f"{path}: cannot open as Zarr: {err}") from err
    stem = path.name.removesuffix(".zarr") if path.name.endswith(".zarr") else path.name
    if isinstance(node, zarr.Array):
        return [(stem, node)]
    arrays = sorted(node.arrays(), key=lambda item: item[0])
    if not arrays:
        raise InputError(f"{path}: a Zarr group without arrays")
    return [(f"{stem}_{name}", array) for name, array in arrays]


def block_stats(
    source: ChannelFirst, blocks: list[tuple[int, int, int, int]], rank: int, world_size: int
) -> ChannelStats:
    """Whole-image per-channel statistics, the blocks split over ranks (see the module docstring)."""
    channels = source.shape[0]
    table = torch.zeros((len(blocks), channels, 3), dtype=torch.float64)
    for index in range(rank, len(blocks), world_size):
        top, bottom, left, right = blocks[index]
        table[index] = torch.from_numpy(ChannelStats.of(source[:, top:bottom, left:right]).to_array())
    distributed.all_reduce_sum(table)
    total = ChannelStats.from_array(table[0].numpy())
    for row in table[1:]:
        total = total.combine(ChannelStats.from_array(row.numpy()))
    return total


def predict_zarr(
    model: nn.Module,
    array: Any,
    name: str,
    labels_path: Path | None,
    probabilities_path: Path | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    block: int = DEFAULT_BLOCK,
    **predict_options: Any,
) -> dict[str, Any]:
    """Predict a ``[H, W]``/``[C, H, W]`` array into Zarr arrays, every rank calling this together.

    ``labels_path``: uint8 HxW class labels; ``probabilities_path``: float16 ``[K, H, W]``
    (either may be None). ``predict_options`` go to ``TilePredictor`` (tile, overlap,
    batch_size, precision, device, flips). Returns a summary (blocks, tiles, seconds).
    Raises InputError, before any collective, for an array the model cannot take.
    """
    started = time.perf_counter()
    source = ChannelFirst(array, name, ModelGeometry.of(model).in_channels)
    _, height, width = source.shape
    predictor = TilePredictor(model, height, width, **predict_options)
    block_size = tiling.aligned_block_size(block, predictor.plan.step)
    blocks = tiling.block_grid(height, width, block_size)
    stats = block_stats(source, blocks, rank, world_size)
    num_classes = predictor.num_classes or _probe_num_classes(predictor, source, stats)

    if rank == 0:
        _create_outputs(labels_path, probabilities_path, height, width, num_classes, block_size)
    distributed.barrier()
    labels_out, probabilities_out = _open_outputs(labels_path, probabilities_path)
    mine = list(range(rank, len(blocks), world_size))
    failure: BaseException | None = None
    tiles = 0
    try:
        for index in mine:
            top, bottom, left, right = blocks[index]
            probabilities = predictor.predict_block(source, stats, blocks[index])
            tiles += len(predictor.plan.tiles_for_block(*blocks[index]))
            if labels_out is not None:
                labels_out[top:bottom, left:right] = probabilities.argmax(axis=0).astype(labels_out.dtype)
            if probabilities_out is not None:
                probabilities_out[:, top:bottom, left:right] = probabilities.astype(np.float16)
            log.debug("%s: block %d/%d done", name, index + 1, len(blocks))
    except Exception as err:  # let the other ranks reach the barrier, then fail
        failure = err
    distributed.barrier()
    if failure is not None:
        raise failure
    return {
        "blocks": len(blocks),
        "blocks_this_rank": len(mine),
        "block_size": block_size,
        "tile": predictor.tile,
        "tiles_this_rank": tiles,
        "seconds": time.perf_counter() - started,
    }


def _probe_num_classes(predictor: TilePredictor, source: ChannelFirst, stats: ChannelStats) -> int:
    size = predictor.plan.input_tile
    probe = predictor.predict_block(
        source, stats, (0, min(size, source.shape[1]), 0, min(size, source.shape[2]))
    )
    return int(probe.shape[0])


def _create_outputs(
    labels_path: Path | None,
    probabilities_path: Path | None,
    height: int,
    width: int,
    num_classes: int,
    block_size: int,
) -> None:
    import zarr

    if labels_path is not None:
        zarr.create_array(
            store=str(labels_path),
            shape=(height, width),
            chunks=(block_size, block_size),
            dtype=np.uint8 if num_classes <= 256 else np.uint16,
            fill_value=0,
            overwrite=True,
        )
    if probabilities_path is not None:
        zarr.create_array(
            store=str(probabilities_path),
            shape=(num_classes, height, width),
            chunks=(num_classes, block_size, block_size),
            dtype=np.float16,
            fill_value=0.0,
            overwrite=True,
        )


def _open_outputs(labels_path: Path | None, probabilities_path: Path | None) -> tuple[Any, Any]:
    import zarr

    return tuple(
        None if path is None else zarr.open_array(str(path), mode="r+")
        for path in (labels_path, probabilities_path)
    )
