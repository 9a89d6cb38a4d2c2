"""A real MLflow tracking server on 127.0.0.1 for tests, started and stopped from Python.

The project carries this itself so that a plain clone can run its tests; it
follows the team's tested shell helpers (shared/services/mlflow-up.sh):

- the server and its uvicorn worker run in their own session (process group),
  which ``stop`` signals as a whole, so no worker outlives the test session;
- only ``http://127.0.0.1:PORT`` works as the URI: mlflow 3.x answers 403 to
  API calls whose Host header is not localhost/127.0.0.1/a private IP, while
  ``/health`` answers 200 whatever the Host;
- start-up takes ~15 s on a fresh database (schema migrations), so start one
  server per test session.

Usage::

    with MlflowServer(tmp_dir) as uri:
        MlflowClient(uri).search_experiments()
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from services.processes import LoggedServer, free_port, stop_group

__all__ = ["MlflowServer", "MlflowServerError", "free_port"]



def _health_ok(port: int) -> bool:
    # never through a proxy: CI machines may set http_proxy without no_proxy for 127.0.0.1
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


class MlflowServerError(RuntimeError):
    """The server did not come up; the message holds the tail of its log."""


class MlflowServer(LoggedServer):
    """``mlflow server`` with a SQLite store and proxied artifacts under ``state_dir``."""

    error = MlflowServerError

    def __init__(self, state_dir: str | os.PathLike[str], port: int | None = None) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.port = port
        self.log_path = self.state_dir / "mlflow.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        if self.port is None:
            raise RuntimeError("server not started")
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 90.0) -> str:
        """Start the server and wait for ``GET /health``; returns the tracking URI."""
        if self._process is not None and self._process.poll() is None:
            return self.uri
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "artifacts").mkdir(exist_ok=True)
        if self.port is None:
            self.port = free_port()
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.state_dir}/mlflow.db",
            "--artifacts-destination", str(self.state_dir / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        env = {
            **os.environ,
            # job execution spawns extra workers the tests do not need
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
        }
        self._process = self._spawn(command, env, self.state_dir)
        deadline = time.monotonic() + timeout_s
        while not _health_ok(self.port):
            if self._process.poll() is not None:
                self._fail(f"mlflow server exited with {self._process.returncode} during start-up")
            if time.monotonic() > deadline:
                self._fail(f"mlflow server did not answer {self.uri}/health within {timeout_s:.0f} s")
            time.sleep(0.3)
        if self._process.poll() is not None:
            # something else answered on the port (a lost race for a "free" port)
            self._fail(f"mlflow server exited with {self._process.returncode}; port {self.port} is taken")
        return self.uri

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the server's process group, SIGKILL it after ``timeout_s``. Idempotent."""
        process, self._process = self._process, None
        if process is None:
            return
        stop_group(process, timeout_s)

    def __enter__(self) -> str:
        return self.start()

