"""Experiment tracking: MLflow on the main process, a null object everywhere else.

The training loop calls the same methods on every rank; ``make_tracker`` hands
non-main ranks a ``NullTracker`` whose methods do nothing, so the loop never
branches on the rank.

``MLflowTracker`` never lets the tracking server slow or stop training. Every
logging call only appends to an in-memory queue (microseconds); a background
thread sends the queue in order, merging consecutive metric calls into one
``log_batch``. While the server is down, slow or answering errors, the thread
retries with exponential backoff (0.5 s doubling to 30 s) and the calls wait in
the queue; past ``queue_size`` calls they are appended to a spill file on local
disk, so memory stays bounded and nothing is lost. When the server returns,
everything is sent in the original order. ``finish`` waits at most
``flush_timeout_s`` for the rest; whatever is still unsent is written to
``<local_dir>/mlflow-unsent-<run>-<time>.jsonl`` with a warning, and::

    python -m unetdist.tracking replay runs/x/mlflow-unsent-....jsonl [--tracking-uri URI]

sends it later (a resumed run also replays such files of its run by itself).
A request the server refuses for good (HTTP 4xx: a bad value, a deleted run)
is dropped with a warning instead of blocking the queue.

``MLflowTracker`` talks to MLflow only through an ``MlflowClient`` bound to its
own tracking URI, never through MLflow's global "active run", so two trackers
in one process (tests, sweeps) do not leak into each other.

Credentials come only from the environment (``MLFLOW_TRACKING_USERNAME``,
``MLFLOW_TRACKING_PASSWORD``, ``MLFLOW_TRACKING_TOKEN``), which MLflow reads
itself; nothing here accepts them, params whose key looks like a secret are
redacted before they are logged, and URIs are logged and written without
their user:password part.

Without ``MLFLOW_TRACKING_URI`` runs go to a SQLite store in the working
directory; to browse them, run in that directory::

    mlflow ui --backend-store-uri sqlite:///mlflow.db

and open http://127.0.0.1:5000.

``mlflow`` is imported lazily: it takes seconds to import, and ranks that only
ever hold a ``NullTracker`` should not pay for it.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import os
import re
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
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
LEAVE_RUNNING = "RUNNING"  # finish("RUNNING"): flush and stop sending, the run stays open (preemption)
OUTBOX_FORMAT = "unetdist-mlflow-outbox/1"
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
REDACTED = "***"
_SECRET_KEY = re.compile(r"password|passwd|secret|token|api[_-]?key|credential", re.IGNORECASE)


def _set_quiet_mlflow_defaults() -> None:
    # Training machines have no internet: telemetry would only time out.
    # MLflow >= 3.x reads MLFLOW_DISABLE_TELEMETRY on every tracked call.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # MlflowClient.set_terminated writes "🏃 View run ..." to stdout for HTTP
    # stores; we log the run's address through logging instead.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def _set_fail_fast_http(request_timeout_s: int) -> None:
    # MLflow's REST client retries a refused connection 7 times with backoff
    # (minutes) and waits 120 s for an answer; our sender retries by itself, so
    # each request should fail fast. MLflow reads these per request; a user's
    # own settings win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(request_timeout_s))


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


def _default_local_dir(tracking_uri: str) -> Path:
    artifact_root = _sqlite_artifact_root(tracking_uri)
    if artifact_root is not None:
        return artifact_root.parent / "mlflow-local"
    return Path(tempfile.mkdtemp(prefix="unetdist-mlflow-"))


def _is_permanent(error: BaseException) -> bool:
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


# ---------------------------------------------------------------- sending


class _Sender:
    """Turns queued operations (plain JSON-able dicts) into MLflow client calls, synchronously.

    The same code sends from the background thread and from ``replay``. Operations:
    ``create_run``, ``reattach``, ``params``, ``metrics``, ``tags``, ``artifact``,
    ``image``, ``pyfunc_model``, ``terminate``.
    """

    def __init__(self, tracking_uri: str, run_id: str | None, experiment_id: str | None) -> None:
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.client: MlflowClient = MlflowClient(tracking_uri=tracking_uri)
        self.run_id = run_id
        self.experiment_id = experiment_id

    def send(self, op: dict[str, Any]) -> None:
        kind = op["op"]
        if kind == "create_run":
            self.create_run(op["experiment"], op.get("run_name"), op.get("tags") or {})
            return
        if self.run_id is None:
            raise RuntimeError("no MLflow run yet: the run's creation has not reached the server")
        if kind == "reattach":
            self.reattach(op.get("tags") or {})
        elif kind == "params":
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
            from unetdist.pyfunc_model import log_pyfunc_model

            log_pyfunc_model(self.client, self.tracking_uri, self.experiment_id or "", self.run_id, op)
        elif kind == "terminate":
            self.client.set_terminated(self.run_id, status=op["status"], end_time=op.get("end_time"))
        else:
            raise ValueError(f"unknown tracking operation {kind!r}")

    def create_run(self, experiment: str, run_name: str | None, tags: Mapping[str, str]) -> None:
        self.experiment_id = self._get_or_create_experiment(experiment)
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags))
        self.run_id = run.info.run_id

    def reattach(self, tags: Mapping[str, str]) -> Any:
        from mlflow.entities import RunTag

        run = self.client.get_run(self.run_id)
        self.experiment_id = run.info.experiment_id
        if run.info.status != "RUNNING":
            self.client.update_run(self.run_id, status="RUNNING")
        if tags:
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        return run

    def _get_or_create_experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        existing = self.client.get_experiment_by_name(name)
        if existing is not None:
            if existing.lifecycle_stage == "deleted":
                # a deleted name stays taken until garbage-collected; reviving is what a user expects
                self.client.restore_experiment(existing.experiment_id)
            return existing.experiment_id
        artifact_root = _sqlite_artifact_root(self.tracking_uri)
        artifact_location = (
            str(artifact_root / _experiment_directory_name(name)) if artifact_root is not None else None
        )
        try:
            return self.client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:
            # another process created it between our lookup and create
            existing = self.client.get_experiment_by_name(name)
            if existing is None:
                raise
            return existing.experiment_id


def _merge_metric_ops(ops: list[dict[str, Any]]) -> tuple[dict[str, Any], int]:
    """The leading run of ``metrics`` operations as one (at most MAX_METRICS_PER_BATCH points); returns (op, count)."""
    points: list[list[Any]] = []
    count = 0
    for op in ops:
        if op["op"] != "metrics" or (points and len(points) + len(op["metrics"]) > MAX_METRICS_PER_BATCH):
            break
        points.extend(op["metrics"])
        count += 1
    return {"op": "metrics", "metrics": points}, count


class _Outbox:
    """A bounded in-memory queue with a disk spill, drained in order by one background thread.

    ``put`` never blocks on the network: it appends to the queue or, once
    ``capacity`` operations wait (or earlier ones are already on disk, to keep
    the order), writes a JSON line to ``spill_path``.
    """

    def __init__(self, sender: _Sender, capacity: int, spill_path: Path, on_sent: Callable[[], None]) -> None:
        self.sender = sender
        self.capacity = capacity
        self.spill_path = spill_path
        self._on_sent = on_sent
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._closing = threading.Event()
        self._abandon = threading.Event()
        self._spilled = 0  # operations in the spill file not yet read back
        self._spill_offset = 0
        self.sent_ops = 0
        self.dropped_ops = 0
        self.failures = 0
        self.server_down_since: float | None = None
        self._thread = threading.Thread(target=self._run, name="unetdist-mlflow-sender", daemon=True)
        self._thread.start()

    # -- producer side (the training thread)

    def put(self, op: dict[str, Any]) -> None:
        with self._lock:
            if self._spilled or len(self._queue) >= self.capacity:
                if not self._spilled:
                    logger.warning(
                        "MLflow queue full (%d calls; server unreachable since %s); spilling to %s",
                        self.capacity,
                        time.strftime("%H:%M:%S", time.localtime(self.server_down_since or time.time())),
                        self.spill_path,
                    )
                with open(self.spill_path, "a") as spill:
                    spill.write(json.dumps(op) + "\n")
                self._spilled += 1
            else:
                self._queue.append(op)
        self._wakeup.set()

    def pending(self) -> int:
        with self._lock:
            return len(self._queue) + self._spilled

    # -- the background thread

    def _run(self) -> None:
        backoff_s = BACKOFF_FIRST_S
        while not self._abandon.is_set():
            with self._lock:
                if not self._queue and self._spilled:
                    self._read_back_spill()
                head = list(self._queue)[:MAX_METRICS_PER_BATCH] if self._queue else []
            if not head:
                if self._closing.is_set():
                    return
                self._wakeup.wait(1.0)
                self._wakeup.clear()
                continue
            if head[0]["op"] == "metrics":
                request, count = _merge_metric_ops(head)
            else:
                request, count = head[0], 1
            try:
                self.sender.send(request)
            except Exception as error:
                if _is_permanent(error):
                    logger.warning("MLflow refused a %s call; dropped it: %s", request["op"], error)
                    self.dropped_ops += count
                else:
                    self.failures += 1
                    if self.server_down_since is None:
                        self.server_down_since = time.time()
                        logger.warning(
                            "MLflow server unreachable (%s); training goes on, logging is queued and retried",
                            _first_line(error),
                        )
                    # while closing, retry quickly until finish's deadline
                    self._abandon.wait(min(backoff_s, 1.0) if self._closing.is_set() else backoff_s)
                    backoff_s = min(backoff_s * 2, BACKOFF_MAX_S)
                    continue
            else:
                self.sent_ops += count
                if self.server_down_since is not None:
                    logger.warning(
                        "MLflow server back after %.0f s; sending %d queued calls",
                        time.time() - self.server_down_since,
                        self.pending(),
                    )
                    self.server_down_since = None
                backoff_s = BACKOFF_FIRST_S
                self._on_sent()
            with self._lock:
                if self._abandon.is_set():
                    return  # unsent_ops() already took a snapshot that includes these
                for _ in range(count):
                    self._queue.popleft()

    def _read_back_spill(self) -> None:
        # called with the lock held, when the in-memory queue is empty
        with open(self.spill_path) as spill:
            spill.seek(self._spill_offset)
            while len(self._queue) < self.capacity and self._spilled:
                line = spill.readline()
                if not line:
                    break
                self._queue.append(json.loads(line))
                self._spilled -= 1
            self._spill_offset = spill.tell()
        if not self._spilled:
            self.spill_path.unlink(missing_ok=True)
            self._spill_offset = 0

    # -- shutdown

    def close(self, timeout_s: float) -> list[dict[str, Any]]:
        """Send what is left within ``timeout_s``; returns the operations still unsent (in order)."""
        self._closing.set()
        self._wakeup.set()
        self._thread.join(timeout=max(timeout_s, 0.0))
        self._abandon.set()
        with self._lock:
            unsent = list(self._queue)
            if self._spilled:
                with open(self.spill_path) as spill:
                    spill.seek(self._spill_offset)
                    unsent.extend(json.loads(line) for line in spill if line.strip())
            self._queue.clear()
            self._spilled = 0
        self.spill_path.unlink(missing_ok=True)
        return unsent


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


# ---------------------------------------------------------------- trackers


class NullTracker:
    """The tracker of non-main ranks and of runs with tracking off: every method does nothing."""

    run_id: str | None = None
    experiment_id: str | None = None
    tracking_uri: str | None = None

    def log_params(self, params: Mapping[str, object]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: Mapping[str, object]) -> None:
        pass

    def log_config(self, config_dict: Mapping[str, Any], filename: str = "config.yaml") -> None:
        pass

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        pass

    def log_image(self, png_path: str | os.PathLike[str], key: str, step: int) -> None:
        pass

    def log_pyfunc_model(self, op: Mapping[str, Any]) -> None:
        pass

    def log_model(
        self,
        model: torch.nn.Module,
        input_example: np.ndarray,
        name: str = "model",
        step: int = 0,
    ) -> None:
        pass

    def flush(self, timeout_s: float = 10.0) -> bool:
        return True

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
        _set_fail_fast_http(request_timeout_s)
        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.experiment = experiment
        self.run_name = run_name
        self.flush_timeout_s = flush_timeout_s
        self.local_dir = Path(local_dir) if local_dir is not None else _default_local_dir(self.tracking_uri)
        self.local_dir.mkdir(parents=True, exist_ok=True)
        self._files_dir = self.local_dir / "mlflow-files"
        self._finished = False
        self._sent_event = threading.Condition()
        self._logged_params: dict[str, str] = {}
        self._tags = dict(tags or {})
        self.unsent_path: Path | None = None

        self._sender = _Sender(self.tracking_uri, run_id, None)
        first_ops: list[dict[str, Any]] = []
        try:
            if run_id is None:
                self._sender.create_run(experiment, run_name, self._tags)
            else:
                run = self._reattach_now(run_id, experiment)
                self._logged_params = dict(run.data.params)
        except Exception as error:
            if run_id is not None and _is_permanent(error):
                logger.warning("cannot reattach to MLflow run %s (%s); starting a new run", run_id, error)
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
                    _uri_without_credentials(self.tracking_uri),
                    _first_line(error),
                    "creation" if run_id is None else "reattachment",
                )
                first_ops.append(
                    self._create_op() if run_id is None else {"op": "reattach", "tags": self._tags}
                )
        spill_path = self.local_dir / f".mlflow-spill-{os.getpid()}-{id(self)}.jsonl"
        self._outbox = _Outbox(self._sender, queue_size, spill_path, self._notify_sent)
        for op in first_ops:
            self._outbox.put(op)
        if self.run_id is not None:
            logger.info(
                "MLflow run %s (%s) in experiment %r at %s",
                self.run_id,
                run_name or "",
                experiment,
                _uri_without_credentials(self.tracking_uri),
            )

    def _create_op(self) -> dict[str, Any]:
        return {
            "op": "create_run",
            "experiment": self.experiment,
            "run_name": self.run_name,
            "tags": self._tags,
        }

    def _reattach_now(self, run_id: str, experiment: str) -> Any:
        run = self._sender.reattach(self._tags)
        run_experiment = self._sender.client.get_experiment(run.info.experiment_id)
        if run_experiment.name != experiment:
            logger.warning(
                "run %s belongs to experiment %r, not %r; logging to the run's experiment",
                run_id,
                run_experiment.name,
                experiment,
            )
        return run

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

    def log_params(self, params: Mapping[str, object]) -> None:
        """Log (nested) params as flat strings; keys already on the run are skipped.

        MLflow refuses to change a param's value, so on a reattached run a key
        with a new value keeps its first value (with a warning).
        """
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
        if new_params:
            self._put({"op": "params", "params": new_params})
        self._logged_params.update(new_params)

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
        self._put({"op": "tags", "tags": {key: str(value) for key, value in tags.items()}})

    def log_config(self, config_dict: Mapping[str, Any], filename: str = "config.yaml") -> None:
        """Write ``config_dict`` as YAML under ``local_dir`` and log it at the run's artifact root."""
        self._files_dir.mkdir(parents=True, exist_ok=True)
        config_path = self._files_dir / filename
        config_path.write_text(yaml.safe_dump(dict(config_dict), sort_keys=False))
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
        """Queue the logging of a saved pyfunc model (see ``unetdist.pyfunc_model.log_pyfunc_model``)."""
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
        from unetdist.pyfunc_model import log_pytorch_model

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
                _uri_without_credentials(self.tracking_uri),
                len(unsent),
                self.flush_timeout_s,
                self.unsent_path,
                self.unsent_path,
            )

    def _header(self) -> dict[str, Any]:
        return {
            "format": OUTBOX_FORMAT,
            "tracking_uri": _uri_without_credentials(self.tracking_uri),
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


# ---------------------------------------------------------------- unsent calls: file and replay


def write_unsent(directory: Path, header: Mapping[str, Any], ops: list[dict[str, Any]]) -> Path:
    """Write ``header`` and ``ops`` as JSON lines to a new ``mlflow-unsent-<run>-<time>.jsonl``."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = directory / f"mlflow-unsent-{header.get('run_id') or 'new-run'}-{stamp}-{os.getpid()}.jsonl"
    with open(path, "w") as out:
        out.write(json.dumps(dict(header)) + "\n")
        for op in ops:
            out.write(json.dumps(op) + "\n")
    return path


def read_unsent(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path} is empty")
    header = json.loads(lines[0])
    if header.get("format") != OUTBOX_FORMAT:
        raise ValueError(f"{path}: not a file of unsent MLflow calls (format {header.get('format')!r})")
    return header, [json.loads(line) for line in lines[1:]]


def replay(path: str | os.PathLike[str], tracking_uri: str | None = None) -> str:
    """Send the calls in a file written by ``MLflowTracker.finish``; returns the run id.

    ``tracking_uri``: default the file's (credentials come from the environment).
    Stops at the first failure, naming the call; sending the file again is safe
    (metrics and tags are idempotent; an artifact is written again).
    """
    header, ops = read_unsent(path)
    uri = tracking_uri or header["tracking_uri"]
    sender = _Sender(uri, header.get("run_id"), header.get("experiment_id"))
    index = 0
    while index < len(ops):
        request, count = _merge_metric_ops(ops[index:]) if ops[index]["op"] == "metrics" else (ops[index], 1)
        try:
            sender.send(request)
        except Exception as error:
            raise RuntimeError(
                f"{path}: call {index + 1} of {len(ops)} ({request['op']}) failed: {error}"
            ) from error
        index += count
    return sender.run_id or ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unetdist.tracking", description="MLflow tracking tools")
    commands = parser.add_subparsers(dest="command", required=True)
    replay_parser = commands.add_parser("replay", help="send the logging calls a run could not deliver")
    replay_parser.add_argument("files", nargs="+", metavar="FILE", help="mlflow-unsent-*.jsonl")
    replay_parser.add_argument("--tracking-uri", help="default: the URI written in the file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    failed = 0
    for file in args.files:
        try:
            run_id = replay(file, args.tracking_uri)
        except (OSError, ValueError, RuntimeError) as error:
            print(f"replay failed: {error}", file=sys.stderr)
            failed += 1
            continue
        done = Path(file).with_suffix(".jsonl.replayed")
        Path(file).rename(done)
        print(f"{file}: sent to run {run_id}; renamed to {done.name}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
