"""Hang safety: a run whose peers never arrive, or whose step loop stalls, ends within a set time.

Real processes only: torchrun with a c10d rendezvous that one node never joins, and the
watchdog in a subprocess whose main thread blocks.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, tiny_run_overrides
from services.mlflow_server import free_port

from unetdist.watchdog import EXIT_STALLED, Watchdog

WATCHDOG_SCRIPT = textwrap.dedent(
    """
    import logging, sys, threading, time
    from unetdist.watchdog import Watchdog

    logging.basicConfig(level=logging.WARNING)
    timeout_s, steps, stall = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    startup_timeout_s = float(sys.argv[4]) if len(sys.argv) > 4 else None
    watchdog = Watchdog(timeout_s, rank=1, startup_timeout_s=startup_timeout_s)
    for step in range(1, steps + 1):
        time.sleep(0.05)
        watchdog.beat(step)
    if stall == "stall":
        threading.Event().wait()  # like a collective whose peer is gone: blocks for ever
    watchdog.stop()
    print("finished", flush=True)
    """
)


def run_watchdog_script(
    timeout_s: float, steps: int, stall: str, startup_timeout_s: float | None = None
) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    extra = [str(startup_timeout_s)] if startup_timeout_s is not None else []
    result = subprocess.run(
        [sys.executable, "-c", WATCHDOG_SCRIPT, str(timeout_s), str(steps), stall, *extra],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return result, time.monotonic() - start


def test_watchdog_ends_a_stalled_process_with_its_rank_last_step_and_stacks():
    result, elapsed_s = run_watchdog_script(timeout_s=1.5, steps=5, stall="stall")
    assert result.returncode == EXIT_STALLED, result.stderr
    assert "rank 1 made no progress" in result.stderr and "after step 5" in result.stderr, result.stderr
    assert "train.watchdog_s=1.5" in result.stderr
    # faulthandler's dump names the main thread's blocking call
    assert "Current thread" in result.stderr or "Thread 0x" in result.stderr, result.stderr
    assert "in wait" in result.stderr, result.stderr
    assert "finished" not in result.stdout
    assert elapsed_s < 15, f"took {elapsed_s:.1f} s for a 1.5 s watchdog"


def test_watchdog_stays_quiet_while_steps_arrive_and_after_stop():
    # 40 beats 50 ms apart = 2 s of steady progress under a 0.5 s watchdog, then stop()
    result, _ = run_watchdog_script(timeout_s=0.5, steps=40, stall="no")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "finished"
    assert "watchdog" not in result.stderr


def test_watchdog_waits_for_the_first_step_only_when_asked():
    result, elapsed_s = run_watchdog_script(timeout_s=0.5, steps=0, stall="stall", startup_timeout_s=1.0)
    assert result.returncode == EXIT_STALLED, result.stderr
    assert "rank 1 made no progress" in result.stderr and "before its first step" in result.stderr
    assert "startup_timeout_s=1" in result.stderr
    # without startup_timeout_s the watch starts at the first beat (start-up may take minutes)
    watchdog = Watchdog(0.2, rank=0)
    time.sleep(0.6)
    watchdog.stop()


def test_watchdog_off_starts_no_thread():
    watchdog = Watchdog(0, rank=0)
    assert not watchdog.enabled
    watchdog.beat(1)
    watchdog.stop()


@pytest.mark.slow
def test_rendezvous_whose_peer_never_arrives_fails_within_its_timeout(cell_shards, tmp_path):
    """torchrun --nnodes=2 with one node: the c10d rendezvous gives up after join_timeout, clearly."""
    join_timeout_s = 8
    port = free_port()
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes=2", "--nproc_per_node=1", "--max_restarts=0",
        "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=lonely",
        f"--rdzv_conf=join_timeout={join_timeout_s}",
        "-m", "unetdist.train", "--config", "configs/quickstart.yaml",
        *tiny_run_overrides(cell_shards, tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"),
    ]  # fmt: skip
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    elapsed_s = time.monotonic() - start
    assert result.returncode != 0
    assert "RendezvousTimeoutError" in result.stderr, result.stderr[-3000:]
    assert elapsed_s < join_timeout_s + 20, (
        f"gave up after {elapsed_s:.1f} s, join_timeout {join_timeout_s} s"
    )
    assert not (tmp_path / "run" / "checkpoints").exists(), "no worker may start without its peers"


def trainer_uses_watchdog() -> bool:
    return (
        "Watchdog"
        in (REPO_ROOT / "unetdist" / "trainer.py").read_text()
        + (REPO_ROOT / "unetdist" / "train.py").read_text()
    )


def worker_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=rank (a direct child of the launcher)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == launcher_pid and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not trainer_uses_watchdog(), reason="train.watchdog_s is not wired into the trainer yet")
def test_frozen_peer_ends_the_run_through_the_watchdog(cell_shards, tmp_path):
    """Rank 1 freezes mid-run (SIGSTOP): rank 0 waits in a collective until its watchdog ends it."""
    watchdog_s = 6
    log_path = tmp_path / "torchrun.log"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max_restarts=0",
        "-m", "unetdist.train", "--config", "configs/quickstart.yaml",
        *tiny_run_overrides(cell_shards, tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"),
        "train.max_steps=100000", "train.val_every=0", "train.val_at_start=false", "checkpoint.every=0",
        "tracking.log_model=false", f"train.watchdog_s={watchdog_s}", "train.timeout_s=300",
    ]  # fmt: skip
    with open(log_path, "w") as log:
        launcher = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    frozen = None
    try:
        deadline = time.monotonic() + 120
        while "step 10 loss" not in log_path.read_text():
            assert launcher.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "no step 10 within 120 s:\n" + log_path.read_text()[-3000:]
            time.sleep(0.2)
        frozen = worker_pid(launcher.pid, rank=1)
        assert frozen is not None
        os.kill(frozen, signal.SIGSTOP)
        frozen_at = time.monotonic()
        returncode = launcher.wait(timeout=watchdog_s + 60)
        elapsed_s = time.monotonic() - frozen_at
    finally:
        if frozen is not None:
            try:
                os.kill(frozen, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    text = log_path.read_text()
    assert returncode != 0
    assert re.search(r"watchdog: rank 0 made no progress for [\d.]+ s after step \d+", text), text[-4000:]
    assert "Thread 0x" in text or "Current thread" in text, "faulthandler's stack dump is in the log"
    # torchrun gives a failed run's other processes a fixed 30 s to exit before SIGKILL
    assert elapsed_s < watchdog_s + 30 + 20, f"the run ended {elapsed_s:.0f} s after the freeze"
