"""A real S3-compatible server (moto) on 127.0.0.1 for tests, with latency and faults injectable.

The project carries this itself so that a plain clone can run its tests; it follows the
team's tested shell helpers (shared/services/s3-up.sh, s3-down.sh) and runs the project's
copy of their server script, ``tests/services/s3_faults.py``: moto's S3 app behind a WSGI
middleware that reads ``STATE_DIR/faults.json`` on every request and logs every request to
``STATE_DIR/requests.log``.

- the server runs in its own session (process group), which ``stop`` signals as a whole;
- buckets live in the server's memory: a restart starts empty and without faults;
- start-up takes ~1 s (importing moto), so start one server per test session;
- werkzeug answers every request with ``Connection: close``: no keep-alive, each request
  is a new TCP connection (a 64 KiB ranged GET costs ~3-8 ms).

Usage::

    with S3Server(tmp_dir) as s3:
        os.environ.update(s3.env)  # AWS_ENDPOINT_URL, dummy keys, region, AWS_ALLOW_HTTP ...
        s3.create_bucket("tiles")
        s3.set_faults(fail_next=2, only_get=True)  # the next two GETs get 503 SlowDown
        ...
        assert [row[3] for row in s3.requests()] == ["503", "503", "206"]
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from services.processes import LoggedServer, free_port, stop_group

SERVER_SCRIPT = Path(__file__).resolve().with_name("s3_faults.py")
# a lost race for a "free" port: werkzeug's make_server prints this and exits 1 (s3_faults.py's own
# exit code 4 for EADDRINUSE is never reached with werkzeug 3.1)
_PORT_IN_USE_MARK = "is in use by another program"
_PORT_TRIES = 3


class S3ServerError(RuntimeError):
    """The server did not come up; the message holds the tail of its log."""


class S3Server(LoggedServer):
    """moto's S3 behind ``s3_faults.py`` with its state (faults, request log, server log) in ``state_dir``."""

    error = S3ServerError

    def __init__(self, state_dir: str | os.PathLike[str], port: int | None = None) -> None:
        self.state_dir = Path(state_dir).resolve()  # s3_faults.py reports its realpath
        self.port = port
        self.log_path = self.state_dir / "s3.log"
        self.faults_path = self.state_dir / "faults.json"
        self.requests_path = self.state_dir / "requests.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise RuntimeError("server not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """What S3 clients (boto3, obstore, s3fs) read to reach this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ALLOW_HTTP": "true",  # obstore refuses http:// without it
            "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata lookups
            "S3_FAULTS_FILE": str(self.faults_path),
            "S3_REQUESTS_LOG": str(self.requests_path),
        }

    def start(self, timeout_s: float = 30.0) -> S3Server:
        """Start the server and wait for ``GET /_s3_faults/health``. A no-op while it runs."""
        if self._process is not None and self._process.poll() is None:
            return self
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "tmp").mkdir(exist_ok=True)
        fixed_port = self.port is not None
        for _ in range(1 if fixed_port else _PORT_TRIES):
            if not fixed_port:
                self.port = free_port()
            if self._start_once(timeout_s):
                return self
        self._fail(f"S3 server could not listen on 127.0.0.1:{self.port}: port in use")

    def _start_once(self, timeout_s: float) -> bool:
        """True once up; False when the port was taken meanwhile (worth another port)."""
        assert self.port is not None
        command = [sys.executable, str(SERVER_SCRIPT), "serve", "--state-dir", str(self.state_dir),
                   "--port", str(self.port)]  # fmt: skip
        # TMPDIR: moto spools big objects there (the script sets it too)
        env = {**os.environ, "TMPDIR": str(self.state_dir / "tmp"), "PYTHONUNBUFFERED": "1"}
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._process = self._spawn(command, env, self.state_dir)
        deadline = time.monotonic() + timeout_s
        while not self._health_ok():
            code = self._process.poll()
            if code is not None and self._port_was_taken(log_start):
                self._process = None
                return False
            if code is not None:
                self._fail(f"S3 server exited with {code} during start-up")
            if time.monotonic() > deadline:
                self._fail(f"S3 server did not answer {self.endpoint}/_s3_faults/health in {timeout_s:.0f} s")
            time.sleep(0.05)
        return True

    def _port_was_taken(self, log_start: int) -> bool:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(log_start)
                return _PORT_IN_USE_MARK in log.read().decode(errors="replace")
        except OSError:
            return False

    def _health_ok(self) -> bool:
        """The health endpoint answers, and it is this state dir's server (not another on the port)."""
        # never through a proxy: CI machines may set http_proxy without no_proxy for 127.0.0.1
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"{self.endpoint}/_s3_faults/health", timeout=2) as response:
                return response.status == 200 and json.load(response).get("state_dir") == str(self.state_dir)
        except (OSError, ValueError):
            return False

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the server's process group, SIGKILL it after ``timeout_s``. Idempotent."""
        process, self._process = self._process, None
        if process is None:
            return
        stop_group(process, timeout_s, poll_s=0.05)

    # --- faults and the request log --------------------------------------------------------------

    def set_faults(self, **faults: Any) -> dict[str, Any]:
        """Merge faults into faults.json (``fail_next=2, only_get=True``, ``latency_ms=20``, ...);
        no arguments: clear all. Returns what the file now holds.

        Keys (see s3_faults.py): latency_ms, jitter_ms, fail_next, fail_status, fail_code,
        fail_rate, truncate_next, drop_next, only_get, methods, path_contains. The server
        re-reads the file on every request and counts its counters down under the same flock.
        """
        path = str(self.faults_path)
        with open(self.state_dir / ".faults.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the server takes its counters under this lock
            config: dict[str, Any] = {}
            if faults:
                try:
                    with open(path) as f:
                        config = json.load(f)
                except FileNotFoundError:
                    pass
            config.update(faults)
            with open(path + ".tmp", "w") as f:
                json.dump(config, f)
            os.replace(path + ".tmp", path)  # never half a file for the server
        return config

    def faults(self) -> dict[str, Any]:
        """faults.json as it is now (counters already taken are gone from it)."""
        try:
            with open(self.faults_path) as f:
                return json.load(f)
        except FileNotFoundError:
            return {}

    def requests(self, method: str | None = "GET") -> list[tuple[str, ...]]:
        """Logged requests as ``(method, path?query, range, status, bytes, ms, fault)``, all strings
        ("-" for no range or no fault, status "0" for a dropped connection); ``method=None``: all.

        A request's line is written before its response's last byte: once a client has a response,
        its line is here.
        """
        try:
            with open(self.requests_path) as f:
                rows = [tuple(line.rstrip("\n").split("\t")[1:]) for line in f]
        except FileNotFoundError:
            return []
        return [row for row in rows if method is None or row[0] == method]

    def clear_requests(self) -> None:
        open(self.requests_path, "w").close()

    def create_bucket(self, name: str) -> None:
        """Create bucket ``name`` (one signed PUT, no retries); creating it again succeeds (us-east-1)."""
        import boto3  # lazily: conftest imports this module in every test session
        from botocore.config import Config

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
            config=Config(retries={"total_max_attempts": 1}),
        )
        client.create_bucket(Bucket=name)

    def __enter__(self) -> S3Server:
        return self.start()

