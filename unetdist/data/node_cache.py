"""A bounded cache of remote bytes on a node's local disk, shared by all its ranks and workers.

``data.cache_dir`` holds one folder per data split (:func:`split_folder`), each entry one
sample's (or one chunk's) bytes, named ``u<unit>-i<index>-<part>`` so that any process can
tell which sample it belongs to, or the bytes of ``<n>`` consecutive samples of a unit (a tar
source's span), named ``u<unit>-i<first>-n<n>``. Every process reads entries without a lock (an entry is
whole: written under a temporary name and renamed); inserting takes the folder-wide lock
(``fcntl.flock`` on ``.lock``), makes room first, writes, renames, and records the new total
in ``.usage``. So the cache never holds more than ``data.cache_limit_gb``, temporary files
included, whatever the number of processes.

Eviction is Belady's, not LRU: the training sequence is a pure function of (seed, step), so
the next use of every sample is known exactly (``GlobalSequence.next_use``); the entry needed
furthest in the future goes first, and an entry needed within the protected window (what the
readers are about to read) is never evicted; when nothing else can go, the new entry is not
cached (it is still used from memory). Entries of other folders (validation, other runs)
have no known next use and go first, oldest first; then this folder's entries of no single
sample (chunks of whole images, :mod:`unetdist.data.zarr_cache`), oldest first.

:meth:`NodeCache.fetching` lets one process of the node fetch a span of an object while the
others wanting it wait and then read it here, instead of fetching it again.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import mmap
import os
import re
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

_ENTRY = re.compile(r"^u(\d+)-i(\d+)-(?:n(\d+)$)?")
FETCH_LOCKS = 1024  # lock files of fetches in flight, shared by key hash: a few hundred fetches at once per node
NextUse = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


@dataclass
class Schedule:
    """Where training is, for eviction: set by the training stream, read by the cache."""

    next_use: NextUse  # GlobalSequence.next_use
    now: int = 0  # the global position the readers have reached
    protect: int = 0  # positions after `now` whose entries are never evicted (the readahead window)


def entry_name(unit: int, index: int, part: str) -> str:
    return f"u{unit}-i{index}-{part}"


def split_folder(cache_dir: str, identity: str) -> Path:
    """The folder of one data split: named by a hash of what identifies its bytes (URLs, sizes)."""
    return Path(cache_dir) / hashlib.sha256(identity.encode()).hexdigest()[:16]


class NodeCache:
    """Entries of one split under ``cache_dir`` (see the module docstring); picklable, reopened per process."""

    def __init__(self, cache_dir: str, identity: str, limit_bytes: int) -> None:
        self.root = Path(cache_dir)
        self.folder = split_folder(cache_dir, identity)
        self.limit_bytes = int(limit_bytes)
        self.schedule: Schedule | None = None  # set by the training stream: Belady eviction
        self._warned = False
        self.folder.mkdir(parents=True, exist_ok=True)

    def get(self, name: str) -> bytes | None:
        try:
            with open(self.folder / name, "rb") as file:
                return file.read()
        except FileNotFoundError:
            return None

    def mapped(self, name: str) -> memoryview | None:
        """The entry memory-mapped (read from the page cache without a copy, as local shards are),
        or None. An entry is never rewritten, so a mapping stays right while it is held."""
        try:
            with open(self.folder / name, "rb") as file:
                if os.fstat(file.fileno()).st_size == 0:
                    return memoryview(b"")
                return memoryview(mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ))
        except FileNotFoundError:
            return None

    def has(self, name: str) -> bool:
        return (self.folder / name).exists()

    @contextmanager
    def fetching(self, key: str):
        """Held while this process fetches what ``key`` names (an object's span): the node's other
        processes wanting it wait here, then find it cached. One of ``FETCH_LOCKS`` lock files
        under ``.locks`` (two keys may share one: they then only wait for each other)."""
        slot = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % FETCH_LOCKS
        folder = self.root / ".locks"
        folder.mkdir(exist_ok=True)
        with open(folder / str(slot), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    @contextmanager
    def _locked(self):
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _usage(self) -> int:
        try:
            return int((self.root / ".usage").read_text() or 0)
        except (FileNotFoundError, ValueError):
            return self._scan_total()

    def _set_usage(self, total: int) -> None:
        partial = self.root / f".usage.{os.getpid()}"
        partial.write_text(str(total))
        os.replace(partial, self.root / ".usage")

    def _scan_total(self) -> int:
        return sum(size for _, _, size, _ in self._entries())

    def _entries(self) -> list[tuple[Path, str, int, float]]:
        """(path, name, size, mtime) of every entry of every folder."""
        found = []
        for folder in self.root.iterdir():
            if not folder.is_dir() or folder.name.startswith("."):  # .locks
                continue
            with os.scandir(folder) as items:
                for item in items:
                    try:
                        stat = item.stat()
                    except FileNotFoundError:
                        continue
                    found.append((Path(item.path), item.name, stat.st_size, stat.st_mtime))
        return found

    def put(self, entries: dict[str, bytes]) -> int:
        """Cache ``entries`` (name -> bytes) as far as the limit allows; how many were cached.
        A cache that cannot be written (disk full, gone) is warned about and skipped: the bytes
        are in memory, training goes on."""
        try:
            return self._put(entries)
        except OSError as err:
            if not self._warned:
                log.warning("node cache %s: cannot write (%s); fetched data is not cached", self.folder, err)
                self._warned = True
            return 0

    def _put(self, entries: dict[str, bytes]) -> int:
        entries = {name: data for name, data in entries.items() if len(data) <= self.limit_bytes}
        if not entries:
            return 0
        with self._locked():
            total = self._usage()
            wanted = {name: data for name, data in entries.items() if not (self.folder / name).exists()}
            need = sum(len(data) for data in wanted.values())
            if total + need > self.limit_bytes:
                total = self._evict(need)
            stored = 0
            for name, data in wanted.items():
                if total + len(data) > self.limit_bytes:
                    continue  # all that is left is needed sooner: use it from memory only
                partial = self.folder / f".{name}.{os.getpid()}"
                try:
                    partial.write_bytes(data)
                    os.replace(partial, self.folder / name)
                except OSError:
                    partial.unlink(missing_ok=True)
                    self._set_usage(total)
                    raise
                total += len(data)
                stored += 1
            self._set_usage(total)
        return stored

    def _evict(self, need: int) -> int:
        """Delete entries, furthest next use first, until ``need`` more bytes fit; the new total.
        Counted from the folder itself, not ``.usage``: a process killed mid-insert leaves it stale."""
        entries = self._entries()
        total = sum(size for _, _, size, _ in entries)
        excess = total + need - self.limit_bytes
        ranked = self._ranked(entries)
        for path, size in ranked:
            if excess <= 0:
                break
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            total -= size
            excess -= size
        return total

    def _ranked(self, entries: list[tuple[Path, str, int, float]]) -> list[tuple[Path, int]]:
        """Evictable entries, the first to go first: other folders (oldest first), then ours by
        next use, furthest first, leaving out those the protected window needs."""
        others = sorted((e for e in entries if e[0].parent != self.folder), key=lambda e: e[3])
        ours = [(e, _ENTRY.match(e[1])) for e in entries if e[0].parent == self.folder]
        # entries of no one sample (zarr_cache's chunks of whole images): oldest first; not partial files
        unowned = sorted((e for e, m in ours if not m and not e[1].startswith(".")), key=lambda e: e[3])
        ours = [(e, m) for e, m in ours if m]
        ranked = [(e[0], e[2]) for e in others + unowned]
        if not ours:
            return ranked
        schedule = self.schedule
        if schedule is None:  # validation: oldest first
            return ranked + [(e[0], e[2]) for e, _ in sorted(ours, key=lambda pair: pair[0][3])]
        # a span's next use is its first sample's to come: next uses of all its samples, least per entry
        counts = np.array([int(m.group(3) or 1) for _, m in ours], np.int64)
        owner = np.repeat(np.arange(len(ours)), counts)
        units = np.array([int(m.group(1)) for _, m in ours], np.int64)[owner]
        firsts = np.array([int(m.group(2)) for _, m in ours], np.int64)
        indices = firsts[owner] + np.arange(len(owner)) - np.repeat(np.cumsum(counts) - counts, counts)
        uses = np.minimum.reduceat(schedule.next_use(units, indices, schedule.now), np.cumsum(counts) - counts)
        order = np.argsort(-uses, kind="stable")
        horizon = schedule.now + schedule.protect
        return ranked + [(ours[i][0][0], ours[i][0][2]) for i in order if uses[i] >= horizon]
