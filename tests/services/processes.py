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
