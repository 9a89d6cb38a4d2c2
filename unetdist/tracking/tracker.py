"""``MLflowTracker``: one MLflow run that never lets the tracking server slow or stop training.

Every logging call only queues an operation (see ``outbox``); ``finish`` waits at most
``flush_timeout_s`` for the rest, and whatever is still unsent is written to
``<local_dir>/mlflow-unsent-<run>-<time>.jsonl`` with a warning naming
``python -m unetdist.tracking replay``. A resumed run also queues such files of its run
by itself (``replay_leftovers``).

The tracking URI is used as given, credentials included; every URI, param, tag and error
that is logged or written goes through ``unetdist.redaction`` first.

The tracker talks to MLflow only through its ``Sender``, whose ``MlflowClient`` is bound
to the tracker's own tracking URI, never through MLflow's global "active run", so two
trackers in one process (tests, sweeps) do not leak into each other.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import yaml

from unetdist.redaction import redact, redact_params, redact_values
from unetdist.tracking.base import LEAVE_RUNNING, MAX_PARAM_VALUE_LENGTH, RUN_END_STATUSES, NullTracker
from unetdist.tracking.datasets import new_records
from unetdist.tracking.mlflow_setup import (
    default_local_dir,
    default_tracking_uri,
    flatten_config,
    set_fail_fast_http,
)
from unetdist.tracking.outbox import OUTBOX_FORMAT, Outbox, read_unsent, write_unsent
from unetdist.tracking.sender import Sender, first_line, is_permanent

if TYPE_CHECKING:
    import numpy as np
    import torch
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)


class MLflowTracker:
    """One MLflow run, created (or reattached to, by ``run_id``) in ``experiment``; logs in the background.

    The run is created (or reattached) in ``__init__``, with requests that fail
    fast. If the server cannot be reached then, training starts anyway: the
    creation is queued like every other call, and ``run_id`` stays None until
    it succeeds (``run_id`` given: it is known at once and the reattach is queued).

    ``local_dir`` (default: beside a SQLite store's file, else a new temp dir) holds the files
    that must outlive the call that logs them (``config.yaml``, images), the
    spill file and, after ``finish``, the file of unsent calls.
    """

    def __init__(
        self,
        tracking_uri: str | None,
        experiment: str,
        run_name: str | None = None,
        run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        local_dir: str | os.PathLike[str] | None = None,
        queue_size: int = 10000,
        request_timeout_s: int = 10,
        flush_timeout_s: float = 30.0,
    ) -> None:
        set_fail_fast_http(request_timeout_s)
        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.experiment = experiment
        self.run_name = run_name
        self.flush_timeout_s = flush_timeout_s
        self.local_dir = Path(local_dir) if local_dir is not None else default_local_dir(self.tracking_uri)
        self.local_dir.mkdir(parents=True, exist_ok=True)
        self._files_dir = self.local_dir / "mlflow-files"
        self._finished = False
        self._sent_event = threading.Condition()
        self._logged_params: dict[str, str] = {}
        self._attempt_tags: set[str] = set()  # attempt.<key> tags already on a reattached run
        self._dataset_inputs: set[tuple[str, str]] = set()  # (name, digest) of the run's dataset inputs
        self._tags = {key: redact(str(value)) for key, value in (tags or {}).items()}
        self.unsent_path: Path | None = None

        self._sender = Sender(self.tracking_uri, run_id, None)
        first_ops: list[dict[str, Any]] = []
        try:
            # sent at once, not queued, so run_id is known before training starts when the server answers
            if run_id is None:
                self._sender.send(self._create_op())
            else:
                # "experiment" makes the sender warn when the run lives in another experiment
                run = self._sender.send({"op": "reattach", "tags": self._tags, "experiment": experiment})
                self._logged_params = dict(run.data.params)
                self._attempt_tags = {key for key in run.data.tags if key.startswith("attempt.")}
                listed = run.inputs.dataset_inputs if run.inputs else []
                self._dataset_inputs = {(d.dataset.name, d.dataset.digest) for d in listed}
        except Exception as error:
            if run_id is not None and is_permanent(error):
                logger.warning(
                    "cannot reattach to MLflow run %s (%s); starting a new run", run_id, first_line(error)
                )
                self._sender.run_id = None
                self._tags["unetdist.previous_run_id"] = run_id
                first_ops.append(self._create_op())
                try:
                    self._sender.send(first_ops.pop())
                except Exception:
                    first_ops.append(self._create_op())
            else:
                logger.warning(
                    "MLflow server %s unreachable at start (%s); training starts anyway, the run's %s is queued",
                    redact(self.tracking_uri),
                    first_line(error),
                    "creation" if run_id is None else "reattachment",
                )
                first_ops.append(
                    self._create_op() if run_id is None else {"op": "reattach", "tags": self._tags}
                )
        spill_path = self.local_dir / f".mlflow-spill-{os.getpid()}-{id(self)}.jsonl"
        self._outbox = Outbox(self._sender, queue_size, spill_path, self._notify_sent)
        for op in first_ops:
            self._outbox.put(op)
        if self.run_id is not None:
            logger.info(
                "MLflow run %s (%s) in experiment %r at %s",
                self.run_id,
                run_name or "",
                experiment,
                redact(self.tracking_uri),
            )

    def _create_op(self) -> dict[str, Any]:
        return {
            "op": "create_run",
            "experiment": self.experiment,
            "run_name": self.run_name,
            "tags": self._tags,
        }

    @property
    def run_id(self) -> str | None:
        return self._sender.run_id

    @property
    def experiment_id(self) -> str | None:
        return self._sender.experiment_id

    @property
    def client(self) -> MlflowClient:
        return self._sender.client

    @property
    def pending(self) -> int:
        """Logging calls not yet on the server."""
        return self._outbox.pending()

    @property
    def stats(self) -> dict[str, float]:
        return {
            "sent": self._outbox.sent_ops,
            "dropped": self._outbox.dropped_ops,
            "failed_requests": self._outbox.failures,
            "pending": self._outbox.pending(),
        }

    def _notify_sent(self) -> None:
        with self._sent_event:
            self._sent_event.notify_all()

    def _put(self, op: dict[str, Any]) -> None:
        if self._finished:
            logger.debug("tracker finished; %s call ignored", op["op"])
            return
        self._outbox.put(op)

    # -- logging calls: each returns at once

    def log_params(self, params: Mapping[str, object], may_change: Collection[str] = ()) -> None:
        """Log (nested) params as flat strings; keys already on the run are skipped.

        MLflow refuses to change a param's value, so on a reattached run a key with a new
        value keeps its first value, with a warning; a key in ``may_change`` (a value a
        resumed job may change, such as ``checkpoint.resume``) gets no warning: this
        attempt's value goes to the tag ``attempt.<key>``. Values are logged redacted.
        """
        new_params: dict[str, str] = {}
        attempt_tags: dict[str, str] = {}
        for key, value in redact_params(flatten_config(params)).items():
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
            elif key in may_change:
                # the tag follows every attempt once one has differed, so it never shows a stale value
                if previous != value or f"attempt.{key}" in self._attempt_tags:
                    attempt_tags[f"attempt.{key}"] = value
            elif previous != value:
                logger.warning(
                    "param %s was already logged as %r; MLflow keeps that, not %r", key, previous, value
                )
        if new_params:
            self._put({"op": "params", "params": new_params})
        self._logged_params.update(new_params)
        if attempt_tags:
            self.set_tags(attempt_tags)
            self._attempt_tags.update(attempt_tags)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue all ``metrics`` at ``step``; they reach the server in one request with their neighbours.

        NaN is logged as NaN (MLflow 3.17 stores it, over SQLite and HTTP) so a
        diverging loss stays visible. The timestamp is the time of this call.
        """
        timestamp_ms = int(time.time() * 1000)
        points = []
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                logger.warning("metric %s=%r is not a number; not logged", key, value)
                continue
            if math.isnan(number):
                logger.debug("metric %s is NaN at step %d", key, step)
            points.append([key, number, timestamp_ms, int(step)])
        if points:
            self._put({"op": "metrics", "metrics": points})

    def set_tags(self, tags: Mapping[str, object]) -> None:
        """Set (overwrite) run tags; values are logged as strings, redacted."""
        self._put({"op": "tags", "tags": {key: redact(str(value)) for key, value in tags.items()}})

    def log_dataset_inputs(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Queue the run's data splits as MLflow dataset inputs (``tracking.datasets.dataset_record``).

        Splits the run already lists (same name and digest) are skipped; one whose digest
        changed is added beside the old one, with a warning.
        """
        new = new_records(self._dataset_inputs, records)
        if new:
            self._put({"op": "dataset_inputs", "datasets": new})
            self._dataset_inputs.update((record["name"], record["digest"]) for record in new)

    def log_config(self, config_dict: Mapping[str, Any], filename: str = "config.yaml") -> None:
        """Write ``config_dict`` (redacted) as YAML under ``local_dir``; log it at the run's artifact root."""
        self._files_dir.mkdir(parents=True, exist_ok=True)
        config_path = self._files_dir / filename
        config_path.write_text(yaml.safe_dump(redact_values(dict(config_dict)), sort_keys=False))
        self.log_artifact(config_path)

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Log a file, or a directory's contents, under ``artifact_path`` (default: the root).

        The file is read when the call is sent, so it must stay in place until then.
        """
        self._put({"op": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def log_image(self, png_path: str | os.PathLike[str], key: str, step: int) -> None:
        """Log an image file as step ``step`` of the image series ``key`` (the UI's image charts)."""
        timestamp_ms = int(time.time() * 1000)
        self._put(
            {
                "op": "image",
                "path": str(Path(png_path).resolve()),
                "key": key,
                "step": int(step),
                "timestamp": timestamp_ms,
            }
        )

    def log_pyfunc_model(self, op: Mapping[str, Any]) -> None:
        """Queue the logging of a saved pyfunc model (see ``unetdist.tracking.models.log_pyfunc_model``)."""
        self._put({"op": "pyfunc_model", **op})

    def log_model(
        self,
        model: torch.nn.Module,
        input_example: np.ndarray,
        name: str = "model",
        step: int = 0,
    ) -> Any:
        """Log ``model`` with MLflow's PyTorch flavor now, after the queue is sent; returns its ModelInfo.

        Synchronous (it needs the server); ``RunOutputs.log_final_model`` logs a
        pyfunc model through the queue instead.
        """
        # imported here: it pulls in torch and the inference code
        from unetdist.tracking.models import log_pytorch_model

        self.flush(self.flush_timeout_s)
        return log_pytorch_model(
            self.client,
            self.tracking_uri,
            self.experiment_id or "",
            self.run_id or "",
            dict(self._logged_params),
            model,
            input_example,
            name=name,
            step=step,
        )

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait up to ``timeout_s`` for the queue to empty; True when it did. Does not stop the sender."""
        deadline = time.monotonic() + timeout_s
        with self._sent_event:
            while self._outbox.pending():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._sent_event.wait(min(remaining, 0.2))
        return True

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with ``status`` and stop the sender; later calls do nothing.

        ``status`` FINISHED, FAILED or KILLED ends the MLflow run; RUNNING
        (``LEAVE_RUNNING``) only sends what is queued and leaves the run open,
        for a job that will be resumed. Waits at most ``flush_timeout_s`` for the
        server; what is still unsent is written to ``unsent_path`` with a
        warning naming the replay command. Never raises for a backend failure:
        it usually runs in a ``finally`` where an exception would hide the one
        that ended training.
        """
        if status not in (*RUN_END_STATUSES, LEAVE_RUNNING):
            raise ValueError(f"status must be one of {(*RUN_END_STATUSES, LEAVE_RUNNING)}, got {status!r}")
        if self._finished:
            return
        if status != LEAVE_RUNNING:
            self._outbox.put({"op": "terminate", "status": status, "end_time": int(time.time() * 1000)})
        self._finished = True
        unsent = self._outbox.close(self.flush_timeout_s)
        if unsent:
            self.unsent_path = write_unsent(self.local_dir, self._header(), unsent)
            logger.warning(
                "MLflow server %s did not take %d logging calls within %.0f s; they are in %s. "
                "Send them when it is back: python -m unetdist.tracking replay %s",
                redact(self.tracking_uri),
                len(unsent),
                self.flush_timeout_s,
                self.unsent_path,
                self.unsent_path,
            )

    def _header(self) -> dict[str, Any]:
        return {
            "format": OUTBOX_FORMAT,
            "tracking_uri": redact(self.tracking_uri),
            "run_id": self.run_id,
            "experiment_id": self.experiment_id,
            "experiment": self.experiment,
            "run_name": self.run_name,
        }

    def replay_leftovers(self, directory: str | os.PathLike[str]) -> int:
        """Queue the calls of earlier ``mlflow-unsent-*`` files of this run in ``directory``; returns how many.

        Each file is renamed to ``*.queued`` so it is not queued twice.
        """
        count = 0
        for path in sorted(Path(directory).glob("mlflow-unsent-*.jsonl")):
            try:
                header, ops = read_unsent(path)
            except (OSError, ValueError) as error:
                logger.warning("cannot read %s: %s", path, error)
                continue
            if header.get("run_id") != self.run_id:
                continue
            ops = [op for op in ops if op["op"] not in ("create_run", "reattach", "terminate")]
            for op in ops:
                self._put(op)
            path.rename(path.with_suffix(".jsonl.queued"))
            logger.info("queued %d calls left unsent by an earlier job (%s)", len(ops), path)
            count += len(ops)
        return count

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
    **options: Any,
) -> MLflowTracker | NullTracker:
    """An ``MLflowTracker`` on the main process when tracking is enabled, else a ``NullTracker``.

    ``tracking_uri`` None or "" means ``default_tracking_uri()``; ``options`` go to ``MLflowTracker``.
    """
    if not (enabled and is_main_process):
        return NullTracker()
    return MLflowTracker(
        tracking_uri=tracking_uri or default_tracking_uri(),
        experiment=experiment,
        run_name=run_name,
        run_id=run_id,
        tags=tags,
        **options,
    )
