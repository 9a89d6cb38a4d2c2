"""A per-rank watchdog: a run that stops making progress ends itself instead of hanging.

A rank whose peer died or froze waits in a collective until the process-group timeout,
and a rank stuck in I/O or a deadlocked data loader may wait forever; either way a
scheduled job would otherwise sit idle until its time limit. The trainer calls ``beat``
after every optimizer step; when no beat arrives for ``timeout_s`` the watchdog logs which
rank stalled after which step, dumps every thread's stack to stderr (faulthandler) and
ends the process with ``EXIT_STALLED``, so that torchrun tears down the other ranks and
Slurm ends (or requeues) the job::

    watchdog = Watchdog(config.train.watchdog_s, ctx.rank)   # train.watchdog_s=0: off
    for ...:
        trainer.train_step(...)
        watchdog.beat(trainer.step)
    watchdog.stop()

Set ``timeout_s`` well above the slowest step, validation pass and checkpoint save (or
beat after those too). The watch starts at the first beat: start-up (loader workers,
``torch.compile``, cudnn autotuning) can take minutes, and hangs there meet the rendezvous
and process-group timeouts. ``startup_timeout_s`` watches the way to the first beat as well.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time

log = logging.getLogger(__name__)

EXIT_STALLED = 3  # not 1 (an ordinary failure) and not 75 (preempted after saving: requeue)


class Watchdog:
    """A daemon thread that ends the process when ``beat`` is not called for ``timeout_s`` seconds.

    ``timeout_s <= 0`` makes a watchdog that does nothing, so callers need no ``if``.
    """

    def __init__(
        self,
        timeout_s: float,
        rank: int,
        startup_timeout_s: float | None = None,
        exit_code: int = EXIT_STALLED,
    ) -> None:
        self.timeout_s = float(timeout_s)
        self.rank = rank
        self.startup_timeout_s = startup_timeout_s
        self.exit_code = exit_code
        self._last_step: int | None = None
        self._last_beat = time.monotonic()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        if self.timeout_s > 0:
            self._thread = threading.Thread(
                target=self._watch, name=f"unetdist-watchdog-rank{rank}", daemon=True
            )
            self._thread.start()

    @property
    def enabled(self) -> bool:
        return self._thread is not None

    def beat(self, step: int) -> None:
        """Record that ``step`` finished (cheap: two assignments, no lock, no I/O)."""
        self._last_step = step
        self._last_beat = time.monotonic()

    def stop(self) -> None:
        """End the watch (at the end of training, or before a long phase without steps)."""
        self._stopped.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        poll_s = min(1.0, self.timeout_s / 4)
        while not self._stopped.wait(poll_s):
            started = self._last_step is not None
            limit_s = self.timeout_s if started else self.startup_timeout_s
            silent_s = time.monotonic() - self._last_beat
            if limit_s is not None and silent_s >= limit_s:
                self._fire(silent_s, limit_s)

    def _fire(self, silent_s: float, limit_s: float) -> None:
        after = f"after step {self._last_step}" if self._last_step is not None else "before its first step"
        setting = "train.watchdog_s" if self._last_step is not None else "startup_timeout_s"
        message = (
            f"watchdog: rank {self.rank} made no progress for {silent_s:.1f} s {after} "
            f"({setting}={limit_s:g}); dumping all thread stacks and exiting with {self.exit_code}"
        )
        log.error("%s", message)  # ERROR passes the quiet logging of non-zero ranks
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        # os._exit: a clean exit would wait for the stuck main thread and its collectives
        os._exit(self.exit_code)
