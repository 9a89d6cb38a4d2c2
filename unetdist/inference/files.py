"""Image files through ``predict``: each read, predicted, then decoded and written as TIFFs.

    failures = predict_files(model, items, output="preds/", options={...}, decoder=decoder)

For each image ``<stem>``: ``<stem>_mask.tif`` (uint8 class labels), with ``probabilities``
``<stem>_prob.tif`` (float16 [K, H, W]), with a ``decoder`` ``<stem>_instances.tif`` (uint16/uint32
ids); a 3-D model reads TIFF stacks (ZxYxX, ZxCxYxX) and writes [Z, Y, X] labels, [K, Z, Y, X]
probabilities. The class labels, the instance decoding and the writes of an image run on
worker threads while the next image is predicted (the model's forward and scipy's decoding both
release the GIL), so beside a GPU, or with cores to spare, they cost little beyond the forward;
at most one image per thread waits there. A file that cannot be read or predicted is a failure
naming it; the others go on.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from unetdist.data import remote
from unetdist.inference.engine import InputError, TilePredictor, labels_from_probabilities
from unetdist.inference.inputs import InputItem, read_for_model
from unetdist.inference.instance_decoding import InstanceDecoder

log = logging.getLogger("unetdist.predict")
FILE_ERRORS = (InputError, ValueError, OSError)  # a bad file: named, skipped, the run goes on
# Decoding threads beside a GPU: scipy's labelling and distance transforms release the GIL, so
# threads scale (two decode 1.8x as fast as one); a few keep up with a GPU's forward passes.
MAX_WRITER_THREADS = 4


@dataclass(frozen=True)
class Predicted:
    """One image's probabilities and how they were made, on their way to the writer."""

    item: InputItem
    probabilities: np.ndarray
    tiles: int
    tile_shape: tuple[int, ...]
    predict_s: float


def predict_files(
    model: nn.Module,
    items: list[InputItem],
    *,
    output: str,
    options: dict[str, Any],
    probabilities: bool = False,
    decoder: InstanceDecoder | None = None,
    workers: int | None = None,
) -> list[str]:
    """Predict ``items`` (image files) into ``output``; the failures, one line each naming the file.
    ``options`` go to ``TilePredictor``; ``workers``: threads that decode and write (default:
    :func:`writer_threads`), each with at most one image waiting for it."""
    failures: list[str] = []
    waiting: deque[tuple[InputItem, Future]] = deque()
    workers = workers or writer_threads(options.get("device"))

    def collect_oldest() -> None:
        item, future = waiting.popleft()
        try:
            future.result()
        except FILE_ERRORS as err:
            failures.append(_failure(item, err))

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="unetdist-write") as writer:
        for item in items:
            try:
                predicted = predict_file(model, item, options)
            except FILE_ERRORS as err:
                failures.append(_failure(item, err))
                continue
            while len(waiting) >= workers:
                collect_oldest()
            waiting.append((item, writer.submit(write_outputs, predicted, output, probabilities, decoder)))
        while waiting:
            collect_oldest()
    return failures


def writer_threads(device: str | torch.device | None) -> int:
    """One thread beside a CPU forward (which uses the cores itself); beside a GPU, the decoding is
    the CPU's whole work: up to ``MAX_WRITER_THREADS``, a core left for the main thread."""
    if torch.device(device or "cpu").type == "cpu":
        return 1
    return max(1, min(MAX_WRITER_THREADS, (os.cpu_count() or 2) - 1))


def predict_file(model: nn.Module, item: InputItem, options: dict[str, Any]) -> Predicted:
    started = time.perf_counter()
    image = read_for_model(Path(item.path), model)
    predictor = TilePredictor(model, *image.shape[1:], **options)
    whole = tuple(value for side in image.shape[1:] for value in (0, side))
    probabilities = predictor.predict_block(image, predictor.stats_of(image), whole)
    return Predicted(item, probabilities, predictor.plan.num_tiles, predictor.tile_shape,
                     time.perf_counter() - started)  # fmt: skip


def write_outputs(
    predicted: Predicted, output: str, probabilities: bool, decoder: InstanceDecoder | None
) -> None:
    started = time.perf_counter()
    stem = predicted.item.stem
    write_tiff(remote.join(output, f"{stem}_mask.tif"), labels_from_probabilities(predicted.probabilities))
    if probabilities:
        write_tiff(remote.join(output, f"{stem}_prob.tif"), predicted.probabilities.astype(np.float16))
    count = None
    if decoder is not None:
        instances = decoder(predicted.probabilities)
        write_tiff(remote.join(output, f"{stem}_instances.tif"), instances)
        count = int(instances.max())
    log.info(
        "%s: %s, %d tile(s) of %s, predicted in %.2f s, %s in %.2f s%s",
        predicted.item.path,
        "x".join(map(str, predicted.probabilities.shape[1:])),
        predicted.tiles,
        "x".join(map(str, predicted.tile_shape)),
        predicted.predict_s,
        "written" if count is None else "decoded and written",
        time.perf_counter() - started,
        "" if count is None else f", {count} instances",
    )


def _failure(item: InputItem, err: BaseException) -> str:
    message = str(err)  # reading errors name the file already: name it once
    return message if message.startswith(item.shown) else f"{item.shown}: {message}"


def write_tiff(location: str, array: np.ndarray) -> None:
    """Write under a temporary name, then rename: a crash leaves no half-written output. At a URL:
    one PUT of the encoded file, which makes the object appear whole or not at all."""
    import tifffile

    if remote.is_remote(location):
        encoded = io.BytesIO()
        tifffile.imwrite(encoded, array)
        remote.write_bytes(location, encoded.getvalue())
        return
    path = Path(location)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tifffile.imwrite(temporary, array)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
