"""Shared test fixtures, grouped by the service they provide.

Real services only, no mocks: MLflow tests talk to a SQLite store in a temp
dir (fast) or to a real ``mlflow server`` process (``tests/services``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

# tests/ has no __init__.py, so pytest puts tests/ itself on sys.path (rootdir-relative
# "prepend" import mode): its helpers import as `services.*`.
from services.mlflow_server import MlflowServer

REPO_ROOT = Path(__file__).resolve().parents[1]


# --- MLflow -------------------------------------------------------------------


@pytest.fixture
def local_mlflow_store(tmp_path: Path) -> str:
    """Tracking URI of a fresh SQLite store in a temp dir (artifacts land beside it)."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URI ``http://127.0.0.1:PORT`` of a real MLflow server shared by the session.

    Start-up takes ~10-15 s, hence one per session. ``MLFLOW_TRACKING_URI`` is
    deliberately not set: tests pass the URI explicitly (or monkeypatch it),
    so tests of the default store stay independent of whether this ran.
    """
    with MlflowServer(tmp_path_factory.mktemp("mlflow-server")) as uri:
        yield uri
