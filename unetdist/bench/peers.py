"""The peers ``bench data`` times unetdist's loader against: other libraries' obvious pipelines, local.

    from unetdist.bench import peers
    batches = peers.wds_npy_batches(shards, batch=32, workers=2)     # webdataset over the npy shards
    if peers.mds_available()[0]:                                     # Mosaic Streaming importable
        peers.write_mds(folder / "mds", images, masks)
        batches = peers.mds_batches(folder / "mds", batch=32, workers=2)

Each returns an endless iterator of batches (``image`` [B,C,T,T] and ``mask`` [B,T,T] tensors: a
tuple from webdataset, a dict from Streaming) from a DataLoader with ``workers`` workers, shuffled,
as a user of that library would write it from its README:

* ``webdataset``: ``WebDataset(shards, shardshuffle=100)`` (what ``shardshuffle=True`` means) ->
  ``.shuffle(WDS_SHUFFLE_BUFFER)`` -> ``.decode()`` -> ``.to_tuple("image.npy", "mask.npy")`` ->
  ``.batched(batch)``, over the same npy shards as unetdist's tar loader reads (not PNG: decoding
  PNG costs ~10x and says nothing about the loader). Each worker streams its own shards (in a
  shuffled order) and shuffles samples within its buffer; ``.repeat()`` starts a new pass (and an
  empty buffer) when one ends.
* Mosaic Streaming (``pip install mosaicml-streaming``; optional, never a dependency of
  unetdist): the same tiles written with ``MDSWriter`` (fixed-shape ``ndarray`` columns, no
  compression, its default shard size) and read with ``StreamingDataset(local=..., shuffle=True)``
  (its default ``py1e`` shuffle) through its ``StreamingDataLoader``, one epoch after another.

They do less than unetdist's loader per sample: no crop window, no augmentation parameters, no
keys, no exact global order (what each library gives up is in issue 16), so a ratio near 1 is
already a good result for unetdist.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

WDS_SHUFFLE_BUFFER = 1000  # samples per worker: the size webdataset's examples use
WDS_SHARD_SHUFFLE = 100  # what WebDataset(shardshuffle=True) means (and warns about)


def _endless(loader: torch.utils.data.DataLoader) -> Iterator:
    """One pass of ``loader`` after another (persistent workers: a pass starts without new processes)."""
    while True:
        yield from loader


def in_flight(workers: int) -> int:
    """Batches a peer's DataLoader has made ahead (its default ``prefetch_factor`` 2 per worker)."""
    return 2 * max(1, workers)


def wds_npy_batches(shards: list[str], *, batch: int, workers: int, seed: int = 0) -> Iterator:
    """The obvious webdataset pipeline over npy shards (module docstring), endless.

    Fewer workers than shards where the data set is tiny: a webdataset worker without a shard
    yields nothing, and ``.repeat()`` would then look for its next sample forever."""
    import webdataset as wds

    workers = min(workers, len(shards))
    pipeline = (
        wds.WebDataset(shards, shardshuffle=WDS_SHARD_SHUFFLE, nodesplitter=None, seed=seed,
                       empty_check=False)
        .shuffle(WDS_SHUFFLE_BUFFER)
        .decode()
        .to_tuple("image.npy", "mask.npy")
        .batched(batch, partial=False)
        .repeat()
    )
    loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=workers,
                                         persistent_workers=workers > 0)
    return iter(loader)


# ---------------------------------------------------------------- Mosaic Streaming (MDS)


def mds_available() -> tuple[str, str]:
    """(mosaicml-streaming's version, '') where ``import streaming`` works, else ('', why not).

    ``import streaming`` also imports its vision data sets, so it needs torchvision (a build that
    matches torch) and transformers, which its wheel requires."""
    try:
        import streaming
    except Exception as err:  # noqa: BLE001 - its own dependency missing (e.g. torchvision) is as missing
        return "", f"{type(err).__name__}: {err}"
    return str(getattr(streaming, "__version__", "unknown")), ""


def write_mds(folder: Path, images: np.ndarray, masks: np.ndarray) -> None:
    """``images`` [N,C,T,T] and ``masks`` [N,T,T] as an MDS data set in ``folder`` (fixed-shape columns)."""
    from streaming import MDSWriter

    shutil.rmtree(folder, ignore_errors=True)  # a --dir of an earlier run: MDSWriter refuses a full folder
    columns = {
        "image": f"ndarray:{images.dtype.name}:{','.join(map(str, images.shape[1:]))}",
        "mask": f"ndarray:{masks.dtype.name}:{','.join(map(str, masks.shape[1:]))}",
    }
    with MDSWriter(out=str(folder), columns=columns, compression=None, progress_bar=False) as writer:
        for image, mask in zip(images, masks, strict=True):
            writer.write({"image": image, "mask": mask})


def mds_batches(folder: Path, *, batch: int, workers: int, seed: int = 0) -> Iterator:
    """Mosaic Streaming over ``folder`` (:func:`write_mds`), shuffled, epoch after epoch, endless.

    Streaming coordinates its workers through named shared memory (``/dev/shm``); what a killed
    earlier run left there is cleaned first, as its docs advise."""
    from streaming import StreamingDataLoader, StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # it imports transformers: quiet when forked
    # its samples are read-only views of the shard bytes; collate stacks them into a new batch, so the
    # warning that torch gives once per worker about non-writable arrays says nothing here
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    dataset = StreamingDataset(local=str(folder), remote=None, shuffle=True, shuffle_seed=seed,
                               batch_size=batch)
    loader = StreamingDataLoader(dataset, batch_size=batch, num_workers=workers,
                                 persistent_workers=workers > 0, drop_last=True)
    return _endless(loader)
