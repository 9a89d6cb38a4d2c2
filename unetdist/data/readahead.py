"""Reading a worker's next micro-batches before it needs them, for remote sources.

Which samples a worker's coming micro-batches hold is known exactly (the sequence is a pure
function of seed and position), so their reads can start early: :class:`Readahead` keeps the
reads of the worker's next micro-batches running on background threads, as many as fit in
``data.readahead_mb`` (measured from the batches read so far, at most ``MAX_DEPTH``; the depth
doubles from 1 per batch, so the first batches' requests are not queued behind a window's), and
hands each one over when the worker builds that micro-batch. The requests themselves run on
the source's fetch pool (``data.requests_in_flight``), which caps what is in flight. A read
ahead may also only bring the bytes to the node cache and say how many
(:meth:`~unetdist.data.sources.base.Source.prefetch`): the worker then decodes on its own thread.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

MAX_DEPTH = 32
QUIET_TO_STOP = 8  # prefetches in a row that found everything in place: the cache is warm (32 random samples
# each: 8 in a row find all in place by chance only when over 99% of the spans are)


def held_bytes(samples: list[Any] | int) -> int:
    """Bytes of the arrays of read samples (errors count nothing), or the bytes a prefetch brought."""
    if isinstance(samples, int):
        return samples
    total = 0
    for sample in samples:
        for name in ("image", "mask", "weight"):
            array = getattr(sample, name, None)
            total += getattr(array, "nbytes", 0)
    return total


class Readahead:
    """``read(q)`` of the micro-batches ``upcoming`` yields, started ahead within a byte window."""

    def __init__(self, read: Callable[[int], list[Any] | int], upcoming: Iterator[int], window_bytes: float) -> None:
        self.read, self.upcoming, self.window_bytes = read, upcoming, window_bytes
        self.depth = 1  # until a batch's size is known
        self.pending: deque[tuple[int, Future]] = deque()
        self.pool = ThreadPoolExecutor(MAX_DEPTH, thread_name_prefix="unetdist-readahead")
        self.quiet = 0  # prefetches in a row that brought nothing
        self.stopped = False

    def take(self, micro_index: int) -> list[Any] | int | None:
        """The samples of ``micro_index`` (the next one ``upcoming`` gave), reading the ones after it;
        or the bytes a prefetch brought for it; or None once stopped: the caller reads it.

        Prefetching stops when ``QUIET_TO_STOP`` in a row found every byte in place (a warm node
        cache that holds the split): the threads would then only contend for the worker's GIL
        (~10% of a warm epoch here). A byte missing later is fetched by the read that needs it."""
        if self.stopped:
            return None
        self._fill()
        index, future = self.pending.popleft()
        if index != micro_index:
            raise RuntimeError(f"readahead out of order: micro-batch {index} read, {micro_index} wanted")
        samples = future.result()
        if isinstance(samples, int):
            self.quiet = self.quiet + 1 if samples == 0 else 0
            if self.quiet >= QUIET_TO_STOP:
                self.stopped = True
                self.pending.clear()
                self.pool.shutdown(wait=False)
                return samples
        size = held_bytes(samples)
        if size:  # double up to the window: a full window at once would queue its GETs before the next batch's
            self.depth = max(1, min(MAX_DEPTH, int(self.window_bytes // size), 2 * self.depth))
        self._fill()
        return samples

    def _fill(self) -> None:
        while len(self.pending) < max(1, self.depth):
            index = next(self.upcoming)
            self.pending.append((index, self.pool.submit(self.read, index)))
