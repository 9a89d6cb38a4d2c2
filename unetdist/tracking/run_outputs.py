"""Everything only rank 0 does, decided in one place.

``RunOutputs.open(...)`` hands rank 0 the real MLflow tracker, progress bar and file
writers, and every other rank null objects with the same methods, so the training loop
never asks which rank it is on. The trainer calls, on every rank::

    outputs = RunOutputs.open(config, ctx, start_step, run_id)   # run_id from the checkpoint, or None
    outputs.log_data_lineage(config.data, train_loader, val_loader)  # the splits: MLflow dataset inputs
    outputs.tracker.log_metrics({...}, step)                     # returns at once (queued)
    outputs.log_val_panels(step, images, truths, predictions)    # when tracking.image_every divides step
    outputs.on_checkpoint_saved(path, is_best=...)               # per tracking.log_checkpoints
    outputs.log_final_model(model, config, best=False)           # pyfunc model (+ registry)
    outputs.close("FINISHED" | "FAILED" | "PREEMPTED" | "KILLED", error=...)

One MLflow run per training job: a resumed job passes the run id stored in its
checkpoint and logs into the same run again. Steps after the restored step that the
interrupted job had already logged are logged again; MLflow keeps both values of such a
step (its history holds every point; the run's summary value is the latest), and the
metric ``run/resumed_at_step`` marks each resumption on the charts.

A preempted job (``close("PREEMPTED")``: stopped by a signal after saving a checkpoint,
to be resumed) leaves its MLflow run RUNNING with the tag ``unetdist.state=preempted``,
so the UI does not show a requeued job as ended; FINISHED comes only at the true end,
FAILED with the tag ``unetdist.error``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unetdist import preemption
from unetdist.config import RESUME_SAFE_KEYS, Config, DataConfig, TrackingConfig, save_config, tile_shape
from unetdist.data.lineage import describe_split, split_sources
from unetdist.distributed import DistributedContext
from unetdist.logs import NullProgress, RichProgress
from unetdist.redaction import credentials_warning, keys_with_credentials, redact
from unetdist.tracking.base import LEAVE_RUNNING, NullTracker
from unetdist.tracking.datasets import dataset_record
from unetdist.tracking.tracker import MLflowTracker, make_tracker

log = logging.getLogger("unetdist")

RUN_STATUSES = {"FINISHED": "FINISHED", "FAILED": "FAILED", "KILLED": "KILLED", "PREEMPTED": LEAVE_RUNNING}
MAX_ERROR_TAG_CHARS = 4000


@dataclass
class RunOutputs:
    """The run's side effects: tracker, progress bar, checkpoint records, files under output_dir."""

    tracker: MLflowTracker | NullTracker
    progress: RichProgress | NullProgress
    run_dir: Path
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(enabled=False))
    last_checkpoint: Path | None = None
    best_checkpoint: Path | None = None
    system_monitor: Any = None
    is_main: bool = False  # writes the run's files (config, PREEMPTED marker) even without tracking

    @property
    def active(self) -> bool:
        """True on the process that records the run (rank 0 with tracking on)."""
        return not isinstance(self.tracker, NullTracker)

    @classmethod
    def null(cls, run_dir: Path) -> RunOutputs:
        """What every rank but 0 gets (and tests that need no record)."""
        return cls(NullTracker(), NullProgress(), run_dir)

    @classmethod
    def open(cls, config: Config, ctx: DistributedContext, start_step: int, run_id: str | None) -> RunOutputs:
        run_dir = Path(config.train.output_dir)
        if not ctx.is_main:
            return cls.null(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        preemption.clear_marker(run_dir)  # this job runs: an old marker must not requeue it
        live_values = {
            f"{section}.{key}": value
            for section, values in dataclasses.asdict(config).items()
            for key, value in values.items()
        }
        keys_with_secrets = keys_with_credentials(live_values)  # used by this process, written nowhere
        if keys_with_secrets:
            log.warning("%s", credentials_warning(keys_with_secrets))
        config_path = run_dir / "config.yaml"
        save_config(config, config_path)
        tracking = config.tracking
        tracker = make_tracker(
            enabled=tracking.enabled,
            is_main_process=True,
            tracking_uri=tracking.tracking_uri or None,
            experiment=tracking.experiment,
            run_name=tracking.run_name or None,
            run_id=run_id,
            tags=run_tags(config, ctx, start_step),
            local_dir=run_dir,
            queue_size=tracking.queue_size,
            request_timeout_s=tracking.request_timeout_s,
            flush_timeout_s=tracking.flush_timeout_s,
        )
        if isinstance(tracker, MLflowTracker):
            if run_id is not None:
                tracker.replay_leftovers(run_dir)
                tracker.log_metrics({"run/resumed_at_step": start_step}, step=start_step)
            # a resumed job may change these (checkpoint.resume=auto): a tag per attempt, not a warning
            tracker.log_params(config.to_dict(), may_change=RESUME_SAFE_KEYS)
            tracker.log_artifact(config_path)
        use_bar = config.train.progress and sys.stderr.isatty()
        progress = RichProgress(config.train.max_steps, start_step) if use_bar else NullProgress()
        outputs = cls(tracker, progress, run_dir, tracking, is_main=True)
        if tracking.system_metrics and isinstance(tracker, MLflowTracker):
            outputs.system_monitor = _start_system_metrics(tracker, resumed=run_id is not None)
        return outputs

    def log_data_lineage(self, data: DataConfig, train_loader: Any, val_loader: Any | None) -> None:
        """Record what the run trains on: each split the loaders read as an MLflow dataset input.

        A resumed run records the same splits again; the run lists each once (``tracking.datasets``).
        """
        if not self.active:
            return
        sources = split_sources(train_loader, val_loader)
        self.tracker.log_dataset_inputs(
            [dataset_record(describe_split(data, split, source)) for split, source in sources.items()]
        )

    def log_config_files(self, files: list[str]) -> None:
        """The ``--config`` files as given, under ``inputs/`` (a plan's comments say why each value was
        chosen; the resolved config.yaml loses them); beside a plan, its data fingerprint
        (``plan.fingerprint.json``), also as the params ``fingerprint.<name>``."""
        if not self.active:
            return
        from unetdist.data.fingerprint import FingerprintError, fingerprint_path
        from unetdist.data.fingerprint_volumes import load_fingerprint  # a 2-D or a volumes fingerprint

        for name in files:
            path = Path(name)
            self.tracker.log_artifact(path, "inputs")
            fingerprint_file = fingerprint_path(path)
            if not fingerprint_file.is_file():
                continue
            self.tracker.log_artifact(fingerprint_file, "inputs")
            try:
                summary = load_fingerprint(json.loads(fingerprint_file.read_text())).summary()
            except (ValueError, FingerprintError) as err:  # the run does not depend on it: say so, go on
                log.warning("%s: not logged as params: %s", fingerprint_file, err)
                continue
            self.tracker.log_params({f"fingerprint.{key}": value for key, value in summary.items()})

    def log_val_panels(
        self, step: int, image: Any, truth: Any, pred: Any, truth_instances: Any = None, pred_instances: Any = None
    ) -> None:
        """Log image | truth | prediction | error panels of the first ``tracking.num_images`` tiles,
        and with instance ids, the image with the true and predicted objects' outlines.

        ``image`` ``[N, C, H, W]`` float, ``truth``/``pred`` ``[N, h, w]`` class maps, the instances
        ``[N, h, w]`` ids (arrays or tensors). Does nothing unless ``tracking.image_every`` divides ``step``.
        The PNGs stay in ``output_dir/val_panels/step-XXXXXXXX/``; MLflow gets them as
        the image series ``val/panel_K`` at ``step``.
        """
        every, count = self.tracking.image_every, self.tracking.num_images
        if not self.active or not every or not count or step % every:
            return
        from unetdist.reports import save_panels

        arrays = [_to_numpy(value)[:count] for value in (image, truth, pred)]
        instances = None
        if truth_instances is not None and pred_instances is not None:
            instances = (_to_numpy(truth_instances)[:count], _to_numpy(pred_instances)[:count])
        for index, path in save_panels(step, *arrays, self.run_dir / "val_panels", instances):
            self.tracker.log_image(path, key=f"val/panel_{index}", step=step)

    def on_checkpoint_saved(self, path: Path, is_best: bool = False) -> None:
        """Record a finished checkpoint in the run (every rank calls this; only rank 0 acts).

        Tags ``unetdist.last_checkpoint`` (and ``unetdist.best_checkpoint``) always name the
        file; ``tracking.log_checkpoints``: ``all`` uploads it now, ``last``/``best`` upload
        the last (and best) one when the run finishes, ``none`` uploads nothing.
        """
        if not self.active:
            return
        path = Path(path).resolve()
        self.last_checkpoint = path
        tags = {"unetdist.last_checkpoint": str(path)}
        if is_best:
            self.best_checkpoint = path
            tags["unetdist.best_checkpoint"] = str(path)
        self.tracker.set_tags(tags)
        if self.tracking.log_checkpoints == "all":
            self._log_checkpoint_files(path)

    def _log_checkpoint_files(self, path: Path, artifact_path: str = "checkpoints") -> None:
        # a checkpoint is a directory of parts and their manifest: keep it whole under its name
        self.tracker.log_artifact(path, f"{artifact_path}/{path.name}")

    def log_final_model(
        self, model: torch.nn.Module, config: Config, best: bool = False, step: int = 0, decoding: dict | None = None
    ) -> None:
        """Log ``model`` as an MLflow pyfunc model (``model``, or ``best_model`` with ``best``), with
        ``decoding`` (``DecodeParams.to_dict()``), how ``predict --instances`` decodes its output.

        The weights are saved now under ``output_dir/mlflow-model/{final,best}``; the
        upload (and registration under ``tracking.register_as`` with the alias
        ``final`` or ``best``) happens in the background.
        """
        if not self.active or not self.tracking.log_model:
            return
        # imported here: the model's code (and mlflow) are needed only when a model is logged
        from unetdist.inference.pyfunc import save_model_files

        kind = "best" if best else "final"
        files = save_model_files(model, config, self.run_dir / "mlflow-model" / kind, decoding=decoding)
        self.tracker.log_pyfunc_model(
            {
                "name": "best_model" if best else "model",
                "files": files,
                "step": int(step),
                "in_channels": config.model.in_channels,
                "example_size": config.data.tile_size,
                "example_shape": list(tile_shape(config)),  # a volume model's example is a volume
                "register_as": self.tracking.register_as,
                "alias": kind,
            }
        )

    def mark_preempted(self, step: int) -> None:
        """Leave ``output_dir/PREEMPTED`` for job scripts that requeue a stopped run."""
        if self.is_main:
            preemption.write_marker(self.run_dir, step)

    def close(self, status: str, error: str | None = None) -> None:
        """End the run's record: FINISHED, FAILED (``error`` as a tag), PREEMPTED (run left RUNNING) or KILLED."""
        if status not in RUN_STATUSES:
            raise ValueError(f"status must be one of {', '.join(RUN_STATUSES)}, got {status!r}")
        self.progress.close()
        if self.system_monitor is not None:
            try:
                self.system_monitor.finish()
            except Exception:
                log.warning("could not stop MLflow system metrics", exc_info=True)
            self.system_monitor = None
        if not self.active:
            return
        tags = {"unetdist.state": status.lower()}
        if status == "FAILED":
            tags["unetdist.error"] = (error or "unknown error")[-MAX_ERROR_TAG_CHARS:]
        if status == "FINISHED" and self.tracking.log_checkpoints in ("last", "best"):
            if self.tracking.log_checkpoints == "best" and self.best_checkpoint not in (
                None,
                self.last_checkpoint,
            ):
                self._log_checkpoint_files(self.best_checkpoint, "checkpoints/best")
            if self.last_checkpoint is not None:
                self._log_checkpoint_files(self.last_checkpoint)
        self.tracker.set_tags(tags)
        self.tracker.finish(RUN_STATUSES[status])


def error_summary(error: BaseException) -> str:
    """``Type: message`` of ``error`` plus the innermost frame, for the ``unetdist.error`` tag."""
    import traceback

    frames = traceback.extract_tb(error.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    return redact(f"{type(error).__name__}: {error}{where}")


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return (
            value.detach().float().cpu().numpy()
            if value.is_floating_point()
            else value.detach().cpu().numpy()
        )
    return np.asarray(value)


def _start_system_metrics(tracker: MLflowTracker, resumed: bool) -> Any:
    try:
        import psutil  # noqa: F401  (MLflow's monitor needs it)
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError:
        log.warning("tracking.system_metrics needs psutil (pip install psutil); not logging system metrics")
        return None
    if tracker.run_id is None:
        log.warning(
            "tracking.system_metrics: no MLflow run yet (server unreachable); not logging system metrics"
        )
        return None
    monitor = SystemMetricsMonitor(tracker.run_id, resume_logging=resumed, tracking_uri=tracker.tracking_uri)
    monitor.start()
    return monitor


def git_commit() -> str | None:
    """The commit of the code that runs (its checkout, not the cwd), or None outside a git checkout."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and len(commit) == 40 else None


def node_count(ctx: DistributedContext) -> int:
    for name in ("GROUP_WORLD_SIZE", "SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    return max(1, ctx.world_size // local_world) if local_world else 1


def run_tags(config: Config, ctx: DistributedContext, start_step: int = 0) -> dict[str, str]:
    """Tags that say what ran where: code, config, world, Slurm job, versions."""
    tags = {
        "unetdist.state": "running",
        "unetdist.config_hash": config.digest(),
        "unetdist.world_size": str(ctx.world_size),
        "unetdist.nodes": str(node_count(ctx)),
        "unetdist.device": ctx.device.type,
        "unetdist.start_step": str(start_step),
        "torch.version": torch.__version__,
        "torch.cuda": str(torch.version.cuda),
        "python.version": platform.python_version(),
        "model.preset": config.model.preset,
    }
    commit = git_commit()
    if commit:
        tags["unetdist.git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit  # the UI shows this one
    if torch.cuda.is_available() and ctx.device.type == "cuda":
        tags["cuda.device"] = torch.cuda.get_device_name(ctx.device)
    for variable, tag in (("SLURM_JOB_ID", "slurm.job_id"), ("SLURM_RESTART_COUNT", "slurm.restart_count")):
        if os.environ.get(variable):
            tags[tag] = os.environ[variable]
    if os.environ.get("SLURM_JOB_ID") and "slurm.restart_count" not in tags:
        tags["slurm.restart_count"] = "0"
    return tags
