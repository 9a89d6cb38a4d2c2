"""A small least-recently-used cache for per-process read state (shard indexes, mapped files)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any


class LruCache:
    """At most ``size`` values, the least recently used dropped first. Pickles empty: every
    process (a DataLoader worker) fills its own, never inheriting another's maps or handles."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.RLock()  # remote sources read ahead on threads

    def __getstate__(self) -> dict:
        return {"size": self.size}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["size"])

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The value of ``key``, made by ``make()`` when it is not held (once, whatever the threads)."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            value = self._items[key] = make()
            if len(self._items) > self.size:
                self._items.popitem(last=False)
            return value

    def peek(self, key: Hashable) -> Any:
        """The value of ``key`` if held (now the most recent), else None; never makes one."""
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            if len(self._items) > self.size:
                self._items.popitem(last=False)
