"""Logging set-up and progress bars, shared by training, prediction and data preparation.

This sits below everything else (it imports only ``unetdist.redaction``), so any entry point
can configure logging before it imports the heavier parts.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from unetdist.redaction import redact_log_records


def setup_logging(is_main: bool) -> None:
    """INFO on rank 0, warnings only elsewhere, so N ranks do not print N copies."""
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("mlflow", "alembic", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # URLs (tracking URI, data and model locations) may carry credentials: no log line shows them
    redact_log_records()


class NullProgress:
    def update(self, step: int, **fields: Any) -> None:
        pass

    def close(self) -> None:
        pass


class RichProgress:
    """A rank-0 progress bar: step, loss, samples/s."""

    def __init__(self, total_steps: int, start_step: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
            transient=False,
        )
        self._task = self._bar.add_task("train", total=total_steps, completed=start_step, status="")
        self._bar.start()

    def update(self, step: int, **fields: Any) -> None:
        status = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
        self._bar.update(self._task, completed=step, status=status)

    def close(self) -> None:
        self._bar.stop()
