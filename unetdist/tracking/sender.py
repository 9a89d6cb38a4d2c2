"""The one place where a tracking operation becomes MLflow client calls.

Operations are plain JSON-able dicts, so the same code sends them from the tracker's
first call, from its background thread and from ``replay`` of a file written days later.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unetdist.redaction import redact
from unetdist.tracking.base import MAX_METRICS_PER_BATCH, MAX_PARAMS_PER_BATCH
from unetdist.tracking.mlflow_setup import experiment_directory_name, sqlite_artifact_root

if TYPE_CHECKING:
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)


def is_permanent(error: BaseException) -> bool:
    """True for a request the server will refuse whatever the retry (HTTP 4xx but 408/429, a missing file)."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, (FileNotFoundError, IsADirectoryError, ValueError, TypeError)) and not isinstance(
        error, MlflowException
    ):
        return True
    if isinstance(error, MlflowException):
        status = error.get_http_status_code()
        return 400 <= status < 500 and status not in (408, 429)
    return False


def first_line(error: BaseException) -> str:
    """The error's first line, at most 200 characters, redacted (MLflow's errors quote the whole URI)."""
    text = redact(str(error)).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


class Sender:
    """Turns queued operations (plain JSON-able dicts) into MLflow client calls, synchronously.

    Operations: ``create_run``, ``reattach``, ``params``, ``metrics``, ``tags``,
    ``dataset_inputs``, ``artifact``, ``image``, ``pyfunc_model``, ``terminate``.
    """

    def __init__(self, tracking_uri: str, run_id: str | None, experiment_id: str | None) -> None:
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.client: MlflowClient = MlflowClient(tracking_uri=tracking_uri)
        self.run_id = run_id
        self.experiment_id = experiment_id

    def send(self, op: dict[str, Any]) -> Any:
        """Send ``op``; returns the MLflow run for ``create_run`` and ``reattach``, else None."""
        kind = op["op"]
        if kind == "create_run":
            return self.create_run(op["experiment"], op.get("run_name"), op.get("tags") or {})
        if self.run_id is None:
            raise RuntimeError("no MLflow run yet: the run's creation has not reached the server")
        if kind == "reattach":
            return self.reattach(op.get("tags") or {}, op.get("experiment"))
        if kind == "params":
            from mlflow.entities import Param

            items = list(op["params"].items())
            for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
                batch = [Param(key, value) for key, value in items[start : start + MAX_PARAMS_PER_BATCH]]
                self.client.log_batch(self.run_id, params=batch)
        elif kind == "metrics":
            from mlflow.entities import Metric

            batch = [Metric(key, float(value), int(ts), int(step)) for key, value, ts, step in op["metrics"]]
            for start in range(0, len(batch), MAX_METRICS_PER_BATCH):
                self.client.log_batch(self.run_id, metrics=batch[start : start + MAX_METRICS_PER_BATCH])
        elif kind == "tags":
            from mlflow.entities import RunTag

            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in op["tags"].items()])
        elif kind == "dataset_inputs":
            from unetdist.tracking.datasets import dataset_inputs

            self.client.log_inputs(self.run_id, datasets=dataset_inputs(op["datasets"]))
        elif kind == "artifact":
            path = Path(op["path"])
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), op.get("artifact_path"))
            else:
                if not path.exists():
                    raise FileNotFoundError(f"artifact {path} is gone")
                self.client.log_artifact(self.run_id, str(path), op.get("artifact_path"))
        elif kind == "image":
            from PIL import Image

            with Image.open(op["path"]) as image:
                image.load()
                self.client.log_image(
                    self.run_id, image, key=op["key"], step=int(op["step"]), timestamp=int(op["timestamp"])
                )
        elif kind == "pyfunc_model":
            # imported here: it pulls in torch and the inference code, which most operations never need
            from unetdist.tracking.models import log_pyfunc_model

            log_pyfunc_model(self.client, self.tracking_uri, self.experiment_id or "", self.run_id, op)
        elif kind == "terminate":
            self.client.set_terminated(self.run_id, status=op["status"], end_time=op.get("end_time"))
        else:
            raise ValueError(f"unknown tracking operation {kind!r}")
        return None

    def create_run(self, experiment: str, run_name: str | None, tags: Mapping[str, str]) -> Any:
        self.experiment_id = self._get_or_create_experiment(experiment)
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags))
        self.run_id = run.info.run_id
        return run

    def reattach(self, tags: Mapping[str, str], experiment: str | None = None) -> Any:
        """Reopen the run as RUNNING and add ``tags``; with ``experiment``, warn if the run is in another."""
        from mlflow.entities import RunTag

        run = self.client.get_run(self.run_id)
        self.experiment_id = run.info.experiment_id
        if run.info.status != "RUNNING":
            self.client.update_run(self.run_id, status="RUNNING")
        if tags:
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        if experiment is not None:
            run_experiment = self.client.get_experiment(run.info.experiment_id)
            if run_experiment.name != experiment:
                logger.warning(
                    "run %s belongs to experiment %r, not %r; logging to the run's experiment",
                    self.run_id,
                    run_experiment.name,
                    experiment,
                )
        return run

    def _get_or_create_experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        existing = self.client.get_experiment_by_name(name)
        if existing is not None:
            if existing.lifecycle_stage == "deleted":
                # a deleted name stays taken until garbage-collected; reviving is what a user expects
                self.client.restore_experiment(existing.experiment_id)
            return existing.experiment_id
        artifact_root = sqlite_artifact_root(self.tracking_uri)
        artifact_location = (
            str(artifact_root / experiment_directory_name(name)) if artifact_root is not None else None
        )
        try:
            return self.client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:
            # another process created it between our lookup and create
            existing = self.client.get_experiment_by_name(name)
            if existing is None:
                raise
            return existing.experiment_id
