"""Training data in Azure Blob Storage (az://), from a real server: Azurite, Microsoft's emulator,
on 127.0.0.1. ``prepare --out az://...`` writes the data set there; the loader's batches from it
equal the local ones sample by sample and span by span through the node cache, in workers whose
forkserver is older than the emulator's environment; a missing blob is named and not retried. (The S3 server tests, tests/test_remote_data.py, cover the rest of the
reader, which is the same code for every store.)"""

from __future__ import annotations

import dataclasses
import multiprocessing.forkserver
from pathlib import Path

import pytest
import torch
from services.azurite import Azurite, azurite_command

from unetdist.config import DataConfig
from unetdist.data import build_train_loader, remote
from unetdist.data.samples import DataError
from unetdist.prepare import main

CONTAINER = "cells"
TINY = ["--synthetic", "4", "--image-size", "96", "--tile", "32", "--shard-size", "5", "--val-fraction", "0.25"]
ARGS = dict(rank=0, world_size=1, seed=3, global_batch_size=4, micro_batch_size=4, in_channels=1, num_classes=2,
            use_weight_map=True)  # fmt: skip


@pytest.fixture(scope="module")
def azure(tmp_path_factory) -> Azurite:
    if azurite_command() is None:
        pytest.skip("Azurite (npm) is not installed: launch/install.sh installs it where npm exists")
    # the workers' forkserver started before the emulator's environment was set (as when another
    # test module of this process started it first): the workers must see the loader's environment
    multiprocessing.forkserver.ensure_running()
    with Azurite(tmp_path_factory.mktemp("azurite")) as server, pytest.MonkeyPatch.context() as env:
        for key, value in server.env.items():
            env.setenv(key, value)
        server.create_container(CONTAINER)
        yield server


@pytest.fixture(scope="module")
def data_sets(azure, tmp_path_factory) -> tuple[Path, str]:
    """The same data set prepared into a local folder and, by ``prepare --out az://``, into the container."""
    local = tmp_path_factory.mktemp("local")
    url = f"az://{CONTAINER}/prepared"
    assert main([*TINY, "--out", str(local)]) == 0
    assert main([*TINY, "--out", url]) == 0
    return local, url


def batches(data: DataConfig, count: int) -> list[tuple[list[str], torch.Tensor]]:
    loader = iter(build_train_loader(data, **ARGS))
    return [(batch["key"], batch["image"]) for batch in (next(loader) for _ in range(count))]


def test_batches_from_azure_blob_equal_local_sample_by_sample_and_by_span(data_sets, tmp_path):
    local, url = data_sets
    assert remote.exists(f"{url}/dataset.json") and remote.exists(f"{url}/train-000000.tar.index.json")
    base = DataConfig(root=str(local), tile_size=32, num_workers=2, augment=True, readahead_mb=1.0)
    epoch = build_train_loader(base, **ARGS).samples_per_epoch // ARGS["micro_batch_size"]
    reference = batches(base, 2 * epoch)
    sample_by_sample = dataclasses.replace(base, root=url)
    by_span = dataclasses.replace(sample_by_sample, cache_dir=str(tmp_path / "cache"), cache_limit_gb=0.5,
                                  fetch_span_mb=0.04)  # fmt: skip
    for data in (sample_by_sample, by_span):
        got = batches(data, 2 * epoch)
        assert [keys for keys, _ in got] == [keys for keys, _ in reference]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, reference, strict=True))
    assert list((tmp_path / "cache").rglob("u*-i*-n*")), "the node cache holds spans"


def test_a_missing_blob_is_named_and_not_retried(azure):
    with pytest.raises(DataError, match=rf"az://{CONTAINER}/nowhere/x\.tar bytes 0-99: 404: .*\(not retried\)"):
        remote.read_ranges(f"az://{CONTAINER}/nowhere/x.tar", [(0, 100)])
