"""Stop requests by signal: SIGTERM (scheduler, torchrun), SIGUSR1 (Slurm's ``--signal``) and SIGINT (Ctrl-C).

The handler only sets a flag. The trainer asks ``should_stop()`` every ``train.stop_check_every``
steps, where all ranks agree through one tiny all-reduce, so a signal that reached one rank stops them all
at the same step: they save a checkpoint together and exit with ``EXIT_PREEMPTED``. Nothing
is saved inside the handler and no rank waits in a collective the others never enter.

Ctrl-C: the first one stops like SIGTERM; after it SIGINT has Python's own handler again, so a
second Ctrl-C raises ``KeyboardInterrupt`` at once (no checkpoint; ``train`` exits 130). In a
terminal Ctrl-C reaches the DataLoader workers too, which ignore it (``data/loader.py``).
Under torchrun the workers run in sessions of their own: Ctrl-C reaches torchrun only, which
sends SIGINT to every rank once and waits ``--shutdown-timeout`` (default 30 s) before SIGKILL,
so the ranks save and exit 75 when the next ``train.stop_check_every`` boundary and the save
fit in that time.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

from unetdist import distributed

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: saved and stopped on request; resume to continue
MARKER = "PREEMPTED"  # written to output_dir with the step, for job scripts that requeue


class Preempted(Exception):
    """Raised after the stop checkpoint is saved; ``train.main`` turns it into EXIT_PREEMPTED."""

    def __init__(self, step: int, signal_name: str) -> None:
        super().__init__(f"stopped by {signal_name} at step {step} after saving a checkpoint")
        self.step = step


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopSignal:
    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.received: str | None = None
        # a SIGINT ignored from the start (a background job of a script, nohup) stays ignored
        signals = tuple(sig for sig in signals if not (sig == signal.SIGINT and signal.getsignal(sig) == signal.SIG_IGN))
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, self._previous[signal.SIGINT])  # a second Ctrl-C stops at once
            log.warning("Ctrl-C: saving a checkpoint at the next step boundary, then exiting %d; "
                        "Ctrl-C again stops at once without saving", EXIT_PREEMPTED)

    def should_stop(self) -> bool:
        """True on every rank when any rank has received a stop signal (a collective call)."""
        return distributed.any_rank(self.received is not None)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def write_marker(output_dir: Path, step: int) -> None:
    (output_dir / MARKER).write_text(f"{step}\n")


def clear_marker(output_dir: Path) -> None:
    (output_dir / MARKER).unlink(missing_ok=True)
