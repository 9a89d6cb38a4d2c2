"""Data sources: random access to the samples of a split, one module per storage format.

:func:`open_source` is the one place that picks a source from the data config; every source
satisfies :class:`~unetdist.data.sources.base.Source`, which is all the loader relies on.

* :mod:`~unetdist.data.sources.tar`: webdataset tar shards (``data.format=webdataset``)
* :mod:`~unetdist.data.sources.zarr_tiles`: a pre-tiled Zarr store (``data.format=zarr``)
* :mod:`~unetdist.data.sources.zarr_arrays`: a Zarr store of the user's own arrays (``data.image_array`` ...)
* :mod:`~unetdist.data.sources.zarr_images`: a Zarr store of whole images (``prepare --whole-images``)
* :mod:`~unetdist.data.sources.ome_zarr`: OME-Zarr (NGFF) images with a label image (``data.format=ome-zarr``)

:func:`mask_kind_of` says what ``data.mask_kind=auto`` stands for: what a prepared data set's
``dataset.json`` says, else class ids.
"""

from __future__ import annotations

import dataclasses
import json
import os
from urllib.parse import urlsplit, urlunsplit

from unetdist.config import DataConfig
from unetdist.data import remote
from unetdist.data.fetch import Fetcher
from unetdist.data.layout import (
    DATASET_JSON,
    MASK_KIND_KEY,
    STORE_NAME,
    check_zarr_layout,
    is_whole_image_store,
)
from unetdist.data.node_cache import NodeCache
from unetdist.data.samples import AUTO, MASK_KINDS, DataError, SampleChecks
from unetdist.data.sources.base import Source, StoredSamples
from unetdist.data.sources.image_windows import ImageWindows
from unetdist.data.sources.tar import TarShards, list_shards, shard_counts
from unetdist.data.sources.zarr_arrays import open_zarr_arrays
from unetdist.data.sources.zarr_images import ZarrImages
from unetdist.data.sources.zarr_tiles import ZarrTiles
from unetdist.data.weight_cache import WeightMapCache

__all__ = ["Source", "TarShards", "ZarrImages", "ZarrTiles", "list_shards", "mask_kind_of", "open_source"]


def open_source(data: DataConfig, split: str, checks: SampleChecks) -> Source:
    """The tar, Zarr or OME-Zarr source of ``split`` ("train" or "val") named by the data config;
    ``checks.mask_kind`` "auto" becomes what :func:`mask_kind_of` says."""
    if checks.mask_kind == AUTO:
        checks = dataclasses.replace(checks, mask_kind=mask_kind_of(data)[0])
    source = _open_source(data, split, checks)
    if data.cache_dir and checks.mask_kind == "instances" and isinstance(source, StoredSamples):
        # weight maps computed from instance masks: once per node, not once per epoch (weight_cache.py)
        identity = "\n".join(["weight maps", split, *map(str, zip(source.names, source.counts, strict=True))])
        source.weight_cache = WeightMapCache(_node_cache(data, identity))
    if data.cache_dir and isinstance(source, ImageWindows) and source.remote:
        # windows of whole images at a URL: each chunk fetched once per node (zarr_cache.py)
        identity = "\n".join(["zarr chunks", split, *source.names])
        source.chunk_cache = _node_cache(data, identity)
    return source


def _open_source(data: DataConfig, split: str, checks: SampleChecks) -> Source:
    if data.format == "ome-zarr":
        from unetdist.data.sources.ome_zarr import open_ome_zarr
        from unetdist.data.sources.ome_zarr_volumes import OmeZarrVolumes  # one unit per (image, t) volume

        configure_remote(data)
        return open_ome_zarr(data, split, checks, OmeZarrVolumes if checks.spatial_dims == 3 else None)
    if data.format == "zarr" and (data.image_array or data.mask_array):  # a store of the user's own arrays
        configure_remote(data)
        return open_zarr_arrays(data, split, checks, _fetcher(data, split, [data.zarr_store]))
    if data.format == "zarr":
        store = data.zarr_store or (remote.join(data.root, STORE_NAME) if data.root else "")
        if not store:
            raise ValueError(
                "data.format=zarr needs data.root (a prepare --format zarr folder) or data.zarr_store"
            )
        configure_remote(data)
        read = remote.read_metadata(store)
        check_zarr_layout(store, split, read)  # a store of another layout: what was expected, not zarr's error
        if is_whole_image_store(store, split, read):  # prepare --format zarr --whole-images
            return ZarrImages(
                store,
                split,
                checks,
                data.tiles_per_image,
                foreground_fraction=data.foreground_fraction if split == "train" else 0.0,
            )
        return ZarrTiles(store, split, checks, _fetcher(data, split, [store]))
    configure_remote(data)
    pattern = data.train_shards if split == "train" else data.val_shards
    shards = list_shards(data.root or None, split, pattern or None)
    counts = None if pattern or not data.root else shard_counts(data.root, split, shards)
    return TarShards(shards, checks, counts, _fetcher(data, split, shards))


def mask_kind_of(data: DataConfig) -> tuple[str, str]:
    """(the mask kind ``data.mask_kind`` stands for, where that comes from, for the start-up line).

    Set explicitly: itself. ``auto``: for a data set prepared by ``python -m unetdist.prepare``
    (``data.root``, or a Zarr store with its dataset.json beside it), its dataset.json's
    "mask_kind" ("classes" where it has none: older data sets stored 0/1 or class ids); for
    anything else (the user's shards, own Zarr arrays, OME-Zarr images) "classes", as before
    auto existed. No dataset.json: "classes" (a webdataset root's source names it missing); one
    that cannot be read (after the retries of ``data.remote_attempts``) is a ValueError naming it,
    never a guess: a wrong kind would fail every sample, or train instance ids as classes.
    """
    if data.mask_kind != AUTO:
        return data.mask_kind, f"data.mask_kind={data.mask_kind}"
    folder = _prepared_folder(data)
    if folder is None:
        return "classes", "data.mask_kind=auto: class ids, not a prepared data set"
    where = remote.join(folder, DATASET_JSON)
    configure_remote(data)
    try:
        meta = json.loads(remote.read_bytes(where))
    except (FileNotFoundError, NotADirectoryError):
        return "classes", f"data.mask_kind=auto: class ids, no {remote.display(where)}"
    except DataError as err:  # remote: it names the URL and the cause (403: credentials)
        if ": 404" in str(err):
            return "classes", f"data.mask_kind=auto: class ids, no {remote.display(where)}"
        raise
    except (OSError, ValueError) as err:
        raise ValueError(f"{remote.display(where)}: cannot read it for data.mask_kind=auto: {err}") from None
    kind = meta.get(MASK_KIND_KEY) if isinstance(meta, dict) else None
    if kind is None:
        return "classes", f"data.mask_kind=auto: class ids, {remote.display(where)} names none (older)"
    if kind not in MASK_KINDS:
        raise ValueError(
            f"{remote.display(where)}: {MASK_KIND_KEY}={kind!r}, expected one of {', '.join(MASK_KINDS)}; "
            "set data.mask_kind to what the masks hold"
        )
    return kind, f"data.mask_kind=auto: {kind}, from {remote.display(where)}"


def _prepared_folder(data: DataConfig) -> str | None:
    """The folder of a prepared data set's dataset.json, where the config reads one; else None."""
    if data.format == "webdataset":
        return data.root if data.root and not data.train_shards else None
    if data.format != "zarr" or data.image_array or data.mask_array:
        return None
    if not data.zarr_store:
        return data.root or None
    if remote.is_remote(data.zarr_store):  # the store's parent "folder"
        parts = urlsplit(data.zarr_store)
        return urlunsplit(parts._replace(path=parts.path.rstrip("/").rpartition("/")[0]))
    return os.path.dirname(os.path.abspath(remote.local_path(data.zarr_store)))


def configure_remote(data: DataConfig) -> None:
    """This process's retry and timeout policy for remote data (workers get it with their fetcher)."""
    remote.configure(remote_options(data))


def remote_options(data: DataConfig) -> remote.RemoteOptions:
    return remote.RemoteOptions(attempts=data.remote_attempts, timeout_s=data.remote_timeout_s)


def _fetcher(data: DataConfig, split: str, urls: list[str]) -> Fetcher | None:
    """The fetcher of a remote split (with the node cache when ``data.cache_dir`` is set); None if local."""
    if not any(remote.is_remote(url) for url in urls):
        return None
    cache = None
    if data.cache_dir:
        identity = "\n".join([split, *urls])
        cache = _node_cache(data, identity)
    return Fetcher(data.requests_in_flight, cache, options=remote_options(data),
                   span_bytes=int(data.fetch_span_mb * 2**20),
                   cache_room_bytes=data.cache_limit_gb * 2**30 - node_readahead_bytes(data))


def node_readahead_bytes(data: DataConfig) -> float:
    """What this node's readers hold ahead: its ranks (``LOCAL_WORLD_SIZE``) x workers x ``data.readahead_mb``."""
    return data.readahead_mb * 2**20 * max(1, data.num_workers) * int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def _node_cache(data: DataConfig, identity: str) -> NodeCache:
    """The node cache folder of what ``identity`` names, under ``data.cache_dir`` and its limit."""
    return NodeCache(data.cache_dir, identity, int(data.cache_limit_gb * 2**30))
