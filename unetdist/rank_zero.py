"""Everything only rank 0 does, decided in one place.

``RunOutputs.open(...)`` hands rank 0 the real MLflow tracker, progress bar and file
writers, and every other rank null objects with the same methods, so the training loop
never asks which rank it is on.
"""

from __future__ import annotations

import logging
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unetdist.config import Config, save_config
from unetdist.distributed import DistributedContext
from unetdist.tracking import MLflowTracker, NullTracker, make_tracker

log = logging.getLogger("unetdist")


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


@dataclass
class RunOutputs:
    """The run's side effects: tracker, progress bar, checkpoint writes, files under output_dir."""

    tracker: MLflowTracker | NullTracker
    progress: RichProgress | NullProgress
    run_dir: Path
    log_checkpoints: bool

    @classmethod
    def null(cls, run_dir: Path) -> RunOutputs:
        """What every rank but 0 gets (and tests that need no record)."""
        return cls(NullTracker(), NullProgress(), run_dir, log_checkpoints=False)

    @classmethod
    def open(cls, config: Config, ctx: DistributedContext, start_step: int, run_id: str | None) -> RunOutputs:
        run_dir = Path(config.train.output_dir)
        if not ctx.is_main:
            return cls.null(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
        tracking = config.tracking
        tracker = make_tracker(
            enabled=tracking.enabled,
            is_main_process=True,
            tracking_uri=tracking.tracking_uri or None,
            experiment=tracking.experiment,
            run_name=tracking.run_name or None,
            run_id=run_id,
            tags=_run_tags(config, ctx),
        )
        tracker.log_params(config.to_dict())
        tracker.log_config(config.to_dict())
        use_bar = config.train.progress and sys.stderr.isatty()
        progress = RichProgress(config.train.max_steps, start_step) if use_bar else NullProgress()
        return cls(tracker, progress, run_dir, log_checkpoints=tracking.log_checkpoints)

    def on_checkpoint_saved(self, path: Path) -> None:
        """Record a finished checkpoint in the run (every rank calls this; only rank 0 acts)."""
        if self.log_checkpoints:
            self.tracker.log_artifact(str(path), "checkpoints")

    def close(self, status: str) -> None:
        self.progress.close()
        self.tracker.finish(status)


def _run_tags(config: Config, ctx: DistributedContext) -> dict[str, str]:
    return {
        "unetdist.config_hash": config.digest(),
        "unetdist.world_size": str(ctx.world_size),
        "unetdist.device": ctx.device.type,
        "torch.version": torch.__version__,
        "torch.cuda": str(torch.version.cuda),
        "python.version": platform.python_version(),
        "model.preset": config.model.preset,
    }
