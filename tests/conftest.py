"""Shared test fixtures, grouped by the service they provide.

Real services only, no mocks: MLflow tests talk to a SQLite store in a temp
dir (fast) or to a real ``mlflow server`` process (``tests/services``).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# tests/ has no __init__.py, so pytest puts tests/ itself on sys.path (rootdir-relative
# "prepend" import mode): its helpers import as `services.*`.
from services.mlflow_server import MlflowServer
from services.s3_server import S3Server
from services.slurm_cluster import SlurmCluster, SlurmUnavailable, ensure_packages

REPO_ROOT = Path(__file__).resolve().parents[1]


# --- MLflow -------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _restore_root_logging() -> Iterator[None]:
    """Entry points run in-process (train.main, prepare's main) point the root logger at the
    test's captured stderr; left in place, a later test's log lines would go to a closed stream."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def local_mlflow_store(tmp_path: Path) -> str:
    """Tracking URI of a fresh SQLite store in a temp dir (artifacts land beside it)."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(scope="session")
def mlflow_server_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """The session's one real MLflow server; outage tests stop and restart it (same port, same data)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mlflow_server(mlflow_server_process: MlflowServer) -> str:
    """URI ``http://127.0.0.1:PORT`` of a real MLflow server shared by the session.

    Start-up takes ~10-15 s, hence one per session. ``MLFLOW_TRACKING_URI`` is
    deliberately not set: tests pass the URI explicitly (or monkeypatch it),
    so tests of the default store stay independent of whether this ran.
    A test that stopped the server for an outage has restarted it.
    """
    return mlflow_server_process.start()  # a no-op while it runs


# --- GPU ------------------------------------------------------------------------


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` need CUDA; without it they are skipped, not failed."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# --- data -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def cell_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real data set of synthetic cells as WebDataset shards (prepare's own CLI path)."""
    from unetdist.prepare import main as prepare_main

    out = tmp_path_factory.mktemp("cells")
    code = prepare_main(
        ["--synthetic", "16", "--image-size", "128", "--tile", "64", "--shard-size", "16", "--out", str(out)]
    )
    assert code == 0
    return out


# --- running the real entry point -----------------------------------------------


def tiny_run_overrides(shards: Path, output_dir: Path, tracking_uri: str) -> list[str]:
    """Overrides for a tiny real CPU training run of the padded preset."""
    return [
        f"data.root={shards}",
        "data.tile_size=64",
        "data.num_workers=1",
        "model.preset=padded",
        "model.base_width=8",
        "model.depth=3",
        "optim.lr=0.003",
        "optim.warmup_steps=10",
        "train.global_batch_size=8",
        "train.log_every=10",
        "train.progress=false",
        f"train.output_dir={output_dir}",
        f"tracking.tracking_uri={tracking_uri}",
        "tracking.experiment=tests",
    ]


def train_tiny_on(data_overrides: list[str], output_dir: Path, *more: str):
    """A real single-process ``python -m unetdist.train`` of a tiny model on the data the overrides
    name (32-px tiles, batch 4, no tracking): the completed process, output in its stderr."""
    import subprocess
    import sys

    tiny = [
        "data.tile_size=32", "data.num_workers=1", "model.base_width=4", "model.depth=2",
        "train.global_batch_size=4", "train.log_every=5", "train.progress=false", "checkpoint.every=0",
        f"train.output_dir={output_dir}", "tracking.enabled=false",
    ]  # fmt: skip
    return subprocess.run([sys.executable, "-m", "unetdist.train", *data_overrides, *tiny, *more],
                          capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)


def balls_on_noise(seed: int, shape: tuple[int, int, int], cells: int, radii: tuple[float, float], dtype):
    """A volume of bright balls (touching where they meet) on noise, of ``dtype``, and its instance
    ids (uint16): ``cells`` balls of radius drawn from ``radii``, centred anywhere in ``shape``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    zz, yy, xx = np.indices(shape)
    ids = np.zeros(shape, np.uint16)
    for cell in range(1, cells + 1):
        centre = rng.uniform((0, 0, 0), shape)
        radius = rng.uniform(*radii)
        ids[(zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 < radius**2] = cell
    image = np.clip(40 + 110 * (ids > 0) + rng.normal(0, 25, shape), 0, 255).astype(dtype)
    return image, ids


def global_batches(data, world_size: int, workers: int, steps: int, in_channels: int = 1, seed: int = 5) -> list[dict]:
    """The first ``steps`` global batches (8 samples) of volumes from ``data`` (a DataConfig) at
    ``world_size`` ranks of ``workers`` workers each, the ranks' micro-batches concatenated."""
    import dataclasses

    import torch

    from unetdist.data import build_train_loader

    loaders = [
        iter(build_train_loader(dataclasses.replace(data, num_workers=workers), rank=rank, world_size=world_size,
                                seed=seed, micro_batch_size=8 // world_size, global_batch_size=8,
                                in_channels=in_channels, num_classes=2, use_weight_map="false", spatial_dims=3))
        for rank in range(world_size)
    ]  # fmt: skip
    out = []
    for _ in range(steps):
        parts = [next(loader) for loader in loaders]
        out.append({name: torch.cat([part[name] for part in parts]) for name in ("image", "mask")}
                   | {"key": [key for part in parts for key in part["key"]]})  # fmt: skip
    return out


def recorded_keys(output_dir: Path) -> dict[int, list[str]]:
    """step -> the sorted sample keys of that global step, over all ranks (train.record_samples=true)."""
    import json

    steps: dict[int, list[str]] = {}
    for path in (output_dir / "samples").glob("rank-*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            steps.setdefault(record["step"], []).extend(record["keys"])
    return {step: sorted(keys) for step, keys in steps.items()}


# --- Slurm ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A real 2-node Slurm cluster (n1, n2: two slurmd on this machine) shared by the session.

    Installs slurm-wlm and munge when missing (root; ~10 s once), starts in ~1-2 s. Skipped,
    not failed, where Slurm can be neither found nor installed (not root).
    """
    try:
        ensure_packages()
    except SlurmUnavailable as err:
        pytest.skip(str(err))
    state_dir = tmp_path_factory.mktemp("slurm")
    if len(str(state_dir)) > 60:  # munge's socket path must stay under ~100 characters
        state_dir = Path(tempfile.mkdtemp(prefix="unetdist-slurm-"))
    with SlurmCluster(state_dir, nodes=2) as cluster:
        yield cluster


# --- S3 -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """The session's one real S3 server (moto behind tests/services/s3_faults.py), started in ~1 s.

    While it runs, the process environment points S3 clients at it (``S3Server.env``:
    AWS_ENDPOINT_URL, dummy keys, region, AWS_ALLOW_HTTP, S3_FAULTS_FILE, S3_REQUESTS_LOG), so
    boto3 and obstore need no arguments. Buckets stay for the session; use ``s3`` in tests.
    """
    with S3Server(tmp_path_factory.mktemp("s3")) as server, pytest.MonkeyPatch.context() as mp:
        for key, value in server.env.items():
            mp.setenv(key, value)
        yield server


@pytest.fixture
def s3(s3_server: S3Server) -> Iterator[S3Server]:
    """The session's S3 server with no faults and an empty request log, before and after the test."""
    s3_server.set_faults()
    s3_server.clear_requests()
    yield s3_server
    s3_server.set_faults()
    s3_server.clear_requests()
