"""The logged model (``unetdist.tracking.models``): pickle-free, the same predictions through every loader.

One tiny U-Net is logged once per module through the project's own path (``RunOutputs``
-> tracker -> sender -> ``log_pyfunc_model``) into a real SQLite store. Every ``*.pkl`` in
the model's folder is then overwritten with garbage, so a loader that unpickles anything
fails, and the model is loaded by ``mlflow.pyfunc`` in a fresh interpreter, by
``python -m unetdist.predict`` and by ``mlflow models serve`` over REST: each must give
the in-memory model's mask.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from torch import nn

from unetdist.config import Config, DataConfig, ModelConfig, TrackingConfig, TrainConfig
from unetdist.distributed import DistributedContext
from unetdist.inference import predict_array
from unetdist.model import build_unet
from unetdist.tracking.models import pinned_requirements
from unetdist.tracking.run_outputs import RunOutputs

pytestmark = pytest.mark.slow

CTX = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
TILE = 32
SERVE_START_TIMEOUT_S = 120


@dataclass(frozen=True)
class LoggedModel:
    tracking_uri: str
    run_uri: str  # runs:/<run_id>/model
    model_dir: Path  # the model's folder in the store (has MLmodel)
    image_path: Path  # uint8 TIFF
    image: np.ndarray  # float32 [H, W], the same values
    expected: np.ndarray  # uint8 [H, W], the in-memory model's mask
    garbled: tuple[Path, ...]  # the *.pkl files overwritten with garbage


def _fresh_env(tracking_uri: str) -> dict[str, str]:
    # the venv's bin/ first, as when it is activated: `mlflow models serve` starts `uvicorn` from PATH
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "MLFLOW_TRACKING_URI": tracking_uri, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def logged_model(tmp_path_factory: pytest.TempPathFactory) -> LoggedModel:
    root = tmp_path_factory.mktemp("logged-model")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    config = Config(
        data=DataConfig(root=str(root / "data"), tile_size=TILE),
        model=ModelConfig(preset="padded", base_width=4, depth=2),
        train=TrainConfig(output_dir=str(root / "run"), max_steps=1, progress=False),
        tracking=TrackingConfig(tracking_uri=tracking_uri, experiment="models", request_timeout_s=5),
    )
    torch.manual_seed(3)
    model = build_unet("padded", 1, 2, base_width=4, depth=2)
    for module in model.modules():  # untrained running stats give an all-background mask
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    model.eval()
    outputs = RunOutputs.open(config, CTX, 0, None)
    outputs.log_final_model(model, config, step=1)
    outputs.close("FINISHED")
    assert outputs.tracker.unsent_path is None

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("models")
    (logged,) = client.search_logged_models(experiment_ids=[experiment.experiment_id])
    model_dir = Path(logged.artifact_location.removeprefix("file://"))
    assert (model_dir / "MLmodel").is_file(), model_dir
    garbled = tuple(sorted(model_dir.rglob("*.pkl")))
    for path in garbled:
        path.write_bytes(b"not a pickle: a loader that unpickles this fails")

    image = np.random.default_rng(5).integers(0, 256, (45, 58)).astype(np.uint8)
    image_path = root / "cells.tif"
    tifffile.imwrite(image_path, image)
    expected = predict_array(model, image.astype(np.float32), tile=TILE)
    assert 0.05 < (expected == 1).mean() < 0.95, "a mask of one class would make the comparisons weak"
    return LoggedModel(
        tracking_uri,
        f"runs:/{outputs.tracker.run_id}/model",
        model_dir,
        image_path,
        image.astype(np.float32),
        expected,
        garbled,
    )


def test_logged_model_is_code_and_tensors_not_a_pickle(logged_model: LoggedModel) -> None:
    import yaml

    assert logged_model.garbled == ()  # models from code: MLflow writes no python_model.pkl at all
    assert not list(logged_model.model_dir.rglob("python_model.pkl*"))
    flavor = yaml.safe_load((logged_model.model_dir / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert "python_model" not in flavor
    assert (logged_model.model_dir / "pyfunc_entry.py").is_file()
    assert (logged_model.model_dir / "code" / "unetdist" / "inference" / "pyfunc.py").is_file()
    # the artifact names every unetdist version wrote, which `unetdist.predict` reads
    assert {name: entry["path"] for name, entry in flavor["artifacts"].items()} == {
        "weights": "artifacts/weights.pt",
        "spec": "artifacts/unet.json",
    }
    state = torch.load(logged_model.model_dir / "artifacts" / "weights.pt", weights_only=True)
    assert all(isinstance(value, torch.Tensor) for value in state.values())
    requirements = (logged_model.model_dir / "requirements.txt").read_text().split()
    torch_public = importlib.metadata.version("torch").split("+")[0]
    assert f"torch=={torch_public}" in requirements
    assert not any("+" in line for line in requirements), requirements


def test_pinned_requirements_drop_the_local_build_tag() -> None:
    torch_version = importlib.metadata.version("torch")
    assert pinned_requirements("torch", "no-such-distribution-xyz") == [
        f"torch=={torch_version.split('+')[0]}",
        "no-such-distribution-xyz",
    ]


def test_pyfunc_load_in_a_fresh_interpreter_predicts_like_the_model(
    logged_model: LoggedModel, tmp_path: Path
) -> None:
    np.save(tmp_path / "input.npy", logged_model.image[None, None])
    script = (
        "import sys, numpy as np, mlflow.pyfunc\n"
        "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "np.save(sys.argv[3], model.predict(np.load(sys.argv[2])))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, logged_model.run_uri, "input.npy", "mask.npy"],
        cwd=tmp_path,
        env=_fresh_env(logged_model.tracking_uri),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    mask = np.load(tmp_path / "mask.npy")
    assert mask.shape == (1, *logged_model.expected.shape) and mask.dtype == np.uint8
    assert np.array_equal(mask[0], logged_model.expected)


def test_predict_cli_on_the_run_uri_predicts_like_the_model(
    logged_model: LoggedModel, tmp_path: Path
) -> None:
    result = subprocess.run(
        [
            sys.executable, "-m", "unetdist.predict", "--model", logged_model.run_uri,
            "--input", str(logged_model.image_path), "--output", "out", "--tile", str(TILE),
        ],
        cwd=tmp_path,
        env=_fresh_env(logged_model.tracking_uri),
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert np.array_equal(tifffile.imread(tmp_path / "out" / "cells_mask.tif"), logged_model.expected)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served_model(logged_model: LoggedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of ``mlflow models serve`` on the logged model (killed afterwards)."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [
                str(mlflow_cli), "models", "serve", "-m", logged_model.run_uri, "--env-manager", "local",
                "-h", "127.0.0.1", "-p", str(port),
            ],
            env=_fresh_env(logged_model.tracking_uri),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its uvicorn workers go with it
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVE_START_TIMEOUT_S
        while True:
            if server.poll() is not None:
                log_tail = log_path.read_text()[-3000:]
                pytest.fail(f"mlflow models serve exited {server.returncode}:\n{log_tail}")
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                log_tail = log_path.read_text()[-3000:]
                pytest.fail(f"mlflow models serve not up in {SERVE_START_TIMEOUT_S} s:\n{log_tail}")
            time.sleep(0.5)
        yield url
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, 9)
                server.wait(timeout=15)


def test_mlflow_models_serve_predicts_like_the_model(logged_model: LoggedModel, served_model: str) -> None:
    body = json.dumps({"inputs": logged_model.image[None, None].tolist(), "params": {"tile": TILE}})
    request = urllib.request.Request(
        f"{served_model}/invocations", data=body.encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        predictions = np.asarray(json.loads(response.read())["predictions"])
    assert predictions.shape == (1, *logged_model.expected.shape)
    assert np.array_equal(predictions[0], logged_model.expected)
