"""The real entry point, end to end: torchrun, gloo, shards, MLflow store, checkpoints, resume."""

from __future__ import annotations

import subprocess
import sys

import mlflow
import numpy as np
import pytest
from conftest import REPO_ROOT, tiny_run_overrides

from unetdist import checkpoint as ckpt
from unetdist.data.synthetic import synthetic_cells


def run_train(args: list[str], nproc: int = 1, timeout_s: int = 300) -> subprocess.CompletedProcess:
    if nproc == 1:
        launcher = [sys.executable, "-m", "unetdist.train"]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                    "-m", "unetdist.train"]
    return subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=timeout_s, cwd=REPO_ROOT)


def metric_values(client: mlflow.MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.mark.slow
def test_two_rank_run_learns_and_lands_in_mlflow(cell_shards, tmp_path, mlflow_server, monkeypatch):
    """Against a real tracking server: one run for the 2-rank job, its metrics, config, checkpoint, model."""
    output_dir = tmp_path / "run"
    overrides = tiny_run_overrides(cell_shards, output_dir, mlflow_server) + [
        "train.max_steps=200", "train.val_every=100", "train.val_at_start=true", "checkpoint.every=100",
        "tracking.experiment=two-rank-e2e",
    ]
    result = run_train(["--config", "configs/quickstart.yaml", *overrides], nproc=2)
    assert result.returncode == 0, result.stderr[-4000:]

    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("two-rank-e2e")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "one MLflow run per training job, not one per rank"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["model.preset"] == "padded"
    assert run.data.tags["unetdist.world_size"] == "2"

    val_loss = metric_values(client, run.info.run_id, "val/loss")
    val_dice = metric_values(client, run.info.run_id, "val/fg_dice")
    assert [step for step, _ in val_loss] == [0, 100, 200]
    assert val_loss[-1][1] < 0.7 * val_loss[0][1], val_loss
    assert val_dice[-1][1] > val_dice[0][1] + 0.2 and val_dice[-1][1] > 0.75, val_dice
    train_loss = metric_values(client, run.info.run_id, "train/loss")
    assert train_loss[-1][1] < train_loss[0][1]

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts
    checkpoints = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert "checkpoints/step-00000200" in checkpoints
    models = {m.name: m for m in client.search_logged_models(experiment_ids=[experiment.experiment_id])}
    assert "model" in models and models["model"].source_run_id == run.info.run_id

    # the logged model segments a new image like the trained network (pyfunc: float32 NCHW -> uint8 masks)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # "models:/" resolves through it
    segmenter = mlflow.pyfunc.load_model(models["model"].model_uri)
    image, instances = synthetic_cells(96, np.random.default_rng(99))
    mask = segmenter.predict(image[None, None].astype(np.float32))
    assert mask.shape == (1, 96, 96) and mask.dtype == np.uint8
    truth = instances > 0
    dice = 2 * np.logical_and(mask[0] == 1, truth).sum() / ((mask[0] == 1).sum() + truth.sum())
    assert dice > 0.75, dice
    # and `unetdist.predict` takes the same URI
    from unetdist.predict import load_model, predict_array

    network, meta = load_model(models["model"].model_uri)
    assert meta["kind"] == "mlflow"
    assert np.array_equal(predict_array(network, image.astype(np.float32), tile=64), mask[0])  # the training tile
    assert (output_dir / "config.yaml").is_file()


@pytest.mark.slow
def test_single_process_resume_continues_the_same_run(cell_shards, tmp_path, local_mlflow_store):
    output_dir = tmp_path / "run"
    overrides = tiny_run_overrides(cell_shards, output_dir, local_mlflow_store) + [
        "train.val_every=0", "checkpoint.every=5", "train.global_batch_size=4", "tracking.log_model=false",
    ]
    first = run_train([*overrides, "train.max_steps=10"])
    assert first.returncode == 0, first.stderr[-4000:]
    second = run_train([*overrides, "train.max_steps=20", "--resume", "auto"])
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resuming from" in second.stderr and "step-00000010" in second.stderr

    client = mlflow.MlflowClient(local_mlflow_store)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert len(runs) == 1, "a resumed run continues the same MLflow run"
    steps = [step for step, _ in metric_values(client, runs[0].info.run_id, "train/loss")]
    assert steps == [10, 20]
    assert ckpt.load_checkpoint(ckpt.latest_good_checkpoint(output_dir / "checkpoints"))["step"] == 20

    # a resume that changes the math is refused, naming the key
    refused = run_train([*overrides, "train.max_steps=30", "model.base_width=16", "--resume", "auto"])
    assert refused.returncode == 2
    assert "model.base_width: 8 -> 16" in refused.stderr


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.max_stepz=3"], "unknown key train.max_stepz (did you mean train.max_steps?)"),
        (["train.max_steps=many"], "train.max_steps expects int, got 'many'"),
        (["train.precision=fp8"], "train.precision='fp8' is not one of fp32, bf16, fp16"),
        (["model.preset=paper", "data.tile_size=570"], "nearest valid sizes: 556, 572"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, overrides, message):
    result = run_train(["data.root=somewhere", *overrides], timeout_s=60)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_shards_name_the_folder(tmp_path):
    result = run_train([f"data.root={tmp_path / 'nowhere'}", "tracking.enabled=false",
                        f"train.output_dir={tmp_path / 'run'}", "data.tile_size=64"], timeout_s=60)
    assert result.returncode == 2
    assert str(tmp_path / "nowhere") in result.stderr
    assert "Traceback" not in result.stderr
