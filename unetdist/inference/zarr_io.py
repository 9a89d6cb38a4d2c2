"""Zarr-to-Zarr prediction, block by block, split over ranks: never the whole image in memory.

The output is cut into square blocks on the tile step's grid (``aligned_block_size``);
each block is one output chunk, so ranks that take disjoint blocks write disjoint chunk
files. Rank ``r`` of ``R`` takes blocks ``r, r+R, ...``. Two passes over the input:

1. per-channel statistics of each block (the rank's share), summed over ranks into a
   ``[blocks, C, 3]`` table in which every row has exactly one writer, then combined in
   block order; so every rank, and any rank count, gets bit-identical mean/std;
2. predict each of the rank's blocks (reading its tiles' context, mirrored at the image
   border) and write the labels (and, optionally, float16 probabilities) chunk by chunk.

Input arrays are ``[H, W]`` or channels-first ``[C, H, W]``. Inputs and outputs are local
paths or URLs (``s3://bucket/big.zarr``): a URL is opened through zarr's ``ObjectStore``
(:func:`unetdist.data.remote.zarr_store`), made in the process that reads or writes it.

Ranks stay in step when one fails (an unreadable block, an output that rank 0 cannot create):
each phase ends in a collective that every rank reaches, so none waits for one that has left.

``predict_blocks`` writes into any :class:`BlockOutputs`; the NGFF label images of
:mod:`unetdist.inference.ngff_labels` are one, fed planes of N-D arrays (:class:`PlaneView`), and
their pyramids are made here too (:func:`downsample`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, Protocol
from urllib.parse import urlsplit

import numpy as np
import torch
from torch import nn

from unetdist import distributed
from unetdist.data import remote
from unetdist.inference import tiling
from unetdist.inference.engine import ChannelStats, InputError, ModelGeometry, TilePredictor

log = logging.getLogger(__name__)

DEFAULT_BLOCK = 2048
ERROR_LINE_CHARS = 300


class OutputError(InputError):
    """An output that cannot be created (no such bucket, no access): a bad ``--output``, exit 2."""


class FailedElsewhere(Exception):
    """Raised on the ranks that did not fail when another did; that rank names the cause."""


def location_name(location: str | os.PathLike[str]) -> str:
    """The last part of a path or URL (``big.zarr`` for ``s3://bucket/data/big.zarr/``)."""
    text = str(location)
    if remote.is_remote(text):
        return PurePosixPath(urlsplit(text).path.rstrip("/")).name
    return Path(remote.local_path(text)).name


def one_line(err: BaseException) -> str:
    """An error's first line, shortened: obstore's errors append a debug dump and the response body
    (of which the S3 error code is kept: ``... 404 Not Found: NoSuchBucket``)."""
    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    if "<?xml" in first:
        code = re.search(r"<Code>([^<]*)</Code>", text)
        first = first.split("<?xml")[0].rstrip(": ") + (f": {code.group(1)}" if code else "")
    return first if len(first) <= ERROR_LINE_CHARS else first[: ERROR_LINE_CHARS - 3] + "..."


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


class PlaneView:
    """A ``[C, H, W]`` read-only view of one plane of an N-D array whose last axes are y, x: the
    axes in ``fixed`` (index -> position) held, ``channel_axis`` (None: one channel) kept."""

    ndim = 3

    def __init__(self, array: Any, fixed: dict[int, int], channel_axis: int | None) -> None:
        self.array, self.fixed, self.channel_axis = array, fixed, channel_axis
        channels = 1 if channel_axis is None else array.shape[channel_axis]
        self.shape = (channels, *array.shape[-2:])
        self.dtype = array.dtype

    def __getitem__(self, key: tuple[slice, slice, slice]) -> np.ndarray:
        channels, rows, cols = key
        index = [self.fixed.get(axis, slice(None)) for axis in range(self.array.ndim)]
        index[-2:] = [rows, cols]
        if self.channel_axis is None:
            return np.asarray(self.array[tuple(index)])[None][channels]
        index[self.channel_axis] = channels
        return np.asarray(self.array[tuple(index)])


def is_ngff_image(location: str) -> bool:
    """Whether the Zarr group at ``location`` carries NGFF ``multiscales`` metadata (0.5: in
    ``zarr.json``'s ``attributes.ome``; 0.4: in ``.zattrs``): one or two small reads."""
    v3 = _read_json(location, "zarr.json")
    if v3 is not None:
        return v3.get("node_type") == "group" and "multiscales" in v3.get("attributes", {}).get("ome", {})
    return "multiscales" in (_read_json(location, ".zattrs") or {})


def _read_json(location: str, key: str) -> dict | None:
    url = remote.join(location, key)
    try:
        if not remote.is_remote(url) and not Path(url).is_file():
            return None
        document = json.loads(remote.read_bytes(url))
    except remote.RemoteError as err:
        if ": 404" in str(err):
            return None
        raise
    except ValueError:  # not JSON: not metadata we can read
        return None
    return document if isinstance(document, dict) else None


def open_zarr_inputs(location: str | os.PathLike[str]) -> list[tuple[str, Any]]:
    """``(stem, array)`` for a Zarr array, or for every array directly inside a Zarr group, at a
    local path or a URL."""
    import zarr

    location = str(location)
    try:
        node = zarr.open(store=remote.zarr_store(location), mode="r")
    except Exception as err:  # zarr and obstore raise several types for a missing/corrupt store
        raise InputError(f"{remote.display(location)}: cannot open as Zarr: {one_line(err)}") from err
    stem = location_name(location).removesuffix(".zarr")
    if isinstance(node, zarr.Array):
        return [(stem, node)]
    arrays = sorted(node.arrays(), key=lambda item: item[0])
    if not arrays:
        raise InputError(f"{remote.display(location)}: a Zarr group without arrays")
    return [(f"{stem}_{name}", array) for name, array in arrays]


def block_stats(
    source: ChannelFirst, blocks: list[tuple[int, int, int, int]], rank: int, world_size: int
) -> ChannelStats:
    """Whole-image per-channel statistics, the blocks split over ranks (see the module docstring)."""
    channels = source.shape[0]
    table = torch.zeros((len(blocks), channels, 3), dtype=torch.float64)
    failure: BaseException | None = None
    try:
        for index in range(rank, len(blocks), world_size):
            top, bottom, left, right = blocks[index]
            table[index] = torch.from_numpy(ChannelStats.of(source[:, top:bottom, left:right]).to_array())
    except Exception as err:  # a read that failed (after the store's retries): all ranks stop here
        failure = err
    distributed.all_reduce_sum(table)
    raise_if_any_failed(failure, source.name)
    total = ChannelStats.from_array(table[0].numpy())
    for row in table[1:]:
        total = total.combine(ChannelStats.from_array(row.numpy()))
    return total


class BlockOutputs(Protocol):
    """Where :func:`predict_blocks` puts an image's predictions.

    ``create`` runs on rank 0 once the sizes are known (the others wait for it); ``open`` on every
    rank after that, returning ``write(block, probabilities)`` for one ``(top, bottom, left, right)``
    block and its float32 ``[K, h, w]`` probabilities."""

    def create(self, height: int, width: int, num_classes: int, block_size: int) -> None: ...

    def open(self) -> Callable[[tuple[int, int, int, int], np.ndarray], None]: ...


class ZarrOutputs:
    """uint8 (uint16 past 256 classes) HxW class labels and/or float16 ``[K, H, W]`` probabilities,
    each its own Zarr array."""

    def __init__(self, labels_location: str | None, probabilities_location: str | None) -> None:
        self.labels_location, self.probabilities_location = labels_location, probabilities_location

    def create(self, height: int, width: int, num_classes: int, block_size: int) -> None:
        where = (self.labels_location, self.probabilities_location)
        _create_outputs(*where, height, width, num_classes, block_size)

    def open(self) -> Callable[[tuple[int, int, int, int], np.ndarray], None]:
        labels_out, probabilities_out = _open_outputs(self.labels_location, self.probabilities_location)

        def write(block: tuple[int, int, int, int], probabilities: np.ndarray) -> None:
            top, bottom, left, right = block
            if labels_out is not None:
                labels_out[top:bottom, left:right] = probabilities.argmax(axis=0).astype(labels_out.dtype)
            if probabilities_out is not None:
                probabilities_out[:, top:bottom, left:right] = probabilities.astype(np.float16)

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
    block: int = DEFAULT_BLOCK,
    **predict_options: Any,
) -> dict[str, Any]:
    """Predict a ``[H, W]``/``[C, H, W]`` array into Zarr arrays, every rank calling this together.

    ``labels_location``: uint8 HxW class labels; ``probabilities_location``: float16 ``[K, H, W]``
    (either may be None), each a local path or a URL. ``predict_options`` go to ``TilePredictor``
    (tile, overlap, batch_size, precision, device, flips, memory_gb). Returns a summary (blocks,
    tiles, seconds).
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
    block: int = DEFAULT_BLOCK,
    **predict_options: Any,
) -> dict[str, Any]:
    """:func:`predict_zarr` into any :class:`BlockOutputs` (an NGFF label plane, for one)."""
    started = time.perf_counter()
    source = ChannelFirst(array, name, ModelGeometry.of(model).in_channels)
    _, height, width = source.shape
    predictor = TilePredictor(model, height, width, max_block=block, **predict_options)
    block_size = tiling.aligned_block_size(block, predictor.plan.step)
    blocks = tiling.block_grid(height, width, block_size)
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
            outputs.create(height, width, num_classes, block_size)
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
        "block_size": block_size,
        "tile": "x".join(map(str, predictor.tile_shape)),
        "tiles_this_rank": tiles,
        "seconds": time.perf_counter() - started,
    }


def _probe_num_classes(predictor: TilePredictor, source: ChannelFirst, stats: ChannelStats) -> int:
    size_y, size_x = predictor.tile_shape
    probe = predictor.predict_block(
        source, stats, (0, min(size_y, source.shape[1]), 0, min(size_x, source.shape[2]))
    )
    return int(probe.shape[0])


def _create_outputs(
    labels_location: str | None,
    probabilities_location: str | None,
    height: int,
    width: int,
    num_classes: int,
    block_size: int,
) -> None:
    """Create the (empty) output arrays, replacing what was there. Rank 0 only."""
    if labels_location is not None:
        _create_array(
            labels_location,
            shape=(height, width),
            chunks=(block_size, block_size),
            dtype=np.uint8 if num_classes <= 256 else np.uint16,
            fill_value=0,
        )
    if probabilities_location is not None:
        _create_array(
            probabilities_location,
            shape=(num_classes, height, width),
            chunks=(num_classes, block_size, block_size),
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
