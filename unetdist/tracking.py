"""Experiment tracking: MLflow on the main process, a null object everywhere else.

The training loop calls the same methods on every rank; ``make_tracker`` hands
non-main ranks a ``NullTracker`` whose methods do nothing, so the loop never
branches on the rank.

``MLflowTracker`` talks to MLflow only through an ``MlflowClient`` bound to its
own tracking URI, never through MLflow's global "active run", so two trackers
in one process (tests, sweeps) do not leak into each other. The one exception
is ``log_model`` (see there).

Credentials come only from the environment (``MLFLOW_TRACKING_USERNAME``,
``MLFLOW_TRACKING_PASSWORD``, ``MLFLOW_TRACKING_TOKEN``), which MLflow reads
itself; nothing here accepts them, and params whose key looks like a secret
are redacted before they are logged.

Without ``MLFLOW_TRACKING_URI`` runs go to a SQLite store in the working
directory; to browse them, run in that directory::

    mlflow ui --backend-store-uri sqlite:///mlflow.db

and open http://127.0.0.1:5000.

``mlflow`` is imported lazily: it takes seconds to import, and ranks that only
ever hold a ``NullTracker`` should not pay for it.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import logging
import math
import os
import re
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

if TYPE_CHECKING:
    import torch
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

# mlflow.utils.validation: MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH, MAX_METRICS_PER_BATCH
MAX_PARAM_VALUE_LENGTH = 6000
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

RUN_END_STATUSES = ("FINISHED", "FAILED", "KILLED")
REDACTED = "***"
_SECRET_KEY = re.compile(r"password|passwd|secret|token|api[_-]?key|credential", re.IGNORECASE)


def _set_quiet_mlflow_defaults() -> None:
    # Training machines have no internet: telemetry would only time out.
    # MLflow >= 3.x reads MLFLOW_DISABLE_TELEMETRY on every tracked call.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # MlflowClient.set_terminated writes "🏃 View run ..." to stdout for HTTP
    # stores; we log the run's address through logging instead.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


_set_quiet_mlflow_defaults()


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite store ``./mlflow.db`` (absolute path).

    Artifacts of experiments this module creates in a SQLite store go to
    ``mlruns/`` beside the database file, so for the default store that is
    ``./mlruns``. Browse with ``mlflow ui --backend-store-uri sqlite:///mlflow.db``
    run in the same directory.
    """
    from_environment = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if from_environment:
        return from_environment
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def flatten_config(nested: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"model": {"preset": "s"}}`` -> ``{"model.preset": "s"}``; values as strings, lists as repr."""
    flat: dict[str, str] = {}
    for key, value in nested.items():
        dotted_key = f"{prefix}{key}"
        if isinstance(value, Mapping):
            if value:
                flat.update(flatten_config(value, prefix=f"{dotted_key}."))
            else:
                flat[dotted_key] = "{}"  # keep the key visible rather than dropping it
        elif isinstance(value, (list, tuple)):
            flat[dotted_key] = repr(value)
        else:
            flat[dotted_key] = str(value)
    return flat


def _redact_secret_values(params: dict[str, str]) -> dict[str, str]:
    redacted = {}
    for key, value in params.items():
        leaf = key.rsplit(".", 1)[-1]
        redacted[key] = REDACTED if _SECRET_KEY.search(leaf) else value
    return redacted


def _uri_without_credentials(uri: str) -> str:
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _sqlite_artifact_root(tracking_uri: str) -> Path | None:
    """``<dir of the db file>/mlruns`` for a file-backed ``sqlite:///`` URI, else None.

    MLflow itself puts a SQLite store's artifacts in ``./mlruns`` of whatever the
    working directory was when the store was first opened, which scatters
    artifacts when the same database is used from different directories.
    """
    if not tracking_uri.startswith("sqlite:///"):
        return None
    database = tracking_uri[len("sqlite:///") :].split("?", 1)[0]
    if not database or database == ":memory:":
        return None
    return Path(database).resolve().parent / "mlruns"


def _experiment_directory_name(experiment: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"


def _pinned_requirements(*distributions: str) -> list[str]:
    # Explicit requirements skip MLflow's inference, which imports the model in
    # a subprocess: ~6 s instead of ~0.5 s for a tiny net (measured, mlflow 3.17).
    pinned = []
    for distribution in distributions:
        try:
            pinned.append(f"{distribution}=={importlib.metadata.version(distribution)}")
        except importlib.metadata.PackageNotFoundError:
            pinned.append(distribution)
    return pinned


def _unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    import torch

    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


@contextlib.contextmanager
def _global_tracking_uri(tracking_uri: str) -> Iterator[None]:
    """Point MLflow's global tracking URI at ``tracking_uri`` for the block, then restore it.

    ``mlflow.tracking._tracking_service.utils._use_tracking_uri`` does the same
    but unsets a user's ``MLFLOW_TRACKING_URI`` environment variable on exit
    when no global URI had been set; this restores both.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_global_uri = tracking_utils._tracking_uri
    saved_environment_uri = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_global_uri)
        if saved_environment_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_environment_uri


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextlib.contextmanager
def _filtered_logger(name: str, message_prefix: str) -> Iterator[None]:
    target = logging.getLogger(name)
    message_filter = _DropMessages(message_prefix)
    target.addFilter(message_filter)
    try:
        yield
    finally:
        target.removeFilter(message_filter)


class NullTracker:
    """The tracker of non-main ranks and of runs with tracking off: every method does nothing."""

    run_id: str | None = None
    experiment_id: str | None = None

    def log_params(self, params: Mapping[str, object]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_config(self, config_dict: Mapping[str, Any], filename: str = "config.yaml") -> None:
        pass

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        pass

    def log_model(
        self,
        model: torch.nn.Module,
        input_example: np.ndarray,
        name: str = "model",
        step: int = 0,
    ) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        pass


class MLflowTracker:
    """One MLflow run, created (or reattached to, by ``run_id``) in ``experiment``."""

    def __init__(
        self,
        tracking_uri: str | None,
        experiment: str,
        run_name: str | None = None,
        run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri or default_tracking_uri()
        self._client: MlflowClient = MlflowClient(tracking_uri=self.tracking_uri)
        self._finished = False
        self._warned_metric_failure = False

        if run_id is None:
            self._experiment_id = self._get_or_create_experiment(experiment)
            run = self._client.create_run(self._experiment_id, run_name=run_name, tags=dict(tags or {}))
            self._logged_params: dict[str, str] = {}
        else:
            run = self._reattach(run_id, experiment, tags)
            self._experiment_id = run.info.experiment_id
            self._logged_params = dict(run.data.params)
        self._run_id: str = run.info.run_id
        logger.info(
            "MLflow run %s (%s) in experiment %r (id %s) at %s",
            self._run_id,
            run.info.run_name,
            experiment,
            self._experiment_id,
            _uri_without_credentials(self.tracking_uri),
        )

    @property
    def run_id(self) -> str:
        return self._run_id

    @property
    def experiment_id(self) -> str:
        return self._experiment_id

    def _get_or_create_experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        existing = self._client.get_experiment_by_name(name)
        if existing is not None:
            if existing.lifecycle_stage == "deleted":
                # a deleted name stays taken until garbage-collected; reviving is what a user expects
                self._client.restore_experiment(existing.experiment_id)
            return existing.experiment_id
        artifact_root = _sqlite_artifact_root(self.tracking_uri)
        artifact_location = (
            str(artifact_root / _experiment_directory_name(name)) if artifact_root is not None else None
        )
        try:
            return self._client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:
            # another process created it between our lookup and create
            existing = self._client.get_experiment_by_name(name)
            if existing is None:
                raise
            return existing.experiment_id

    def _reattach(self, run_id: str, experiment: str, tags: Mapping[str, str] | None) -> Any:
        run = self._client.get_run(run_id)
        run_experiment = self._client.get_experiment(run.info.experiment_id)
        if run_experiment.name != experiment:
            logger.warning(
                "run %s belongs to experiment %r, not %r; logging to the run's experiment",
                run_id,
                run_experiment.name,
                experiment,
            )
        if run.info.status != "RUNNING":
            self._client.update_run(run_id, status="RUNNING")
        for key, value in (tags or {}).items():
            self._client.set_tag(run_id, key, value)
        return run

    def log_params(self, params: Mapping[str, object]) -> None:
        """Log (nested) params as flat strings; keys already on the run are skipped.

        MLflow refuses to change a param's value, so on a reattached run a key
        with a new value keeps its first value (with a warning).
        """
        from mlflow.entities import Param

        new_params: dict[str, str] = {}
        for key, value in _redact_secret_values(flatten_config(params)).items():
            if len(value) > MAX_PARAM_VALUE_LENGTH:
                logger.warning(
                    "param %s is %d characters; truncated to MLflow's limit of %d",
                    key,
                    len(value),
                    MAX_PARAM_VALUE_LENGTH,
                )
                value = value[:MAX_PARAM_VALUE_LENGTH]
            previous = self._logged_params.get(key)
            if previous is None:
                new_params[key] = value
            elif previous != value:
                logger.warning(
                    "param %s was already logged as %r; MLflow keeps that, not %r", key, previous, value
                )
        items = list(new_params.items())
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            batch = [Param(key, value) for key, value in items[start : start + MAX_PARAMS_PER_BATCH]]
            self._client.log_batch(self._run_id, params=batch)
        self._logged_params.update(new_params)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log all ``metrics`` at ``step`` in one request; best effort.

        NaN is logged as NaN (MLflow 3.17 stores it, over SQLite and HTTP) so a
        diverging loss stays visible. A failure to reach the server is logged
        as a warning rather than raised: losing a point of a curve must not
        end a training run.
        """
        from mlflow.entities import Metric

        timestamp_ms = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                logger.warning("metric %s=%r is not a number; not logged", key, value)
                continue
            if math.isnan(number):
                logger.debug("metric %s is NaN at step %d", key, step)
            batch.append(Metric(key, number, timestamp_ms, int(step)))
        try:
            for start in range(0, len(batch), MAX_METRICS_PER_BATCH):
                self._client.log_batch(self._run_id, metrics=batch[start : start + MAX_METRICS_PER_BATCH])
        except Exception:
            # warn once with the traceback, then quietly: a dead server would flood the log
            if not self._warned_metric_failure:
                logger.warning("could not log metrics at step %d; training goes on", step, exc_info=True)
                self._warned_metric_failure = True
            else:
                logger.debug("could not log metrics at step %d", step, exc_info=True)

    def log_config(self, config_dict: Mapping[str, Any], filename: str = "config.yaml") -> None:
        """Write ``config_dict`` as YAML and log it at the run's artifact root."""
        with tempfile.TemporaryDirectory(prefix="unetdist-config-") as scratch:
            config_path = Path(scratch) / filename
            config_path.write_text(yaml.safe_dump(dict(config_dict), sort_keys=False))
            self._client.log_artifact(self._run_id, str(config_path))

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Log a file, or a directory's contents, under ``artifact_path`` (default: the root)."""
        if Path(path).is_dir():
            self._client.log_artifacts(self._run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self._run_id, str(path), artifact_path)

    def log_model(
        self,
        model: torch.nn.Module,
        input_example: np.ndarray,
        name: str = "model",
        step: int = 0,
    ) -> Any:
        """Log a CPU, eval-mode copy of ``model`` as a LoggedModel of this run; returns its ModelInfo.

        ``input_example`` is one float32 batch ``[1, C, H, W]``; MLflow derives
        the signature from it. DDP and ``torch.compile`` wrappers are removed.
        Loading needs the model's classes importable (``unetdist`` installed).

        How, in mlflow 3.17: ``mlflow.pytorch.log_model`` has no tracking-URI
        argument and, given only ``run_id``, files the LoggedModel under the
        globally active experiment (default "0"), not the run's. So the
        LoggedModel is created here through our client, in the run's
        experiment and linked to the run, and ``log_model`` gets its
        ``model_id`` and ``run_id``, with the global tracking URI pointed at our
        store just for the call. No fluent run is started, so the run's status
        is untouched (``start_run``/``end_run`` would mark it FINISHED).

        Serialization is pickle (cloudpickle), not MLflow's default "pt2":
        ``torch.export`` specializes the batch dimension to the example's 1
        (a batch of 2 then fails a guard) and takes seconds even for a tiny net.
        """
        import mlflow.pytorch
        import torch

        model_for_logging = copy.deepcopy(_unwrap_model(model)).to("cpu").eval()
        example = (
            input_example.detach().cpu().numpy() if isinstance(input_example, torch.Tensor) else input_example
        )
        example = np.asarray(example, dtype=np.float32)
        if example.ndim == 3:
            example = example[np.newaxis]
        logged_model = self._client.create_logged_model(
            experiment_id=self._experiment_id,
            name=name,
            source_run_id=self._run_id,
            params=dict(self._logged_params),
        )
        with (
            _global_tracking_uri(self.tracking_uri),
            _filtered_logger("mlflow.pytorch", "Saving pytorch model by Pickle"),
        ):
            return mlflow.pytorch.log_model(
                model_for_logging,
                name=name,
                input_example=example,
                pip_requirements=_pinned_requirements("torch", "numpy", "cloudpickle"),
                serialization_format="pickle",
                run_id=self._run_id,
                model_id=logged_model.model_id,
                step=step,
            )

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with ``status`` (FINISHED, FAILED or KILLED); later calls do nothing.

        Never raises for a backend failure: it usually runs in a ``finally``
        where an exception would hide the one that ended training.
        """
        if status not in RUN_END_STATUSES:
            raise ValueError(f"status must be one of {RUN_END_STATUSES}, got {status!r}")
        if self._finished:
            return
        self._finished = True
        try:
            self._client.set_terminated(self._run_id, status=status)
        except Exception:
            logger.warning("could not mark MLflow run %s %s", self._run_id, status, exc_info=True)

    def __enter__(self) -> MLflowTracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.finish("KILLED")
        else:
            self.finish("FAILED")


def make_tracker(
    enabled: bool,
    is_main_process: bool,
    tracking_uri: str | None,
    experiment: str,
    run_name: str | None,
    run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> MLflowTracker | NullTracker:
    """An ``MLflowTracker`` on the main process when tracking is enabled, else a ``NullTracker``.

    ``tracking_uri`` None or "" means ``default_tracking_uri()``.
    """
    if not (enabled and is_main_process):
        return NullTracker()
    return MLflowTracker(
        tracking_uri=tracking_uri or default_tracking_uri(),
        experiment=experiment,
        run_name=run_name,
        run_id=run_id,
        tags=tags,
    )
