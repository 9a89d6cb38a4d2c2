"""The queue between the training thread and the server, and the file of calls it could not send.

``put`` only appends to an in-memory queue (microseconds); a background thread sends the
queue in order, merging consecutive metric calls into one ``log_batch``. While the server
is down, slow or answering errors, the thread retries with exponential backoff (0.5 s
doubling to 30 s) and the calls wait in the queue; past ``capacity`` calls they are
appended to a spill file on local disk, so memory stays bounded and nothing is lost. A
request the server refuses for good (HTTP 4xx: a bad value, a deleted run) is dropped
with a warning instead of blocking the queue.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from unetdist.redaction import redact, redact_values
from unetdist.tracking.base import MAX_METRICS_PER_BATCH
from unetdist.tracking.sender import Sender, first_line, is_permanent

logger = logging.getLogger(__name__)

OUTBOX_FORMAT = "unetdist-mlflow-outbox/1"
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0


def merge_metric_ops(ops: list[dict[str, Any]]) -> tuple[dict[str, Any], int]:
    """The leading run of ``metrics`` operations as one (at most MAX_METRICS_PER_BATCH points); returns (op, count)."""
    points: list[list[Any]] = []
    count = 0
    for op in ops:
        if op["op"] != "metrics" or (points and len(points) + len(op["metrics"]) > MAX_METRICS_PER_BATCH):
            break
        points.extend(op["metrics"])
        count += 1
    return {"op": "metrics", "metrics": points}, count


class Outbox:
    """A bounded in-memory queue with a disk spill, drained in order by one background thread.

    ``put`` never blocks on the network: it appends to the queue or, once
    ``capacity`` operations wait (or earlier ones are already on disk, to keep
    the order), writes a JSON line to ``spill_path``.
    """

    def __init__(self, sender: Sender, capacity: int, spill_path: Path, on_sent: Callable[[], None]) -> None:
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
                request, count = merge_metric_ops(head)
            else:
                request, count = head[0], 1
            try:
                self.sender.send(request)
            except Exception as error:
                if is_permanent(error):
                    logger.warning(
                        "MLflow refused a %s call; dropped it: %s", request["op"], redact(str(error))
                    )
                    self.dropped_ops += count
                else:
                    self.failures += 1
                    if self.server_down_since is None:
                        self.server_down_since = time.time()
                        logger.warning(
                            "MLflow server unreachable (%s); training goes on, logging is queued and retried",
                            first_line(error),
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


# ---------------------------------------------------------------- unsent calls: the file


def write_unsent(directory: Path, header: Mapping[str, Any], ops: list[dict[str, Any]]) -> Path:
    """Write ``header`` and ``ops`` as JSON lines to a new ``mlflow-unsent-<run>-<time>.jsonl``."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = directory / f"mlflow-unsent-{header.get('run_id') or 'new-run'}-{stamp}-{os.getpid()}.jsonl"
    with open(path, "w") as out:
        out.write(json.dumps(redact_values(dict(header))) + "\n")  # its tracking URI: never a credential
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
