"""Stop signals: Ctrl-C (SIGINT) stops like SIGTERM, saving a checkpoint first; a second Ctrl-C stops at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, tiny_run_overrides

from unetdist import checkpoint as ckpt
from unetdist.preemption import EXIT_PREEMPTED, StopSignal


def test_the_first_ctrl_c_asks_for_a_stop_and_the_second_interrupts():
    stop = StopSignal()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == "SIGINT" and stop.should_stop()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # not reached: the signal interrupts at the next bytecode
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_sigint_stays_ignored():
    """A script's background job (`train ... &`) starts with SIGINT ignored: Ctrl-C is not for it."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        stop = StopSignal()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        stop.restore()
    finally:
        signal.signal(signal.SIGINT, previous)


def _start(args: list[str], log_path: Path, torchrun: bool = False) -> subprocess.Popen:
    """The run in a process group of its own, like a terminal's foreground job: killpg is Ctrl-C."""
    launcher = [sys.executable, "-m", "unetdist.train"]
    if torchrun:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "-m", "unetdist.train"]
    return subprocess.Popen([*launcher, *args], stdout=open(log_path, "w"), stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                            start_new_session=True)


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)


def _steps_done(output_dir: Path, rank: int = 0) -> int:
    samples = output_dir / "samples" / f"rank-{rank:05d}.jsonl"
    return len(samples.read_text().splitlines()) if samples.is_file() else 0


def _args(cell_shards: Path, output_dir: Path, *extra: str) -> list[str]:
    return [*tiny_run_overrides(cell_shards, output_dir, "sqlite:///unused.db"), "tracking.enabled=false",
            "train.val_every=0", "train.record_samples=true", "train.global_batch_size=4", "checkpoint.every=100000",
            *extra]


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_exits_75_and_resume_continues(cell_shards, tmp_path):
    run = tmp_path / "run"
    log_path = tmp_path / "train.log"
    process = _start(_args(cell_shards, run, "train.max_steps=100000"), log_path)
    try:
        _wait_for(lambda: _steps_done(run) >= 3, 120, "3 steps")
        os.killpg(process.pid, signal.SIGINT)  # the DataLoader worker gets it too, as from a terminal
        assert process.wait(timeout=60) == EXIT_PREEMPTED, log_path.read_text()[-3000:]
    finally:
        process.kill()
    text = log_path.read_text()
    assert "Traceback" not in text
    step = int((run / "PREEMPTED").read_text())
    assert step % 5 == 0  # train.stop_check_every
    assert text.strip().splitlines()[-1].endswith(
        f"WARNING unetdist.train: stopped by SIGINT at step {step} after saving a checkpoint; resume with --resume auto")
    assert ckpt.latest_good_checkpoint(run / "checkpoints").name == ckpt.step_name(step)

    resumed = subprocess.run([sys.executable, "-m", "unetdist.train", *_args(cell_shards, run),
                              f"train.max_steps={step + 2}", "--resume", "auto"],
                             capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {run / 'checkpoints' / ckpt.step_name(step)}" in resumed.stderr
    assert ckpt.load_checkpoint(ckpt.latest_good_checkpoint(run / "checkpoints"))["step"] == step + 2


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_with_130(cell_shards, tmp_path):
    run = tmp_path / "run"
    log_path = tmp_path / "train.log"
    # no stop check before the second Ctrl-C: the first one alone would never be acted on
    process = _start(_args(cell_shards, run, "train.max_steps=100000", "train.stop_check_every=100000"), log_path)
    try:
        _wait_for(lambda: _steps_done(run) >= 2, 120, "2 steps")
        os.killpg(process.pid, signal.SIGINT)
        _wait_for(lambda: "Ctrl-C again stops at once" in log_path.read_text(), 30, "the first Ctrl-C's warning")
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=60) == 130, log_path.read_text()[-3000:]
    finally:
        process.kill()
    text = log_path.read_text()
    assert "Traceback" not in text
    assert text.strip().splitlines()[-1].endswith(
        "ERROR unetdist.train: stopped by a second Ctrl-C without saving; --resume auto continues from the last "
        "checkpoint")
    assert ckpt.list_checkpoints(run / "checkpoints") == []


@pytest.mark.slow
def test_ctrl_c_to_torchrun_saves_on_every_rank(cell_shards, tmp_path):
    """torchrun starts each rank in a session of its own and sends it SIGINT once (waiting 30 s,
    --shutdown-timeout, before SIGKILL): the ranks agree, save together and exit 75. torchrun itself
    then reports its SignalException and exits 1: that part is torchrun's."""
    run = tmp_path / "run"
    log_path = tmp_path / "torchrun.log"
    process = _start(_args(cell_shards, run, "train.max_steps=100000"), log_path, torchrun=True)
    try:
        _wait_for(lambda: _steps_done(run, rank=1) >= 3, 120, "3 steps")
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=60)
    finally:
        process.kill()
    text = log_path.read_text()
    step = int((run / "PREEMPTED").read_text())
    assert text.count(f"stopped by SIGINT at step {step} after saving a checkpoint") == 2, text[-3000:]
    saved = ckpt.latest_good_checkpoint(run / "checkpoints")
    assert saved.name == ckpt.step_name(step)
    assert {"trainer.pt", "rank-00000.pt", "rank-00001.pt"} == set(ckpt.verify(saved)["files"])
