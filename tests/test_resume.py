"""Exact resume with real processes and files: stop/resume, elastic, kill -9, stop signals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import REPO_ROOT, recorded_keys, tiny_run_overrides

from unetdist import checkpoint as ckpt
from unetdist.preemption import EXIT_PREEMPTED

pytestmark = pytest.mark.slow

MAX_STEPS = 60


def command(nproc: int, max_restarts: int = 0) -> list[str]:
    if nproc == 1 and not max_restarts:
        return [sys.executable, "-m", "unetdist.train"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--max-restarts={max_restarts}", "-m", "unetdist.train"]


def overrides(shards: Path, output_dir: Path, store: str) -> list[str]:
    # constant LR after warmup: the schedule must not depend on where a leg stops
    return tiny_run_overrides(shards, output_dir, store) + [
        "data.num_workers=2", "data.augment=true", "optim.schedule=constant", "train.val_every=0",
        "checkpoint.every=10", "tracking.log_model=false", "train.record_samples=true",
    ]


def train(args: list[str], nproc: int = 2, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([*command(nproc), *args], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
                            **kwargs)
    return result


def final_model(output_dir: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_checkpoint(ckpt.latest_good_checkpoint(output_dir / "checkpoints"))["model"]


def assert_same_model(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"parameters differ: {different[:5]}"


@pytest.fixture(scope="module")
def uninterrupted(cell_shards, tmp_path_factory):
    """The reference: a 2-rank run of MAX_STEPS steps without interruption."""
    root = tmp_path_factory.mktemp("uninterrupted")
    store = f"sqlite:///{root / 'mlflow.db'}"
    result = train([*overrides(cell_shards, root / "run", store), f"train.max_steps={MAX_STEPS}"])
    assert result.returncode == 0, result.stderr[-4000:]
    client = mlflow.MlflowClient(store)
    run = client.search_runs([client.get_experiment_by_name("tests").experiment_id])[0]
    losses = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")]
    return {"model": final_model(root / "run"), "keys": recorded_keys(root / "run"), "losses": sorted(losses)}


@pytest.fixture(scope="module")
def first_leg(cell_shards, tmp_path_factory) -> Path:
    """The uninterrupted run's first 30 steps at 2 ranks, stopped there: each resume test continues
    its own copy of it (output folder and MLflow store)."""
    root = tmp_path_factory.mktemp("first-leg")
    first = train([*overrides(cell_shards, root / "run", f"sqlite:///{root / 'mlflow.db'}"), "train.max_steps=30"])
    assert first.returncode == 0, first.stderr[-4000:]
    return root


def continue_copy(first_leg: Path, cell_shards: Path, tmp_path: Path) -> tuple[list[str], str]:
    """Overrides for continuing a copy of the first leg in ``tmp_path``, and its MLflow store."""
    shutil.copytree(first_leg, tmp_path, dirs_exist_ok=True)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return overrides(cell_shards, tmp_path / "run", store), store


def test_stop_and_resume_is_bitwise_identical(uninterrupted, first_leg, cell_shards, tmp_path):
    args, store = continue_copy(first_leg, cell_shards, tmp_path)
    second = train([*args, f"train.max_steps={MAX_STEPS}", "--resume", "auto"])
    assert second.returncode == 0, second.stderr[-4000:]

    assert_same_model(final_model(tmp_path / "run"), uninterrupted["model"])
    assert recorded_keys(tmp_path / "run") == uninterrupted["keys"]
    client = mlflow.MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert len(runs) == 1
    losses = sorted((m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, "train/loss"))
    assert losses == uninterrupted["losses"]


def test_elastic_resume_on_one_rank_continues_the_global_sequence(uninterrupted, first_leg, cell_shards, tmp_path):
    args, _ = continue_copy(first_leg, cell_shards, tmp_path)
    second = train([*args, f"train.max_steps={MAX_STEPS}", "--resume", "auto"], nproc=1)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "saved by 2 ranks" in second.stderr
    assert recorded_keys(tmp_path / "run") == uninterrupted["keys"]


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the training processes that torchrun started."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        env = dict(item.split(b"=", 1) for item in environ if b"=" in item)
        if parent == launcher_pid and b"RANK" in env:
            found[int(env[b"RANK"])] = int(entry.name)
    return found


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def start_background(args: list[str], nproc: int, max_restarts: int, log_path: Path) -> subprocess.Popen:
    log_file = open(log_path, "w")
    return subprocess.Popen([*command(nproc, max_restarts), *args], stdout=log_file, stderr=subprocess.STDOUT,
                            cwd=REPO_ROOT, text=True)


def test_kill_9_one_rank_restarts_and_finishes_identically(uninterrupted, cell_shards, tmp_path):
    args = overrides(cell_shards, tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}")
    process = start_background([*args, f"train.max_steps={MAX_STEPS}", "--resume", "auto"], 2, 1,
                               tmp_path / "torchrun.log")
    try:
        wait_for(lambda: (tmp_path / "run" / "checkpoints" / "step-00000020").is_dir(), 120, "checkpoint 20")
        victim = wait_for(lambda: worker_pids(process.pid).get(1), 10, "rank 1's pid")
        os.kill(victim, signal.SIGKILL)
        assert process.wait(timeout=240) == 0, (tmp_path / "torchrun.log").read_text()[-4000:]
    finally:
        process.kill()
    log_text = (tmp_path / "torchrun.log").read_text()
    assert "resuming from" in log_text
    assert_same_model(final_model(tmp_path / "run"), uninterrupted["model"])


def test_stop_signal_to_one_rank_stops_all_at_the_same_step(cell_shards, tmp_path):
    args = overrides(cell_shards, tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}")
    process = start_background([*args, "train.max_steps=100000", "checkpoint.every=100000"], 2, 0,
                               tmp_path / "torchrun.log")
    try:
        samples = tmp_path / "run" / "samples" / "rank-00001.jsonl"
        wait_for(lambda: samples.is_file() and len(samples.read_text().splitlines()) >= 5, 120, "5 steps")
        os.kill(wait_for(lambda: worker_pids(process.pid).get(1), 10, "rank 1's pid"), signal.SIGUSR1)
        signalled = time.monotonic()
        process.wait(timeout=60)
        stop_time_s = time.monotonic() - signalled
    finally:
        process.kill()
    log_text = (tmp_path / "torchrun.log").read_text()
    assert f"exitcode  : {EXIT_PREEMPTED}" in log_text or f"exit code {EXIT_PREEMPTED}" in log_text, log_text[-3000:]
    step = int((tmp_path / "run" / "PREEMPTED").read_text())
    assert step % 5 == 0  # the ranks agree on a stop every train.stop_check_every (5) steps
    saved = ckpt.latest_good_checkpoint(tmp_path / "run" / "checkpoints")
    assert saved.name == ckpt.step_name(step)
    manifest = json.loads((saved / "MANIFEST.json").read_text())
    assert {"rank-00000.pt", "rank-00001.pt", "trainer.pt"} == set(manifest["files"])
    assert stop_time_s < 30
