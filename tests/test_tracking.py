"""unetdist.tracking against real MLflow stores: a SQLite file and a real server.

Everything is read back only through ``mlflow.MlflowClient``, as a user or the
UI would see it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from unetdist.redaction import REDACTED
from unetdist.tracking import (
    MLflowTracker,
    NullTracker,
    default_tracking_uri,
    flatten_config,
    make_tracker,
)

NESTED_CONFIG = {
    "model": {"preset": "tiny", "channels": [8, 16], "dropout": 0.1},
    "train": {"epochs": 2, "lr": 1e-3, "amp": True},
    "data": {"root": None},
}
LOSSES = [0.9, 0.5, float("nan"), 0.25]


def tiny_conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))


def metric_history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def assert_same_history(logged: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    assert [step for step, _ in logged] == [step for step, _ in expected]
    for (_, got), (_, want) in zip(logged, expected, strict=True):
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want)


# --- pure helpers -------------------------------------------------------------


def test_flatten_config_dotted_keys_and_strings():
    assert flatten_config(NESTED_CONFIG) == {
        "model.preset": "tiny",
        "model.channels": "[8, 16]",
        "model.dropout": "0.1",
        "train.epochs": "2",
        "train.lr": "0.001",
        "train.amp": "True",
        "data.root": "None",
    }
    assert flatten_config({"a": {}}, prefix="cfg.") == {"cfg.a": "{}"}


def test_default_tracking_uri_from_environment(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert default_tracking_uri() == "http://127.0.0.1:5999"


def test_default_tracking_uri_is_sqlite_in_cwd(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


# --- null object --------------------------------------------------------------


def test_null_tracker_does_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tracker = NullTracker()
    with tracker:
        tracker.log_params(NESTED_CONFIG)
        tracker.log_metrics({"loss": 1.0}, step=0)
        tracker.log_config(NESTED_CONFIG)
        tracker.log_artifact(tmp_path)
        tracker.log_model(tiny_conv_net(), np.zeros((1, 3, 8, 8), np.float32))
        tracker.finish("FAILED")
    assert tracker.run_id is None and tracker.experiment_id is None
    assert list(tmp_path.iterdir()) == []


def test_make_tracker_null_unless_enabled_main_process(local_mlflow_store, tmp_path):
    for enabled, is_main in [(True, False), (False, True), (False, False)]:
        tracker = make_tracker(enabled, is_main, local_mlflow_store, "exp", run_name="r")
        assert isinstance(tracker, NullTracker)
    assert not (tmp_path / "mlflow.db").exists()


# --- local SQLite store -------------------------------------------------------


def test_tracker_round_trip_sqlite(local_mlflow_store, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    tracker = make_tracker(
        True, True, local_mlflow_store, "unet-test", run_name="round-trip", tags={"k": "v"}
    )
    assert isinstance(tracker, MLflowTracker)
    tracker.log_params(NESTED_CONFIG)
    for step, loss in enumerate(LOSSES):
        tracker.log_metrics({"train/loss": loss, "lr": 1e-3 * (step + 1)}, step=step)
    tracker.log_config(NESTED_CONFIG)
    model = tiny_conv_net().train()
    example = np.random.default_rng(0).random((1, 3, 16, 16), dtype=np.float32)
    model_info = tracker.log_model(model, example)
    assert model.training, "log_model must not touch the caller's model"
    tracker.finish()
    tracker.finish("FAILED")  # idempotent: the first status stays

    client = MlflowClient(local_mlflow_store)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "round-trip"
    assert run.data.tags["k"] == "v"
    assert run.data.params == flatten_config(NESTED_CONFIG)
    assert_same_history(metric_history(client, tracker.run_id, "train/loss"), list(enumerate(LOSSES)))
    assert_same_history(
        metric_history(client, tracker.run_id, "lr"), [(s, 1e-3 * (s + 1)) for s in range(len(LOSSES))]
    )
    assert "config.yaml" in [a.path for a in client.list_artifacts(tracker.run_id)]
    # artifacts live beside the database, not in the working directory
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(tmp_path)

    logged_models = client.search_logged_models(experiment_ids=[tracker.experiment_id])
    assert [m.model_id for m in logged_models] == [model_info.model_id]
    assert logged_models[0].source_run_id == tracker.run_id
    assert logged_models[0].name == "model"
    assert str(logged_models[0].status).endswith("READY")

    import mlflow.pytorch

    monkeypatch.setenv("MLFLOW_TRACKING_URI", local_mlflow_store)  # "models:/" resolves through it
    loaded = mlflow.pytorch.load_model(f"models:/{model_info.model_id}")
    batch = torch.from_numpy(np.random.default_rng(1).random((2, 3, 24, 24), dtype=np.float32))
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), model.eval()(batch))


def test_reattach_skips_logged_params(local_mlflow_store, caplog):
    from mlflow import MlflowClient

    first = MLflowTracker(local_mlflow_store, "resume")
    first.log_params({"a": 1, "b": "x"})
    first.log_metrics({"loss": 1.0}, step=0)
    first.finish("KILLED")

    second = MLflowTracker(local_mlflow_store, "resume", run_id=first.run_id)
    assert second.run_id == first.run_id and second.experiment_id == first.experiment_id
    second.log_params({"a": 1, "b": "changed", "c": "new"})  # must not raise
    second.log_metrics({"loss": 0.5}, step=1)
    second.finish()

    run = MlflowClient(local_mlflow_store).get_run(first.run_id)
    assert run.data.params == {"a": "1", "b": "x", "c": "new"}
    assert run.info.status == "FINISHED"
    assert "already logged" in caplog.text


def test_settings_that_may_change_become_attempt_tags(local_mlflow_store, caplog):
    from mlflow import MlflowClient

    first = MLflowTracker(local_mlflow_store, "attempts")
    may_change = {"checkpoint.resume"}  # a resumed job sets it to auto
    first.log_params({"checkpoint": {"resume": "never"}, "optim": {"lr": 0.1}}, may_change=may_change)
    first.finish("KILLED")
    second = MLflowTracker(local_mlflow_store, "attempts", run_id=first.run_id)
    second.log_params({"checkpoint": {"resume": "auto"}, "optim": {"lr": 0.1}}, may_change=may_change)
    second.finish()
    assert "already logged" not in caplog.text
    run = MlflowClient(local_mlflow_store).get_run(first.run_id)
    assert run.data.params == {"checkpoint.resume": "never", "optim.lr": "0.1"}
    assert run.data.tags["attempt.checkpoint.resume"] == "auto"


def test_long_and_secret_params(local_mlflow_store, caplog):
    from mlflow import MlflowClient

    tracker = MLflowTracker(local_mlflow_store, "limits")
    many = {f"p{i:03d}": i for i in range(250)}  # three batches
    tracker.log_params({**many, "long": "x" * 7000, "db": {"password": "hunter2"}})
    tracker.finish()
    params = MlflowClient(local_mlflow_store).get_run(tracker.run_id).data.params
    assert len(params) == 252
    assert params["long"] == "x" * 6000
    assert params["db.password"] == REDACTED
    assert "truncated" in caplog.text


# --- real server --------------------------------------------------------------


@pytest.mark.slow
def test_tracker_against_real_server(mlflow_server, monkeypatch, tmp_path):
    from mlflow import MlflowClient

    # credentials reach MLflow only through the environment (the server has no auth and ignores them)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ci-user")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-from-env")

    tracker = make_tracker(True, True, mlflow_server, "server-test", run_name="remote")
    tracker.log_params(NESTED_CONFIG)
    for step, loss in enumerate(LOSSES):
        tracker.log_metrics({"train/loss": loss}, step=step)
    tracker.log_config(NESTED_CONFIG)
    plot = tmp_path / "loss.txt"
    plot.write_text("0.9 0.5 nan 0.25\n")
    tracker.log_artifact(plot, artifact_path="plots")
    model_info = tracker.log_model(tiny_conv_net(), np.zeros((1, 3, 8, 8), np.float32))
    tracker.finish()

    client = MlflowClient(mlflow_server)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == flatten_config(NESTED_CONFIG)
    assert all("s3cret" not in value for value in [*run.data.params.values(), *run.data.tags.values()])
    assert_same_history(metric_history(client, tracker.run_id, "train/loss"), list(enumerate(LOSSES)))
    assert "config.yaml" in [a.path for a in client.list_artifacts(tracker.run_id)]
    assert [a.path for a in client.list_artifacts(tracker.run_id, "plots")] == ["plots/loss.txt"]
    logged_models = client.search_logged_models(experiment_ids=[tracker.experiment_id])
    assert [(m.model_id, m.source_run_id) for m in logged_models] == [(model_info.model_id, tracker.run_id)]
    assert "MLmodel" in [a.path for a in client.list_logged_model_artifacts(model_info.model_id)]
