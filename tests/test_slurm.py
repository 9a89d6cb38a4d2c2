"""The project's sbatch script on a real Slurm cluster (tests/services/slurm_cluster.py).

CPU settings on a 2-core machine: ``--gpus-per-node=0 --cpus-per-task=2`` on the sbatch
command line (it overrides the script's GPU lines), ``NPROC_PER_NODE`` in the environment,
``UNETDIST_PYTHON`` = this venv's python. Each run is the real entry point with the tiny
CPU settings, a local MLflow SQLite store and checkpoints in a temp dir.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import REPO_ROOT, tiny_run_overrides
from services.slurm_cluster import FINAL_STATES, SlurmCluster

from unetdist import checkpoint as ckpt

pytestmark = pytest.mark.slow

SBATCH = REPO_ROOT / "launch" / "slurm" / "train.sbatch"
STEPS = 60  # long enough (~8 s of steps here) for a stop signal to land mid-run
JOB_TIMEOUT_S = 150


@dataclass
class SlurmRun:
    job_id: int
    log: Path
    output_dir: Path
    tracking_uri: str
    experiment: str

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no log yet)"

    def final_model(self) -> dict[str, torch.Tensor]:
        path = ckpt.latest_good_checkpoint(self.output_dir / "checkpoints")
        assert path is not None, f"no checkpoint in {self.output_dir}"
        return ckpt.load_checkpoint(path)["model"]

    def mlflow_runs(self) -> list[mlflow.entities.Run]:
        client = mlflow.MlflowClient(self.tracking_uri)
        experiment = client.get_experiment_by_name(self.experiment)
        assert experiment is not None, f"no experiment {self.experiment!r} in {self.tracking_uri}"
        return client.search_runs([experiment.experiment_id])

    def metric_steps(self, run_id: str, key: str) -> list[int]:
        client = mlflow.MlflowClient(self.tracking_uri)
        return sorted(m.step for m in client.get_metric_history(run_id, key))


def submit(
    cluster: SlurmCluster,
    shards: Path,
    tracking_uri: str,
    work_dir: Path,
    *,
    nodes: int = 1,
    nproc_per_node: int = 2,
    steps: int = STEPS,
    extra: tuple[str, ...] = (),
) -> SlurmRun:
    work_dir.mkdir(parents=True, exist_ok=True)
    run = SlurmRun(0, work_dir / "slurm.out", work_dir / "run", tracking_uri, experiment=work_dir.name)
    overrides = tiny_run_overrides(shards, run.output_dir, run.tracking_uri) + [
        f"train.max_steps={steps}", "train.val_every=0", "train.val_at_start=false",
        "checkpoint.every=10", "tracking.log_model=false", f"tracking.experiment={run.experiment}",
        *extra,
    ]  # fmt: skip
    # the cores are shared by the "nodes": one core per process, or OpenMP threads oversubscribe them
    options = [
        f"--nodes={nodes}",
        "--gpus-per-node=0",
        f"--cpus-per-task={2 // nodes}",
        "--time=10",
        f"--output={run.log}",
    ]
    env = {"UNETDIST_PYTHON": sys.executable, "NPROC_PER_NODE": str(nproc_per_node)}
    run.job_id = cluster.sbatch(
        [*options, str(SBATCH), "configs/quickstart.yaml", *overrides], env=env, cwd=REPO_ROOT
    )
    return run


def job_failure(run: SlurmRun, headline: str) -> str:
    text = run.text()
    hint = ""
    if "DataLoader worker" in text and "killed by signal: Terminated" in text:
        hint = (
            "\nHINT: Slurm sends SIGTERM to every process of the job, DataLoader workers included;"
            " they must ignore it (worker_init_fn) so the training process can save and stop.\n"
        )
    return f"{headline}{hint}\n--- job log ---\n{text[-6000:]}"


def wait_done(cluster: SlurmCluster, run: SlurmRun) -> dict[str, str]:
    try:
        state = cluster.wait_job(run.job_id, JOB_TIMEOUT_S)
    except TimeoutError as err:
        pytest.fail(job_failure(run, str(err)))
    info = cluster.job_info(run.job_id)
    assert state == "COMPLETED", job_failure(run, f"job {run.job_id} {state} {info.get('ExitCode')}")
    return info


def wait_for(cluster: SlurmCluster, run: SlurmRun, predicate, what: str, timeout_s: float = 90) -> None:
    """Poll ``predicate`` while the job runs; fail at once if the job ends first."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        state = cluster.job_state(run.job_id)
        if state in FINAL_STATES:
            pytest.fail(job_failure(run, f"job {run.job_id} ended {state} before its {what}"))
        if time.monotonic() > deadline:
            pytest.fail(job_failure(run, f"no {what} after {timeout_s:.0f} s"))
        time.sleep(0.25)


def checkpoint_steps(run: SlurmRun) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run.output_dir / "checkpoints").glob("step-*[0-9]"))


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module's runs (each in its own experiment): its schema takes ~10 s to create."""
    return f"sqlite:///{tmp_path_factory.mktemp('slurm-mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def uninterrupted_run(
    slurm_cluster: SlurmCluster, cell_shards: Path, tracking_uri: str, tmp_path_factory
) -> SlurmRun:
    """1 node x 2 processes, start to finish: the reference for the preempted run."""
    run = submit(slurm_cluster, cell_shards, tracking_uri, tmp_path_factory.mktemp("slurm-one-node"))
    wait_done(slurm_cluster, run)
    return run


@pytest.fixture(scope="module")
def preempted_run(
    slurm_cluster: SlurmCluster, cell_shards: Path, tracking_uri: str, tmp_path_factory
) -> SlurmRun:
    """The same run, stopped twice: by the time-limit warning, then by Slurm's own requeue.

    1. after its first checkpoint, USR1 to the batch shell, exactly what
       ``#SBATCH --signal=B:USR1@120`` does 120 s before the time limit: the script has the
       training save and stop, then requeues the job itself (restart 1);
    2. once restart 1 has saved a checkpoint of its own, ``scontrol requeue``, which is what
       preemption by a higher-priority partition does too: SIGTERM to every process of the
       job, Slurm requeues it (restart 2); the script must not requeue it a second time.
    """
    run = submit(slurm_cluster, cell_shards, tracking_uri, tmp_path_factory.mktemp("slurm-preempted"))
    wait_for(slurm_cluster, run, lambda: checkpoint_steps(run), "first checkpoint")
    slurm_cluster.run(["scancel", "--batch", "--signal=USR1", str(run.job_id)])
    wait_for(slurm_cluster, run, lambda: f"job {run.job_id} restart 1:" in run.text(), "restart 1")
    first_stop = stop_steps(run)[0]
    wait_for(
        slurm_cluster, run, lambda: checkpoint_steps(run)[-1] > first_stop, "checkpoint after the resume"
    )
    slurm_cluster.run(["scontrol", "requeue", str(run.job_id)])
    wait_done(slurm_cluster, run)
    return run


def stop_steps(run: SlurmRun) -> list[int]:
    """The steps at which the script saw the training save and stop, in order."""
    return [int(step) for step in re.findall(r"restart \d+: saved step (\d+)", run.text())]


def test_one_node_two_processes_trains_checkpoints_and_logs_to_mlflow(uninterrupted_run: SlurmRun):
    run, text = uninterrupted_run, uninterrupted_run.text()
    assert f"job {run.job_id} restart 0: 1 node(s) [n1] x 2 process(es)" in text, text
    assert "node n1 (SLURM_NODEID=0)" in text
    assert "training finished" in text
    assert checkpoint_steps(run)[-1] == STEPS
    assert not (run.output_dir / "PREEMPTED").exists()

    [mlflow_run] = run.mlflow_runs()
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.tags["unetdist.world_size"] == "2"
    assert run.metric_steps(mlflow_run.info.run_id, "train/loss") == list(range(10, STEPS + 1, 10))


def test_two_nodes_form_one_rendezvous_group(
    slurm_cluster: SlurmCluster, cell_shards: Path, tracking_uri: str, tmp_path: Path
):
    """Two slurmd on this machine (n1, n2), one torchrun each: c10d joins them into 2 ranks."""
    run = submit(slurm_cluster, cell_shards, tracking_uri, tmp_path, nodes=2, nproc_per_node=1, steps=10)
    info = wait_done(slurm_cluster, run)
    text = run.text()
    assert info["NodeList"] == "n[1-2]"
    assert "2 node(s) [n[1-2]] x 1 process(es)" in text, text
    assert "node n1 (SLURM_NODEID=0)" in text and "node n2 (SLURM_NODEID=1)" in text, text
    [mlflow_run] = run.mlflow_runs()
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.tags["unetdist.world_size"] == "2"
    assert checkpoint_steps(run)[-1] == 10


def test_time_limit_signal_saves_and_requeues_the_job_itself(
    slurm_cluster: SlurmCluster, preempted_run: SlurmRun
):
    run, text = preempted_run, preempted_run.text()
    job = f"job {run.job_id}"
    # all runs of the job are in the one --open-mode=append log, under the same job id
    assert f"{job} restart 0: USR1: asking the training to save and stop" in text, text
    first_stop = stop_steps(run)[0]
    assert 0 < first_stop < STEPS
    assert (
        f"{job} restart 0: saved step {first_stop} after a stop signal (USR1: 1); requeueing job" in text
    ), text
    assert f"{job} restart 1: 1 node(s) [n1] x 2 process(es)" in text
    assert f"resuming from {run.output_dir / 'checkpoints' / f'step-{first_stop:08d}'}" in text, text


def test_slurm_requeue_stops_saves_and_restarts_without_a_second_requeue(
    slurm_cluster: SlurmCluster, preempted_run: SlurmRun
):
    run, text = preempted_run, preempted_run.text()
    job = f"job {run.job_id}"
    assert slurm_cluster.job_info(run.job_id)["Restarts"] == "2", "one restart per stop, no more"
    assert f"{job} restart 1: TERM from Slurm" in text, text
    first_stop, second_stop = stop_steps(run)
    assert first_stop < second_stop < STEPS
    assert f"{job} restart 1: saved step {second_stop} and stopped; Slurm ends or requeues the job" in text, (
        text
    )
    assert f"{job} restart 1: saved step {second_stop} after a stop signal" not in text, "requeued twice"
    assert f"resuming from {run.output_dir / 'checkpoints' / f'step-{second_stop:08d}'}" in text, text
    assert f"{job} restart 2: training finished" in text, text
    assert checkpoint_steps(run)[-1] == STEPS


def test_preempted_job_is_one_mlflow_run(preempted_run: SlurmRun):
    [mlflow_run] = preempted_run.mlflow_runs()  # the restarts continued the run, they did not start others
    assert mlflow_run.info.status == "FINISHED"
    steps = preempted_run.metric_steps(mlflow_run.info.run_id, "train/loss")
    assert steps[-1] == STEPS and len(steps) == len(set(steps)), steps


def test_preempted_run_ends_with_the_uninterrupted_runs_parameters(
    uninterrupted_run: SlurmRun, preempted_run: SlurmRun
):
    expected, actual = uninterrupted_run.final_model(), preempted_run.final_model()
    assert expected.keys() == actual.keys()
    different = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not different, (
        f"{len(different)} of {len(expected)} tensors differ after resume, e.g. {different[:3]}"
    )
