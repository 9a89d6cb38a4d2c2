"""Border weight maps computed from instance masks, kept in the node cache (``data.cache_dir``) so
that each sample's map is computed once per node rather than once per epoch.

Computing one costs ~30 ms for a 256x256 tile of dense cells (``bench data --format ome-zarr``:
``weight_map_ms_per_tile``), about half a loader worker's rate; reading it back is a file read.
A sample's map depends on its stored instance mask alone, so stored samples (tar shards, Zarr
tiles) are cached by (unit, index); windows cut from whole images differ at every epoch and are
not. Entries live in the :class:`~unetdist.data.node_cache.NodeCache` of their split, under the
node's ``data.cache_limit_gb`` with the remote bytes, and are evicted by next use like them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from unetdist.data.node_cache import NodeCache, Schedule, entry_name
from unetdist.data.samples import computed_weight_map


class WeightMapCache:
    """Computed weight maps by (unit, index), shared by a node's ranks and workers; picklable."""

    def __init__(self, cache: NodeCache) -> None:
        self.cache = cache

    def follow(self, schedule: Schedule) -> None:
        self.cache.schedule = schedule

    def weights_of(self, unit: int, index: int) -> Callable[[np.ndarray], np.ndarray]:
        """The weight map maker for sample ``index`` of ``unit``: from the cache, else computed and kept."""
        name = entry_name(unit, index, "w")

        def make(instances: np.ndarray) -> np.ndarray:
            held = self.cache.get(name)
            if held is not None and len(held) == instances.size * 4:  # a float32 map of this mask's size
                return np.frombuffer(held, np.float32).reshape(instances.shape)
            weight = computed_weight_map(instances)
            self.cache.put({name: weight.tobytes()})
            return weight

        return make
