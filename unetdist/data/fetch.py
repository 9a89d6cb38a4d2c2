"""Pieces of remote objects (a sample's bytes in a shard, a Zarr chunk) for a source that reads them.

:class:`Fetcher` takes the pieces a read needs, serves what the node cache
(:mod:`unetdist.data.node_cache`) holds, and fetches the rest: pieces that touch in the same
object are merged into one ranged GET (a block of consecutive samples is one request), and
the requests run on a pool of ``data.requests_in_flight`` threads per process (obstore
releases the GIL while it waits), so a micro-batch's GETs overlap instead of queueing.
Fetched pieces go into the node cache for the next reader on this node, written on the pool's
threads (a 200 KB write costs ~1.5 ms on a disk here: not on the reader's thread).

A piece with a ``group`` (a tar source's span: the samples in 8 MB of a shard, when the node
cache can hold the split) is fetched by one process of the node
(:meth:`~unetdist.data.node_cache.NodeCache.fetching`); the others wanting it wait, then read
it from the cache, so it crosses the network once per node.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from unetdist.data.node_cache import NodeCache
from unetdist.data.remote import RemoteError, RemoteOptions, configure, read_bytes, read_ranges


@dataclass(frozen=True)
class Piece:
    name: str  # the node cache's entry name (node_cache.entry_name)
    url: str
    start: int
    end: int  # -1: the whole object (a compressed Zarr chunk, size unknown)
    group: str = ""  # fetched by one process of the node at a time; pieces of two groups are never merged


@dataclass
class FetchCounters:
    """What this process fetched: requests, bytes over the network, pieces served from the cache."""

    requests: int = 0
    bytes_fetched: int = 0
    cache_hits: int = 0


class Fetcher:
    """Bytes of pieces: from the node cache, else merged ranged GETs on a thread pool.

    Picklable: the pool is made per process, on first use."""

    def __init__(
        self,
        requests_in_flight: int,
        cache: NodeCache | None,
        sizes: dict[str, int] | None = None,
        options: RemoteOptions | None = None,
        span_bytes: int = 0,
        cache_room_bytes: float = 0.0,
    ) -> None:
        self.requests_in_flight = max(1, requests_in_flight)
        self.cache = cache
        self.span_bytes = span_bytes  # data.fetch_span_mb: the bytes a missing piece may bring (a source's choice)
        self.cache_room_bytes = cache_room_bytes  # the cache's limit less the node's readahead window
        self.options = options or RemoteOptions()
        self.sizes = sizes if sizes is not None else {}  # object URL -> indexed size, checked per response
        self.counters = FetchCounters()
        self._pool: ThreadPoolExecutor | None = None
        self._pid = -1
        self._lock = threading.Lock()
        self._in_flight: dict[str, Future] = {}  # piece name -> the request bringing it

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pool": None, "_pid": -1, "counters": FetchCounters(), "_lock": None,
                "_in_flight": {}}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def _executor(self) -> ThreadPoolExecutor:
        if self._pid != os.getpid():
            configure(self.options)  # a spawned worker starts with the defaults
            self._pool = ThreadPoolExecutor(self.requests_in_flight, thread_name_prefix="unetdist-fetch")
            self._pid = os.getpid()
        return self._pool  # type: ignore[return-value]

    def get(self, pieces: list[Piece]) -> list[bytes | RemoteError]:
        """Each piece's bytes, or the :class:`RemoteError` of the request that should have brought it.

        A piece already on its way for another reader of this process (readahead threads whose
        windows overlap, e.g. across an epoch's end) is waited for, not fetched again; a piece of
        a group another process of the node is fetching is waited for and read from the cache."""
        out: dict[str, bytes | RemoteError] = {}
        waiting: dict[str, Future] = {}
        by_name = {piece.name: piece for piece in pieces}
        missing: dict[str, Piece] = {}
        with self._lock:
            for piece in pieces:
                if piece.name in out or piece.name in waiting or piece.name in missing:
                    continue
                if piece.name in self._in_flight:
                    waiting[piece.name] = self._in_flight[piece.name]
                    continue
                cached = self._cached(piece)
                if cached is not None:
                    out[piece.name] = cached
                    self.counters.cache_hits += 1
                else:
                    missing[piece.name] = piece
            for run in merge_runs(list(missing.values())):
                future = self._executor().submit(self._fetch_run, run)
                for piece in run:
                    self._in_flight[piece.name] = waiting[piece.name] = future
        for name, future in waiting.items():
            try:
                got = future.result().get(name)
                if got is None:  # another process of the node fetched its group: it is cached
                    got = self._cached(by_name[name])
                if got is None:  # evicted meanwhile: on its own
                    got = self._fetch_run_now([dataclasses.replace(by_name[name], group="")])[name]
            except RemoteError as err:
                got = err
            out[name] = got
        return [out[piece.name] for piece in pieces]

    def _cached(self, piece: Piece) -> bytes | None:
        cached = self.cache.get(piece.name) if self.cache is not None else None
        if cached is not None and (piece.end < 0 or len(cached) == piece.end - piece.start):
            return cached
        return None

    def _fetch_run(self, run: list[Piece]) -> dict[str, bytes]:
        """The pieces of one run, by one request; into the node cache here, off the reader's thread.
        A group's run is fetched by one process of the node: after waiting for another's fetch,
        a run found cached whole is not fetched again (its readers read the cache: ``{}``)."""
        if not run[0].group or self.cache is None:
            return self._fetch_run_now(run)
        with self.cache.fetching(run[0].group):
            if all(self.cache.has(piece.name) for piece in run):
                with self._lock:
                    for piece in run:
                        self._in_flight.pop(piece.name, None)
                return {}
            return self._fetch_run_now(run)

    def _fetch_run_now(self, run: list[Piece]) -> dict[str, bytes]:
        try:
            if run[0].end < 0:
                data = read_bytes(run[0].url)
                pieces = {run[0].name: data}
            else:
                base = run[0].start
                (data,) = read_ranges(run[0].url, [(base, run[-1].end)], self.sizes.get(run[0].url, -1))
                pieces = {piece.name: data[piece.start - base : piece.end - base] for piece in run}
            with self._lock:
                self.counters.requests += 1
                self.counters.bytes_fetched += len(data)
            if self.cache is not None:
                self.cache.put(pieces)
            return pieces
        finally:
            with self._lock:
                for piece in run:
                    self._in_flight.pop(piece.name, None)


# Neighbouring tar samples are a header (512 bytes) and padding apart: one GET for both
# costs those bytes, two GETs cost a request's latency.
MERGE_GAP_BYTES = 16 * 1024


def merge_runs(pieces: list[Piece], gap: int = MERGE_GAP_BYTES) -> list[list[Piece]]:
    """Pieces grouped into runs that are one byte range of one object each (gaps up to ``gap``)."""
    runs: list[list[Piece]] = []
    for piece in sorted({p.name: p for p in pieces}.values(), key=lambda p: (p.url, p.start)):
        last = runs[-1][-1] if runs else None
        if (
            last is not None
            and last.url == piece.url
            and last.group == piece.group
            and last.end >= 0
            and piece.end >= 0
            and 0 <= piece.start - last.end <= gap
        ):
            runs[-1].append(piece)
        else:
            runs.append([piece])
    return runs
