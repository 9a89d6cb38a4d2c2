"""Training data from a plain HTTP server (a static file server, as a web server or CDN serves a
data set): a prepared folder at ``http://127.0.0.1:PORT`` reads as it does locally, shards by
ranged GETs through their indexes, and a missing file is named and not retried."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from services.http_files import HttpFiles

from unetdist.config import DataConfig
from unetdist.data import build_train_loader, remote
from unetdist.data.prepare import prepare_dataset
from unetdist.data.samples import DataError
from unetdist.data.synthetic import write_synthetic

ARGS = dict(rank=0, world_size=1, seed=4, global_batch_size=4, micro_batch_size=4, in_channels=1, num_classes=2,
            use_weight_map=True)  # fmt: skip


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> tuple[Path, HttpFiles]:
    out = tmp_path_factory.mktemp("http-data")
    images, masks = write_synthetic(out, count=4, image_size=96, seed=1)
    prepare_dataset(images, masks, out / "tar", tile_size=32, shard_size=5, val_fraction=0.25, seed=0)
    with HttpFiles(out) as server:
        yield out / "tar", server


def test_a_data_set_on_an_http_server_reads_as_it_does_locally(served):
    local, server = served
    data = DataConfig(root=str(local), tile_size=32, num_workers=2, augment=True, readahead_mb=1.0)
    epoch = build_train_loader(data, **ARGS).samples_per_epoch // ARGS["micro_batch_size"]
    expected = iter(build_train_loader(data, **ARGS))
    got = iter(build_train_loader(DataConfig(**{**data.__dict__, "root": f"{server.url}/tar"}), **ARGS))
    for _ in range(epoch + 1):
        a, b = next(got), next(expected)
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])
    shard_gets = [(path, ranged) for method, path, ranged in server.requests if method == "GET" and path.endswith(".tar")]
    assert shard_gets and all(ranged.startswith("bytes=") for _, ranged in shard_gets), "shards: ranged GETs only"


def test_a_missing_file_on_an_http_server_is_named_and_not_retried(served):
    _, server = served
    with pytest.raises(DataError, match=re.escape(server.url) + r"/tar/nowhere\.tar bytes 0-99: 404: .*\(not retried\)"):
        remote.read_ranges(f"{server.url}/tar/nowhere.tar", [(0, 100)])
    assert sum(path == "/tar/nowhere.tar" for _, path, _ in server.requests) == 1
