"""RunOutputs against a real ``mlflow server``: one run across interruptions, reports, the pyfunc model.

A job is simulated the way the trainer drives ``RunOutputs``: it opens the record (with
the run id a checkpoint would hold), logs metrics, panels and checkpoints, and closes it
as preempted, failed or finished. Everything is read back through ``MlflowClient``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from unetdist.config import Config, DataConfig, ModelConfig, TrackingConfig, TrainConfig
from unetdist.distributed import DistributedContext
from unetdist.model import build_unet
from unetdist.tracking.run_outputs import RunOutputs

pytestmark = pytest.mark.slow

CTX = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
VAL_EVERY = 4


def make_config(tmp_path: Path, uri: str, **tracking: object) -> Config:
    return Config(
        data=DataConfig(root=str(tmp_path / "data"), tile_size=32),
        model=ModelConfig(preset="padded", base_width=4, depth=2),
        train=TrainConfig(output_dir=str(tmp_path / "run"), max_steps=24, progress=False),
        tracking=TrackingConfig(
            tracking_uri=uri, experiment="resume", run_name="resumed-twice", image_every=VAL_EVERY, num_images=2,
            request_timeout_s=5, **tracking,
        ),
    )  # fmt: skip


def loss_at(step: int, attempt: int) -> float:
    return 1.0 / step + 0.01 * attempt


def fake_checkpoint(run_dir: Path, step: int) -> Path:
    """A checkpoint directory as checkpoint.py writes it (parts + manifest)."""
    path = run_dir / "checkpoints" / f"step-{step:08d}"
    path.mkdir(parents=True, exist_ok=True)
    (path / "trainer.pt").write_bytes(b"x" * 1000)
    (path / "MANIFEST.json").write_text(json.dumps({"step": step, "files": {}}))
    return path


def val_tiles(step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(step)
    image = rng.standard_normal((3, 1, 32, 32)).astype(np.float32)
    truth = (image[:, 0] > 0).astype(np.int64)
    pred = (image[:, 0] > 0.5 - step / 48).astype(np.int64)
    return image, truth, pred


def run_job(
    config: Config, run_id: str | None, first: int, last: int, attempt: int, end: str, **close
) -> str:
    """Steps ``first..last`` of a job resumed at ``first - 1``; returns the MLflow run id."""
    outputs = RunOutputs.open(config, CTX, first - 1, run_id)
    for step in range(first, last + 1):
        outputs.tracker.log_metrics({"train/loss": loss_at(step, attempt)}, step=step)
        if step % VAL_EVERY == 0:
            outputs.tracker.log_metrics(
                {"val/dice_class1": step / 24, "val/iou_class1": step / 30}, step=step
            )
            outputs.log_val_panels(step, *val_tiles(step))
            outputs.on_checkpoint_saved(fake_checkpoint(outputs.run_dir, step), is_best=step == 16)
    run_id = outputs.tracker.run_id
    if end == "FINISHED":
        model = build_unet("padded", 1, 2, base_width=4, depth=2)
        outputs.log_final_model(model, config, step=last)
    outputs.close(end, **close)
    assert outputs.tracker.unsent_path is None
    return run_id


def final_history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    """Per step, the value logged last: what the resumed run finally says."""
    latest: dict[int, tuple[int, float]] = {}
    for metric in client.get_metric_history(run_id, key):
        if metric.step not in latest or metric.timestamp >= latest[metric.step][0]:
            latest[metric.step] = (metric.timestamp, metric.value)
    return [(step, latest[step][1]) for step in sorted(latest)]


def test_one_run_across_two_interruptions(mlflow_server, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    config = make_config(tmp_path, mlflow_server, register_as="unet-resume-test")

    run_id = run_job(config, None, 1, 10, attempt=0, end="PREEMPTED")  # checkpoint at 8, stopped at 10
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.data.tags["unetdist.state"] == "preempted"

    assert run_job(config, run_id, 9, 18, attempt=1, end="FAILED", error="RuntimeError: boom") == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["unetdist.error"] == "RuntimeError: boom"

    assert run_job(config, run_id, 17, 24, attempt=2, end="FINISHED") == run_id
    experiment = client.get_experiment_by_name("resume")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id], "one MLflow run for the whole job"
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["unetdist.state"] == "finished"
    assert (
        run.data.tags["unetdist.world_size"] == "1"
        and run.data.tags["unetdist.config_hash"] == config.digest()
    )
    assert run.data.params["model.preset"] == "padded"

    # one monotonic history to the end: the last attempt's value at every step
    expected_attempt = {step: 0 if step <= 8 else 1 if step <= 16 else 2 for step in range(1, 25)}
    history = final_history(client, run_id, "train/loss")
    assert [step for step, _ in history] == list(range(1, 25))
    assert [value for _, value in history] == pytest.approx(
        [loss_at(s, expected_attempt[s]) for s in range(1, 25)]
    )
    assert [m.step for m in client.get_metric_history(run_id, "run/resumed_at_step")] == [8, 16]
    assert [s for s, _ in final_history(client, run_id, "val/dice_class1")] == [4, 8, 12, 16, 20, 24]

    # overlay panels as image series, at their steps
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    for tile in (0, 1):
        steps = {int(p.split("+step+")[1].split("+")[0]) for p in images if f"val~panel_{tile}+" in p}
        assert steps == {4, 8, 12, 16, 20, 24}, tile
    assert run.data.tags.get("mlflow.loggedImages") == "True"

    # checkpoints: tags name them; with "last" only the final one is uploaded
    assert run.data.tags["unetdist.last_checkpoint"].endswith("step-00000024")
    assert run.data.tags["unetdist.best_checkpoint"].endswith("step-00000016")
    assert {a.path for a in client.list_artifacts(run_id, "checkpoints")} == {"checkpoints/step-00000024"}
    assert {a.path for a in client.list_artifacts(run_id, "checkpoints/step-00000024")} == {
        "checkpoints/step-00000024/MANIFEST.json",
        "checkpoints/step-00000024/trainer.pt",
    }
    assert "config.yaml" in [a.path for a in client.list_artifacts(run_id)]

    # the final model: a pyfunc that predicts a mask for a new image of another size
    models = client.search_logged_models(experiment_ids=[experiment.experiment_id])
    assert [(m.name, m.source_run_id) for m in models] == [("model", run_id)]
    version = client.get_model_version_by_alias("unet-resume-test", "final")
    assert version.run_id == run_id
    _check_pyfunc_predicts(mlflow_server, f"models:/{models[0].model_id}")


def _check_pyfunc_predicts(uri: str, model_uri: str) -> None:
    import mlflow.pyfunc

    if not (Path(__file__).parents[1] / "unetdist" / "predict.py").exists():
        pytest.skip("unetdist/predict.py (overlap-tile prediction) is not there yet")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)  # "models:/" resolves through it
        model = mlflow.pyfunc.load_model(model_uri)
    signature = model.metadata.signature
    assert list(signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 1, -1, -1]
    image = np.random.default_rng(7).standard_normal((1, 1, 50, 70)).astype(np.float32)
    mask = model.predict(image)
    assert mask.shape == (1, 50, 70) and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 1}
    masks = model.predict(np.concatenate([image, image]), params={"overlap": 0.5})
    assert masks.shape == (2, 50, 70)


def test_checkpoint_modes_all_and_none(mlflow_server, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    for mode in ("all", "none"):
        config = make_config(tmp_path / mode, mlflow_server, log_checkpoints=mode, log_model=False)
        config = dataclasses.replace(
            config, tracking=dataclasses.replace(config.tracking, run_name=f"ckpt-{mode}")
        )
        outputs = RunOutputs.open(config, CTX, 0, None)
        for step in (4, 8):
            outputs.on_checkpoint_saved(fake_checkpoint(outputs.run_dir, step))
        outputs.close("FINISHED")
        run_id = outputs.tracker.run_id
        uploaded = {a.path for a in client.list_artifacts(run_id, "checkpoints")}
        expected = {f"checkpoints/step-0000000{s}" for s in (4, 8)}
        assert uploaded == (expected if mode == "all" else set()), mode
        assert client.get_run(run_id).data.tags["unetdist.last_checkpoint"].endswith("step-00000008")


def test_other_ranks_record_nothing(tmp_path):
    config = make_config(tmp_path, "http://127.0.0.1:9")  # never contacted
    rank1 = dataclasses.replace(CTX, rank=1)
    outputs = RunOutputs.open(config, rank1, 0, None)
    outputs.log_val_panels(4, *val_tiles(4))
    outputs.on_checkpoint_saved(tmp_path / "x.pt")
    outputs.log_final_model(build_unet("padded", 1, 2, base_width=4, depth=2), config)
    outputs.close("FINISHED")
    assert outputs.tracker.run_id is None
    assert not (tmp_path / "run").exists()


def test_resumed_job_records_changed_settings_per_attempt(mlflow_server, tmp_path, caplog):
    """Settings a resumed job may change (``checkpoint.resume``, ``train.output_dir``) keep the first
    attempt's param and get an ``attempt.<key>`` tag, without the "already logged" warning; a real
    conflict (a math key) still warns."""
    from mlflow import MlflowClient

    first = make_config(tmp_path, mlflow_server, log_model=False)
    first = dataclasses.replace(first, tracking=dataclasses.replace(first.tracking, run_name="attempts"))
    run_id = run_job(first, None, 1, 4, attempt=0, end="PREEMPTED")

    def resumed(output_dir: str, **optim: float):
        return dataclasses.replace(
            first,
            checkpoint=dataclasses.replace(first.checkpoint, resume="auto"),
            train=dataclasses.replace(first.train, output_dir=output_dir),
            optim=dataclasses.replace(first.optim, **optim),
        )

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_job(resumed(str(tmp_path / "moved")), run_id, 5, 8, attempt=1, end="PREEMPTED")
    assert "already logged" not in caplog.text
    run = MlflowClient(mlflow_server).get_run(run_id)
    assert run.data.params["checkpoint.resume"] == "never"
    assert run.data.params["train.output_dir"] == first.train.output_dir
    assert run.data.tags["attempt.checkpoint.resume"] == "auto"
    assert run.data.tags["attempt.train.output_dir"] == str(tmp_path / "moved")

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_job(resumed(first.train.output_dir, lr=0.5), run_id, 9, 12, attempt=2, end="FINISHED")
    assert "param optim.lr was already logged as '0.001'" in caplog.text
    assert "checkpoint.resume" not in caplog.text and "train.output_dir" not in caplog.text
    run = MlflowClient(mlflow_server).get_run(run_id)
    assert run.data.tags["attempt.train.output_dir"] == first.train.output_dir, "the tag follows each attempt"
