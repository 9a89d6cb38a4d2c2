"""Training data from a real S3 server (moto on 127.0.0.1, faults injected): remote equals local,
resume across rank counts, a node cache that never exceeds its limit, retries and named errors."""

from __future__ import annotations

import dataclasses
import itertools
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from unetdist.config import ConfigError, DataConfig
from unetdist.data import build_train_loader, remote
from unetdist.data.node_cache import NodeCache, Schedule, entry_name
from unetdist.data.prepare import prepare_dataset
from unetdist.data.samples import DataError
from unetdist.data.sequence import Blocks, GlobalSequence
from unetdist.data.sources.tar_index import index_tar
from unetdist.data.synthetic import write_synthetic

TILE, GLOBAL, MICRO = 32, 6, 1
ARGS = dict(seed=3, global_batch_size=GLOBAL, micro_batch_size=MICRO, in_channels=1, num_classes=2, use_weight_map=True)
BUCKET = "unetdist-remote"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """Uneven tar shards (5 samples each, 45 train tiles) with their indexes, prepared locally."""
    out = tmp_path_factory.mktemp("remote-data")
    images, masks = write_synthetic(out, count=6, image_size=96, seed=0)
    prepare_dataset(images, masks, out / "tar", tile_size=TILE, shard_size=5, val_fraction=0.2, seed=0)
    assert sorted(out.glob("tar/train-*.tar.index.json")), "prepare writes an index beside each shard"
    return out / "tar"


@pytest.fixture
def bucket_root(s3, data_root) -> str:
    """The same folder in the S3 server (uploaded once per session)."""
    url = f"s3://{BUCKET}/cells"
    if not remote.exists(f"{url}/dataset.json"):
        s3.create_bucket(BUCKET)
        for path in sorted(data_root.iterdir()):
            if path.name != "dataset.json":
                remote.upload_file(path, f"{url}/{path.name}")
        remote.upload_file(data_root / "dataset.json", f"{url}/dataset.json")
    s3.clear_requests()
    return url


def config(root, **changes) -> DataConfig:
    base = DataConfig(root=str(root), tile_size=TILE, num_workers=0, augment=True, augment_intensity=True,
                      remote_attempts=3, readahead_mb=1.0)
    return dataclasses.replace(base, **changes)


def global_steps(data: DataConfig, world_size: int, steps: int, start_sample: int = 0) -> list[dict]:
    """Per global step: keys and images of all ranks' micro-batches, in rank order. All ranks'
    loaders start their workers before the first batch is read (they start together)."""
    iterators = [
        iter(build_train_loader(data, rank=rank, world_size=world_size, start_sample=start_sample, **ARGS))
        for rank in range(world_size)
    ]
    accumulation = GLOBAL // world_size // MICRO
    per_rank = [[[next(batches) for _ in range(accumulation)] for _ in range(steps)] for batches in iterators]
    out = []
    for step in range(steps):
        micro = [batch for rank in range(world_size) for batch in per_rank[rank][step]]
        out.append({"key": [k for b in micro for k in b["key"]], "image": torch.cat([b["image"] for b in micro])})
    return out


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x["key"] == y["key"]
        assert torch.equal(x["image"], y["image"])


def test_remote_batches_equal_local_at_1_2_3_ranks(bucket_root, data_root, s3):
    reference = global_steps(config(data_root), 1, 4)
    for world_size in (1, 2, 3):
        assert_same(global_steps(config(bucket_root, num_workers=2), world_size, 4), reference)
    gets = [row for row in s3.requests("GET") if row[1].split("?")[0].endswith(".tar")]
    assert gets and all(row[2] != "-" for row in gets), "samples are read by ranged GETs only"


def test_resume_from_s3_on_another_rank_count_equals_uninterrupted(bucket_root, data_root):
    """Steps 0-2 at 2 ranks, stopped mid-epoch (7 steps per epoch), resumed at 3 ranks: the
    uninterrupted sequence, into the second epoch."""
    reference = global_steps(config(data_root), 1, 9)
    first = global_steps(config(bucket_root, num_workers=2), 2, 3)
    resumed = global_steps(config(bucket_root, num_workers=2), 3, 6, start_sample=3 * GLOBAL)
    assert_same(first + resumed, reference)


def test_a_block_of_consecutive_samples_is_one_ranged_get(bucket_root, data_root, s3):
    from unetdist.data.samples import SampleChecks
    from unetdist.data.sources import open_source

    checks = SampleChecks(TILE, 1, 2, True)
    source = open_source(config(bucket_root), "train", checks)
    local = open_source(config(data_root), "train", checks)
    source.read(1, [0])  # the shard's index
    s3.clear_requests()
    samples = source.read(1, [0, 1, 2, 3, 4])
    gets = s3.requests("GET")
    assert len(gets) == 1 and gets[0][1].endswith("train-000001.tar"), gets
    start, end = map(int, gets[0][2].removeprefix("bytes=").split("-"))
    table = index_tar(str(data_root / "train-000001.tar")).samples
    assert (start, end + 1) == (table[0].span[0], table[4].span[1])  # from the first member to the last
    for got, expected in zip(samples, local.read(1, [0, 1, 2, 3, 4]), strict=True):
        assert got.key == expected.key and np.array_equal(got.image, expected.image)


def test_a_cache_that_holds_the_split_brings_each_span_once_per_node_in_one_get(bucket_root, data_root, s3, tmp_path):
    """2 ranks x 2 workers share a node cache that holds the split: the first epoch fetches each span
    of a shard (data.fetch_span_mb) by one GET, once for the node; the second (its readers stop
    prefetching once the cache is warm) fetches nothing; the batches are the local ones."""
    span = 40 * 1024  # 2-3 samples of 13 KB: 2 spans per shard
    data = config(bucket_root, num_workers=2, cache_dir=str(tmp_path / "cache"), cache_limit_gb=0.5,
                  fetch_span_mb=span / 2**20)
    steps = -(-45 // GLOBAL) * 2
    assert_same(global_steps(data, 2, steps), global_steps(config(data_root), 1, steps))
    spans = {(path.name, sample.span[0] // span) for path in data_root.glob("train-*.tar")
             for sample in index_tar(str(path)).samples}
    got = sorted((row[1].rsplit("/", 1)[1], *map(int, row[2].removeprefix("bytes=").split("-")))
                 for row in s3.requests("GET") if row[1].split("?")[0].endswith(".tar"))
    assert len(got) == len(spans) < 45, (len(got), len(spans))
    assert {(name, start // span) for name, start, _ in got} == spans
    assert all(a[0] != b[0] or a[2] < b[1] for a, b in itertools.pairwise(got)), "no byte is fetched twice"


def test_readahead_stops_once_its_prefetches_find_everything_in_place():
    from unetdist.data.readahead import QUIET_TO_STOP, Readahead

    brought = {0: 100, 1: 0, 2: 100}  # micro-batch -> bytes its prefetch brought; later ones: 0
    readahead = Readahead(lambda q: brought.get(q, 0), iter(range(1000)), window_bytes=1000)
    taken = [readahead.take(q) for q in range(3 + QUIET_TO_STOP + 2)]
    assert taken[: 3 + QUIET_TO_STOP] == [100, 0, 100] + [0] * QUIET_TO_STOP  # a quiet run restarts at 100
    assert taken[3 + QUIET_TO_STOP :] == [None, None], "stopped: the stream reads itself"


def test_injected_503s_are_retried_and_the_batches_are_unchanged(bucket_root, data_root, s3):
    reference = global_steps(config(data_root), 1, 2)
    s3.set_faults(fail_next=3, only_get=True)
    assert_same(global_steps(config(bucket_root), 1, 2), reference)
    assert [row[3] for row in s3.requests("GET")].count("503") == 3


def loader_with_indexes_read(data: DataConfig, micro_batch_size: int = MICRO):
    """A training loader whose shard indexes are already read (faults then hit sample reads only)."""
    loader = build_train_loader(data, rank=0, world_size=1, **{**ARGS, "micro_batch_size": micro_batch_size})
    source = loader.stream.source
    for unit in range(len(source.counts)):
        source.read(unit, [0])
    return loader


@pytest.mark.parametrize(
    "counter, expected",
    [("truncate_next", r"body cut short"), ("drop_next", r"connection error"), ("fail_next", r"500")],
    ids=["truncated body", "dropped connection", "500s"],
)
def test_faults_after_the_retries_name_url_range_and_attempts(bucket_root, s3, counter, expected):
    data = config(bucket_root, remote_attempts=2)
    loader = loader_with_indexes_read(data)
    s3.set_faults(**{counter: 100}, fail_status=500, only_get=True)
    with pytest.raises(DataError, match=rf"s3://{BUCKET}/cells/train-\d+\.tar bytes \d+-\d+: failed after 2 attempts, "
                                        rf"last: {expected}"):
        next(iter(loader))
    s3.set_faults()
    # one attempt per request: the one faulted request fails whichever of the concurrent requests it hits
    skipping = loader_with_indexes_read(dataclasses.replace(data, on_error="skip", remote_attempts=1),
                                        micro_batch_size=GLOBAL)
    s3.set_faults(**{counter: 1}, fail_status=500, only_get=True)
    batches = iter(skipping)
    for _ in range(3):
        next(batches)
    assert skipping.skipped_samples >= 1  # that request's samples were skipped and counted


@pytest.fixture(scope="module")
def zarr_roots(tmp_path_factory) -> dict[str, Path]:
    """Pre-tiled (zstd chunks) and whole-image Zarr stores of the same images."""
    out = tmp_path_factory.mktemp("remote-zarr")
    images, masks = write_synthetic(out, count=6, image_size=96, seed=0)
    common = dict(tile_size=TILE, val_fraction=0.2, seed=0, output_format="zarr")
    prepare_dataset(images, masks, out / "tiles", zarr_codec="zstd", **common)
    prepare_dataset(images, masks, out / "whole", whole_images=True, **common)
    return {"tiles": out / "tiles", "whole": out / "whole"}


@pytest.mark.parametrize("layout", ["tiles", "whole"])
def test_zarr_stores_read_from_s3_equal_local(zarr_roots, s3, layout, tmp_path):
    local = zarr_roots[layout]
    url = f"s3://{BUCKET}/zarr-{layout}"
    s3.create_bucket(BUCKET)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        remote.upload_file(path, f"{url}/{path.relative_to(local)}")
    zarr_config = dict(format="zarr", block_size=2)
    reference = global_steps(config(local, **zarr_config), 1, 3)
    cached = config(url, **zarr_config, num_workers=2, cache_dir=str(tmp_path / "cache"))
    assert_same(global_steps(cached, 2, 3), reference)
    if layout == "tiles":
        assert any((tmp_path / "cache").rglob("u0-i*-image")), "chunks were cached by key"
    else:  # whole images: chunks through the node cache, so a second pass fetches none
        assert any((tmp_path / "cache").rglob("z-*")), "chunks were cached"
        assert any("/c/" in row[1] for row in s3.requests("GET")), "the first pass fetched chunks"
        s3.clear_requests()
        assert_same(global_steps(cached, 1, 3), reference)
        chunk_gets = [row for row in s3.requests("GET") if "/c/" in row[1]]  # v3 chunk keys: c/<i>/<j>
        assert not chunk_gets, chunk_gets[:3]


def test_a_missing_index_or_shard_is_named_and_not_retried(bucket_root, s3):
    pattern = f"{bucket_root}/train-000000.tar::s3://{BUCKET}/nope/train-000009.tar"
    with pytest.raises(DataError, match=rf"shard s3://{BUCKET}/nope/train-000009.tar: no index .*index.json; remote "
                                        r"shards are read by their index: write it once with `python -m unetdist.prepare index"):
        build_train_loader(config(bucket_root, train_shards=pattern), rank=0, world_size=1, **ARGS)
    # an index whose shard is gone: the sample read is a 404, named, not retried
    index = remote.read_bytes(f"{bucket_root}/train-000000.tar.index.json")
    remote.write_bytes(f"s3://{BUCKET}/nope/train-000009.tar.index.json", index)
    loader = build_train_loader(config(bucket_root, train_shards=f"s3://{BUCKET}/nope/train-000009.tar"),
                                rank=0, world_size=1, **ARGS)
    s3.clear_requests()  # after the start-up, whose weight-map line reads the first sample too
    with pytest.raises(DataError, match=rf"s3://{BUCKET}/nope/train-000009.tar bytes \d+-\d+: 404: .*\(not retried\)"):
        next(iter(loader))
    assert [row[3] for row in s3.requests("GET")].count("404") == 1


def test_fork_workers_and_missing_credentials_are_refused_at_start(bucket_root, monkeypatch):
    with pytest.raises(ValueError, match="worker_start_method=fork with remote data .* set data.worker_start_method=forkserver"):
        build_train_loader(config(bucket_root, num_workers=2, worker_start_method="fork"), rank=0, world_size=1, **ARGS)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(DataError, match=f"s3://{BUCKET}: no S3 credentials: set AWS_ACCESS_KEY_ID"):
        build_train_loader(config(bucket_root), rank=0, world_size=1, **ARGS)


def test_node_cache_never_exceeds_its_limit_and_serves_the_second_epoch(bucket_root, data_root, s3, tmp_path):
    train_bytes = sum(p.stat().st_size for p in data_root.glob("train-*.tar"))
    limit = int(train_bytes * 0.5)
    cache_dir = tmp_path / "cache"
    data = config(bucket_root, num_workers=2, cache_dir=str(cache_dir), cache_limit_gb=limit / 2**30,
                  readahead_mb=limit / 2**20 / 8)
    peak, stop = [0], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            total = sum(f.stat().st_size for f in cache_dir.rglob("*") if f.is_file() and not f.name.startswith(".usage")
                        and f.name != ".lock") if cache_dir.exists() else 0
            peak[0] = max(peak[0], total)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        steps = -(-45 // GLOBAL) * 2
        assert_same(global_steps(data, 1, steps), global_steps(config(data_root), 1, steps))
    finally:
        stop.set()
        watcher.join()
    assert 0 < peak[0] <= limit
    assert any(cache_dir.rglob("u*-i*-s")), "samples were cached"
    # a cache smaller than what the readers hold ahead is refused with the numbers
    with pytest.raises(ConfigError, match=r"data.cache_limit_gb=.* is smaller than this node's readahead window: "
                                          r"1 rank\(s\) x 2 worker\(s\) x data.readahead_mb=64"):
        build_train_loader(dataclasses.replace(data, readahead_mb=64.0), rank=0, world_size=1, **ARGS)


def test_next_use_is_the_first_position_at_or_after_now_that_reads_the_sample():
    for block_size in (1, 3):
        sequence = GlobalSequence(Blocks.from_counts([5, 7, 4], block_size), seed=3, global_batch_size=4, epoch_end="pad")
        length = sequence.epoch_length
        uses: dict[tuple[int, int], list[int]] = {}
        for epoch in range(3):
            positions = np.arange(epoch * length, (epoch + 1) * length)
            _, units, indices = sequence.locate(positions)
            for position, unit, index in zip(positions, units, indices, strict=True):
                if position % length < 16:  # not the epoch's padding
                    uses.setdefault((int(unit), int(index)), []).append(int(position))
        units = np.array([key[0] for key in uses])
        indices = np.array([key[1] for key in uses])
        for now in (0, 5, length - 1, length + 3):
            expected = [min(p for p in uses[key] if p >= now) for key in uses]
            assert sequence.next_use(units, indices, now).tolist() == expected


def test_node_cache_evicts_the_entry_needed_furthest_ahead_and_never_a_protected_one(tmp_path):
    uses = {0: 50, 1: 10, 2: 90, 3: 30}  # sample index -> next use

    def next_use(units, indices, now):
        return np.array([uses[int(i)] for i in indices])

    cache = NodeCache(str(tmp_path), "split", limit_bytes=300)
    cache.schedule = Schedule(next_use, now=0, protect=40)
    assert cache.put({entry_name(0, i, "s"): bytes(100) for i in (0, 1, 2)}) == 3
    assert cache.put({entry_name(0, 3, "s"): bytes(100)}) == 1  # evicts sample 2 (use 90)
    assert sorted(os.listdir(cache.folder)) == [entry_name(0, i, "s") for i in (0, 1, 3)]
    uses.update({0: 20, 3: 35})  # now all are within the protected window: nothing can go
    assert cache.put({entry_name(0, 2, "s"): bytes(100)}) == 0
    assert sorted(os.listdir(cache.folder)) == [entry_name(0, i, "s") for i in (0, 1, 3)]


def test_a_span_entry_is_needed_when_its_first_sample_to_come_is(tmp_path):
    """A span of samples 0-2 is next used at 20 (sample 2), so it stays and the lone sample 3 (60) goes."""
    uses = {0: 70, 1: 80, 2: 20, 3: 60, 4: 5}

    def next_use(units, indices, now):
        return np.array([uses[int(i)] for i in indices])

    cache = NodeCache(str(tmp_path), "split", limit_bytes=300)
    cache.schedule = Schedule(next_use, now=0, protect=10)
    assert cache.put({entry_name(0, 0, "n3"): bytes(200), entry_name(0, 3, "s"): bytes(100)}) == 2
    assert cache.put({entry_name(0, 4, "s"): bytes(100)}) == 1
    assert sorted(os.listdir(cache.folder)) == [entry_name(0, 0, "n3"), entry_name(0, 4, "s")]


SECRET = "unetdist-test-secret-4f2b9c"  # moto accepts any secret: it must appear nowhere we write


def test_training_from_s3_resumes_on_another_rank_count_and_writes_no_credential(cell_shards, s3, tmp_path,
                                                                                   monkeypatch):
    """A real run from s3://: stopped after 4 steps at 2 ranks (torchrun), resumed at 1 rank to 8 steps;
    its steps hold the samples of the uninterrupted sequence over the local shards, and the secret key
    is in no file, param or log."""
    import subprocess
    import sys

    from conftest import REPO_ROOT, recorded_keys, tiny_run_overrides

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    url = f"s3://{BUCKET}/cell-shards"
    s3.create_bucket(BUCKET)
    for path in sorted(cell_shards.glob("*.tar*")) + [cell_shards / "dataset.json"]:
        remote.upload_file(path, f"{url}/{path.name}")

    def run(root: str, out: Path, steps: int, nproc: int, *extra: str) -> str:
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                    if nproc > 1 else [sys.executable])
        args = tiny_run_overrides(cell_shards, out, f"sqlite:///{out.parent / (out.name + '.db')}")
        args = [a for a in args if not a.startswith("data.root=")] + [
            f"data.root={root}", "data.num_workers=1", f"data.cache_dir={tmp_path / 'cache'}", "data.cache_limit_gb=1",
            "data.readahead_mb=8", "train.val_every=0", "checkpoint.every=4", "tracking.log_model=false",
            "train.record_samples=true", "optim.schedule=constant", f"train.max_steps={steps}", *extra]
        result = subprocess.run([*launcher, "-m", "unetdist.train", *args], capture_output=True, text=True,
                                timeout=300, cwd=REPO_ROOT)
        assert result.returncode == 0, result.stderr[-4000:]
        return result.stdout + result.stderr

    local = DataConfig(root=str(cell_shards), tile_size=64, num_workers=0)
    batches = iter(build_train_loader(local, rank=0, world_size=1, seed=0, global_batch_size=8, micro_batch_size=8,
                                      in_channels=1, num_classes=2, use_weight_map=True))
    uninterrupted = {step: sorted(next(batches)["key"]) for step in range(1, 9)}  # recorded after the step
    resumed = tmp_path / "s3"
    logs = run(url, resumed, 4, 2) + run(url, resumed, 8, 1, "--resume", "auto")
    assert recorded_keys(resumed) == uninterrupted
    assert "saved by 2 ranks" in logs
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "cache" not in p.parts]
    leaks = [p for p in written if SECRET.encode() in p.read_bytes()]
    assert not leaks and SECRET not in logs, f"the secret key was written to {leaks[:3]}"


def test_a_node_cache_that_cannot_be_written_is_skipped_with_a_warning(tmp_path, caplog):
    cache = NodeCache(str(tmp_path), "split", limit_bytes=1000)
    cache.folder.rmdir()
    cache.folder.write_text("")  # the folder gone, a file in its place: every write fails, even as root
    assert cache.put({entry_name(0, 0, "s"): bytes(10)}) == 0
    assert "cannot write" in caplog.text
