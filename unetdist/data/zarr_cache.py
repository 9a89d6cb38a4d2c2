"""Zarr stores at URLs read through the node cache (``data.cache_dir``): whole-image and OME-Zarr
sources, whose training windows fall anywhere in an image, fetch each chunk once per node.

A zarr :class:`~zarr.storage.WrapperStore` around the obstore store: a whole-chunk read is looked
up in the split's :class:`~unetdist.data.node_cache.NodeCache` first and cached after a fetch;
metadata (``zarr.json``, ``.zarray``, ...) and ranged reads (shards) go straight through. A chunk
serves windows of many positions, so it has no single next use: its entries (``z-<key hash>``)
are evicted oldest first, before the sample entries of the same folder, within the node's limit.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

from unetdist.data.node_cache import NodeCache

METADATA_NAMES = frozenset({"zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata"})


def chunk_entry(key: str) -> str:
    """The node cache entry of a chunk key (a hash: keys hold slashes and may be long)."""
    return "z-" + hashlib.sha256(key.encode()).hexdigest()[:32]


def node_cached(store: Any, cache: NodeCache | None) -> Any:
    """``store`` with its whole-chunk reads through ``cache``; ``store`` itself without a cache."""
    if cache is None:
        return store
    from zarr.storage import WrapperStore  # zarr is imported where a store is opened, as elsewhere

    class NodeCachedStore(WrapperStore):
        def _with_store(self, inner: Any) -> NodeCachedStore:
            return NodeCachedStore(inner)

        async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
            if byte_range is not None or key.rsplit("/", 1)[-1] in METADATA_NAMES:
                return await self._store.get(key, prototype, byte_range)
            name = chunk_entry(key)
            held = await asyncio.to_thread(cache.get, name)
            if held is not None:
                return prototype.buffer.from_bytes(held)
            got = await self._store.get(key, prototype, byte_range)
            if got is not None:
                await asyncio.to_thread(cache.put, {name: got.to_bytes()})
            return got

    return NodeCachedStore(store)
