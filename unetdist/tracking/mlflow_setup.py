"""Where runs go: MLflow's environment, URI defaults, the flat form of params.

Credentials belong in the environment (``MLFLOW_TRACKING_USERNAME``,
``MLFLOW_TRACKING_PASSWORD``, ``MLFLOW_TRACKING_TOKEN``), which MLflow reads itself. A URI
given with credentials in it still works, but is written and logged only as
``unetdist.redaction.redact`` shows it, like every URL and secret-named param.

Without ``MLFLOW_TRACKING_URI`` runs go to a SQLite store in the working directory; to
browse them, run in that directory::

    mlflow ui --backend-store-uri sqlite:///mlflow.db

and open http://127.0.0.1:5000.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _set_quiet_mlflow_defaults() -> None:
    # Training machines have no internet: telemetry would only time out.
    # MLflow >= 3.x reads MLFLOW_DISABLE_TELEMETRY on every tracked call.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # MlflowClient.set_terminated writes "🏃 View run ..." to stdout for HTTP
    # stores; we log the run's address through logging instead.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def set_fail_fast_http(request_timeout_s: int) -> None:
    # MLflow's REST client retries a refused connection 7 times with backoff
    # (minutes) and waits 120 s for an answer; our sender retries by itself, so
    # each request should fail fast. MLflow reads these per request; a user's
    # own settings win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(request_timeout_s))


# at import, so the defaults hold before any tracking module makes its first MLflow call
_set_quiet_mlflow_defaults()


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite store ``./mlflow.db`` (absolute path).

    Artifacts of experiments this package creates in a SQLite store go to
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


def sqlite_artifact_root(tracking_uri: str) -> Path | None:
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


def experiment_directory_name(experiment: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"


def default_local_dir(tracking_uri: str) -> Path:
    artifact_root = sqlite_artifact_root(tracking_uri)
    if artifact_root is not None:
        return artifact_root.parent / "mlflow-local"
    return Path(tempfile.mkdtemp(prefix="unetdist-mlflow-"))
