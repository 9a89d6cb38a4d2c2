"""Samples -> one micro-batch, and a worker's micro-batches -> one hand-over to the training process.

:func:`collate` copies each sample's window straight into the compact batch (stored dtypes):
``{"image": [B,C,T,T], "mask": [B,T,T] uint8, "weight": [B,T,T] f32, "key": [...],  (volumes: [B,C,D,T,T] ...)
"normalize": ...}``, and, in validation batches of instance masks, ``"instances": [B,T,T]
int32`` (the ids of the same window; training batches leave them out: memory). :func:`pack`
puts a worker's micro-batches into one shared-memory block (why: its docstring) and
:func:`unpack` gives them back as views. :func:`replace_bad` applies ``data.on_error`` to a
micro-batch's reads.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from unetdist.data.augment import AugmentSpec
from unetdist.data.samples import DataError, Sample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchOptions:
    """How a stream turns samples into batches, from the data config (:func:`unetdist.data.loader._options`)."""

    tile_size: int
    augment_on: str
    normalize: str
    on_error: str
    foreground_fraction: float
    spec: AugmentSpec | None  # None: no augmentation (validation, or data.augment off)
    instances: bool = False  # batches carry the samples' instance ids (validation of instance masks)
    tile_depth: int = 0  # volumes: the tiles' z extent; 0: 2-D tiles (tile_size x tile_size)

    @property
    def tile_shape(self) -> tuple[int, ...]:
        return (self.tile_depth, self.tile_size, self.tile_size) if self.tile_depth else (self.tile_size,) * 2


def _batch_array(
    shape: tuple[int, ...], dtype: np.dtype, shared: bool = True
) -> tuple[torch.Tensor, np.ndarray]:
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


def collate(
    samples: list[Sample], windows: list[tuple[int, ...]], options: BatchOptions, shared: bool = True
) -> dict[str, Any]:
    """Crop each sample to its window (the corner per spatial axis), copied straight into the
    compact batch (stored dtypes); ``shared``: see :func:`_batch_array`."""
    shape, count = options.tile_shape, len(samples)
    channels = samples[0].image.shape[0]
    image_dtype = np.result_type(*(s.image for s in samples))
    image, image_out = _batch_array((count, channels, *shape), image_dtype, shared)
    mask, mask_out = _batch_array((count, *shape), np.dtype(np.uint8), shared)
    weight, weight_out = (None, None)
    if any(s.weight is not None for s in samples):
        weight, weight_out = _batch_array((count, *shape), np.dtype(np.float32), shared)
    instances, instances_out = (None, None)
    if options.instances:  # shared: to_model_input passes it through as it is, to the training process
        instances, instances_out = _batch_array((count, *shape), np.dtype(np.int32))
    for slot, (sample, corner) in enumerate(zip(samples, windows, strict=True)):
        window = tuple(slice(start, start + size) for start, size in zip(corner, shape, strict=True))
        image_out[slot] = sample.image[(slice(None), *window)]
        mask_out[slot] = sample.mask[window]
        if weight_out is not None:  # a sample without one beside samples with: uniform weights
            weight_out[slot] = 1.0 if sample.weight is None else sample.weight[window]
        if instances_out is not None:
            instances_out[slot] = 0 if sample.instances is None else sample.instances[window]
    batch: dict[str, Any] = {
        "image": image,
        "mask": mask,
        "key": [s.key for s in samples],
        "normalize": options.normalize,
    }
    if weight is not None:
        batch["weight"] = weight
    if instances is not None:
        batch["instances"] = instances
    return batch


_PACK_ALIGN_BYTES = 64


def pack(batches: list[dict[str, Any]]) -> dict[str, Any]:
    """A worker's micro-batches as one hand-over: all their tensors in one shared-memory block.

    Why: the training process fetches a file descriptor from the worker for every shared
    block it unpickles, over a socket with an authentication handshake (several round trips,
    each a wake-up of another process), and each DataLoader item costs it a few more
    wake-ups (the index queue's feeder thread, the result pipe). That is fixed per item and
    paid on the training thread: ~4 ms per item with three blocks (image, mask, weight) on
    the quickstart's 2 cores shared by 2 ranks and 2 workers, ~5% of its step. One block
    per item, and ``data.prefetch_factor`` micro-batches per item, divide it accordingly.
    :func:`unpack` gives the micro-batches back, their tensors as views of the block.
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


def unpack(item: dict[str, Any]) -> list[dict[str, Any]]:
    """The micro-batches of a DataLoader item: a :func:`pack` item, or one plain batch."""
    if "packed" not in item:
        return [item]
    for batch, layout in zip(item["batches"], item["layouts"], strict=True):
        for name, dtype, shape, offset in layout:
            batch[name] = _view(item["packed"], dtype, shape, offset)
    return item["batches"]


def _view(block: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], offset: int) -> torch.Tensor:
    return block[offset : offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)


def replace_bad(read: list[Sample | DataError], on_error: str, where: str) -> tuple[list[Sample], int]:
    """``data.on_error`` on a micro-batch's reads: ``raise`` the first :class:`DataError`, or ``skip``:
    log each, fill its slot with the next good sample, and count them."""
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
