"""What the services' Python wrappers share: free ports, and stopping a server's process group.

Each server (``mlflow_server``, ``s3_server``) runs in its own session, so its pid is its process
group's id and stopping the group stops every worker it started.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import NoReturn

LOG_TAIL_LINES = 40


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def group_alive(group_id: int) -> bool:
    try:
        os.killpg(group_id, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(process: subprocess.Popen, timeout_s: float, poll_s: float = 0.1) -> None:
    """SIGTERM the process group that ``process`` leads, SIGKILL it after ``timeout_s``; reap it."""
    group_id = process.pid  # start_new_session made the server a group leader: its pid is the group id
    try:
        os.killpg(group_id, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout_s
    while True:
        process.poll()  # reap the leader: a zombie still counts as a group member
        if not group_alive(group_id):
            break
        if time.monotonic() > deadline:
            # a worker may ignore SIGTERM while the leader is already gone
            try:
                os.killpg(group_id, signal.SIGKILL)
            except ProcessLookupError:
                pass
            break
        time.sleep(poll_s)
    process.wait()


class LoggedServer:
    """What a server wrapper with one log file shares: its tail in failures, and ``with`` stopping it.
    Subclasses set ``log_path`` and ``error`` (the exception type) and implement ``start``/``stop``."""

    log_path: Path
    error: type[Exception] = RuntimeError

    def stop(self, timeout_s: float = 10.0) -> None:
        raise NotImplementedError

    def _spawn(self, command: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
        """Start the server in its own session, stdin closed, output appended to ``log_path``."""
        with open(self.log_path, "ab") as log:
            return subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _fail(self, message: str) -> NoReturn:
        tail = self.log_tail()
        self.stop(timeout_s=5.0)
        raise self.error(f"{message}; log {self.log_path}:\n{tail}")

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
