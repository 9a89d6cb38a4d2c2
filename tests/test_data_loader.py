"""Loader: exact global sequence over ranks x workers, resume, pad/drop, skip, zarr under fork/spawn."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from unetdist.config import DataConfig
from unetdist.data import build_train_loader, build_val_loader, to_model_input
from unetdist.data.prepare import prepare_dataset
from unetdist.data.samples import DataError
from unetdist.data.synthetic import write_synthetic

TILE, GLOBAL, MICRO = 32, 8, 2
ARGS = dict(seed=3, global_batch_size=GLOBAL, micro_batch_size=MICRO, in_channels=1, num_classes=2, use_weight_map=True)


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    """Uneven tar shards (5 samples each, 45 train tiles) and the same tiles in a Zarr store."""
    out = tmp_path_factory.mktemp("data")
    images, masks = write_synthetic(out, count=6, image_size=96, seed=0)
    prepare_dataset(images, masks, out / "tar", tile_size=TILE, shard_size=5, val_fraction=0.2, seed=0)
    prepare_dataset(images, masks, out / "zarr", tile_size=TILE, val_fraction=0.2, seed=0, output_format="zarr")
    return {"webdataset": out / "tar", "zarr": out / "zarr", "masks": masks}


def config(roots, fmt: str, **changes) -> DataConfig:
    base = DataConfig(format=fmt, root=str(roots[fmt]), tile_size=TILE, num_workers=0, block_size=2,
                      augment=True, augment_intensity=True, augment_elastic=True, augment_noise_std=0.02)
    return dataclasses.replace(base, **changes)


def global_steps(data: DataConfig, world_size: int, steps: int, start_sample: int = 0, context=None) -> list[dict]:
    """Per global step: keys and images of all ranks' micro-batches, in rank order."""
    per_rank = []
    for rank in range(world_size):
        loader = build_train_loader(data, rank=rank, world_size=world_size, start_sample=start_sample,
                                    multiprocessing_context=context, **ARGS)
        accumulation = GLOBAL // world_size // MICRO
        batches = iter(loader)
        per_rank.append([[next(batches) for _ in range(accumulation)] for _ in range(steps)])
    out = []
    for step in range(steps):
        micro = [batch for rank in range(world_size) for batch in per_rank[rank][step]]
        out.append({"key": [k for b in micro for k in b["key"]], "image": torch.cat([b["image"] for b in micro])})
    return out


@pytest.mark.parametrize("fmt", ["webdataset", "zarr"])
def test_sequence_and_augmentation_independent_of_ranks_and_workers(roots, fmt):
    reference = global_steps(config(roots, fmt), 1, 3)
    for world_size, workers in ((2, 0), (2, 2), (1, 4)):
        other = global_steps(config(roots, fmt, num_workers=workers), world_size, 3)
        for a, b in zip(reference, other, strict=False):
            assert a["key"] == b["key"]
            assert torch.equal(a["image"], b["image"]), (world_size, workers)


def test_workers_hand_over_groups_of_prefetch_factor_micro_batches_in_order(roots):
    """A worker's item holds data.prefetch_factor micro-batches in one shared block; unpacked,
    the sequence is the in-process one, also resumed mid-group and with several workers."""
    data = config(roots, "webdataset", augment_elastic=False)
    for start_sample in (0, GLOBAL):
        reference = global_steps(data, 2, 4, start_sample=start_sample)
        grouped = global_steps(dataclasses.replace(data, num_workers=2, prefetch_factor=3), 2, 4, start_sample=start_sample)
        for a, b in zip(reference, grouped, strict=True):
            assert a["key"] == b["key"]
            assert torch.equal(a["image"], b["image"])
    loader = build_train_loader(dataclasses.replace(data, num_workers=1, prefetch_factor=3), rank=0, world_size=1, **ARGS)
    assert loader.loader.prefetch_factor == 1  # one item (3 micro-batches) in flight per worker
    batches = iter(loader)
    first = [next(batches) for _ in range(4)]
    assert [b["image"].untyped_storage().data_ptr() for b in first[:3]] == [first[0]["image"].untyped_storage().data_ptr()] * 3
    assert loader.state_dict()["start_sample"] == GLOBAL  # counted as handed out, not as received


def test_each_sample_once_per_epoch_two_ranks_two_workers(roots):
    data = config(roots, "webdataset", num_workers=2, augment=False, augment_elastic=False,
                  augment_intensity=False, augment_noise_std=0.0)
    loader = build_train_loader(data, rank=0, world_size=2, **ARGS)
    steps = loader.steps_per_epoch
    assert loader.samples_per_epoch == 48  # 45 padded to 6 steps of 8
    for epoch in range(2):
        keys = [k for step in global_steps(data, 2, steps, start_sample=epoch * 48) for k in step["key"]]
        counts = Counter(keys)
        assert len(counts) == 45 and sum(counts.values()) == 48
        assert sorted(counts.values())[-3:] <= [2, 2, 2]
    dropped = dataclasses.replace(data, epoch_end="drop")
    assert build_train_loader(dropped, rank=1, world_size=2, **ARGS).steps_per_epoch == 5


def test_resume_from_state_is_exact_and_elastic(roots):
    data = config(roots, "zarr")
    straight = global_steps(data, 2, 5)
    loader = build_train_loader(data, rank=0, world_size=2, **ARGS)
    batches = iter(loader)
    for _ in range(2 * 2):  # two steps of 2 micro-batches
        next(batches)
    state = loader.state_dict()
    assert state["start_sample"] == 2 * GLOBAL
    resumed_same = global_steps(data, 2, 3, start_sample=state["start_sample"])
    resumed_other = global_steps(data, 1, 3, start_sample=state["start_sample"])
    for a, b, c in zip(straight[2:], resumed_same, resumed_other, strict=False):
        assert a["key"] == b["key"] == c["key"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["image"], c["image"])
    fresh = build_train_loader(data, rank=0, world_size=2, **ARGS)
    fresh.load_state_dict(state)
    assert next(iter(fresh))["key"] == straight[2]["key"][:MICRO]


def test_device_augmentation_matches_worker_augmentation(roots):
    worker = global_steps(config(roots, "webdataset"), 1, 1)[0]
    compact = build_train_loader(config(roots, "webdataset", augment_on="device"), rank=0, world_size=1, **ARGS)
    batches = iter(compact)
    raw = [next(batches) for _ in range(GLOBAL // MICRO)]
    assert raw[0]["image"].dtype == torch.uint8 and "augment" in raw[0]
    converted = torch.cat([to_model_input(batch, "cpu")["image"] for batch in raw])
    torch.testing.assert_close(converted, worker["image"])


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_zarr_with_workers_under_fork_and_spawn(roots, context):
    data = config(roots, "zarr", num_workers=2, augment_elastic=False)
    reference = global_steps(dataclasses.replace(data, num_workers=0), 1, 2)
    assert [s["key"] for s in global_steps(data, 1, 2, context=context)] == [s["key"] for s in reference]
    val = build_val_loader(data, rank=0, world_size=1, micro_batch_size=4, in_channels=1, num_classes=2,
                           use_weight_map=True, multiprocessing_context=context)
    assert sum(len(batch["key"]) for batch in val) == 9


def test_val_split_exact_over_two_ranks_two_workers(roots):
    data = config(roots, "webdataset", num_workers=2)
    keys = []
    for rank in (0, 1):
        val = build_val_loader(data, rank=rank, world_size=2, micro_batch_size=3, in_channels=1, num_classes=2,
                               use_weight_map=True)
        keys += [k for batch in val for k in batch["key"]]
    assert len(keys) == len(set(keys)) == 9


def _break_zarr_chunk(store: Path) -> None:
    chunk = next(p for p in sorted((store / "train" / "image" / "c").rglob("*")) if p.is_file())
    chunk.write_bytes(b"not zstd" * 8)


def test_bad_zarr_chunk_raises_or_is_skipped_and_counted(tmp_path: Path, roots):
    import shutil

    root = tmp_path / "zarr"
    shutil.copytree(roots["zarr"], root)
    _break_zarr_chunk(root / "data.zarr")
    data = DataConfig(format="zarr", root=str(root), tile_size=TILE, num_workers=0, block_size=1)
    with pytest.raises(DataError, match=r"zarr store .*data.zarr/train sample #\d+ \(chunk 0\): cannot decode"):
        for _ in build_train_loader(data, rank=0, world_size=1, **ARGS):
            pass
    # prepare writes ~1 MiB chunks: all 45 tiny tiles share chunk 0, so skipping finds no good sample
    skipping = build_train_loader(dataclasses.replace(data, on_error="skip"), rank=0, world_size=1, **ARGS)
    with pytest.raises(DataError, match="every sample is bad"):
        next(iter(skipping))


def test_skip_fills_bad_slots_and_counts(tmp_path: Path, roots):
    import shutil

    root = tmp_path / "tar"
    shutil.copytree(roots["webdataset"], root)
    shard = sorted(root.glob("train-*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:4096])  # truncated: most of its 5 samples are gone
    data = DataConfig(root=str(root), tile_size=TILE, num_workers=0, on_error="skip")
    loader = build_train_loader(data, rank=0, world_size=1, **ARGS)
    batches = iter(loader)
    shapes = {tuple(next(batches)["image"].shape) for _ in range(loader.steps_per_epoch * GLOBAL // MICRO)}
    assert shapes == {(MICRO, 1, TILE, TILE)}
    assert 1 <= loader.skipped_samples <= 5 + 3
    with pytest.raises(DataError, match=rf"shard {shard}.*truncated"):
        for _ in build_train_loader(dataclasses.replace(data, on_error="raise"), rank=0, world_size=1, **ARGS):
            pass


def test_foreground_crops_are_centred_on_foreground(tmp_path: Path):
    images, masks = write_synthetic(tmp_path, count=2, image_size=96, seed=1)
    prepare_dataset(images, masks, tmp_path / "big", tile_size=64, val_fraction=0.0, seed=0)
    data = DataConfig(root=str(tmp_path / "big"), tile_size=16, num_workers=0, augment=False, foreground_fraction=1.0)
    loader = iter(build_train_loader(data, rank=0, world_size=1, **ARGS))
    for _ in range(4):
        assert all(int(mask[8, 8]) == 1 or int(mask.sum()) > 0 for mask in next(loader)["mask"])


def test_zarr_chunk_files_read_what_zarr_reads(roots):
    import numpy as np

    from unetdist.data.samples import SampleChecks
    from unetdist.data.sources.zarr_tiles import ZarrTiles

    tiles = ZarrTiles(roots["zarr"] / "data.zarr", "train", SampleChecks(TILE, 1, 2, True))
    tiles._open()
    assert all(files is not None for files in tiles._chunk_files.values())  # prepare's layout takes the fast path
    count = tiles.counts[0]
    runs = [(0, 1), (3, count - 2), (count - 1, count)]
    names = ["image", "mask", "weight"]
    for direct, through_zarr in zip(tiles._read_runs(runs), tiles._read_runs_with_zarr(runs, names), strict=True):
        for name in [*names, "origin"]:
            assert direct[name].dtype == through_zarr[name].dtype
            assert np.array_equal(direct[name], through_zarr[name])


@pytest.mark.parametrize(("fmt", "unit_name", "block_size"), [("webdataset", "shard", 1), ("zarr", "array", None)])
def test_open_source_returns_a_declared_source(roots, fmt, unit_name, block_size):
    import numpy as np

    from unetdist.data.samples import SampleChecks
    from unetdist.data.sources import Source, open_source

    source = open_source(config(roots, fmt), "train", SampleChecks(TILE, 1, 2, True))
    assert isinstance(source, Source) and source.unit_name == unit_name
    assert source.block_size == (block_size or source.chunk_tiles) and len(source.names) == len(source.counts)
    units, indices = np.array([0, 0]), np.array([1, 0])
    by_window = source.read_windows(units, indices, np.zeros((2, 1), np.uint64))  # stored tiles ignore the words
    assert [s.key for s in by_window] == [s.key for s in source.read(0, [1, 0])]


# ---------------------------------------------------------------- instance ids, prepare -> loader


def _raw_ids(roots, key: str, size: int, inset: int = 0):
    """The raw instance mask's window of a sample key (``inset`` px in from the tile's corner)."""
    import tifffile

    stem, top, left = re.fullmatch(r"(.+)_y(\d+)_x(\d+)", key).groups()
    ids = tifffile.imread(roots["masks"] / f"{stem}.tif")
    top, left = int(top) + inset, int(left) + inset
    return ids[top : top + size, left : left + size]


@pytest.mark.parametrize("fmt", ["webdataset", "zarr"])
def test_instance_ids_survive_prepare_and_auto_reads_them(roots, fmt, caplog):
    import logging

    from unetdist.data.samples import SampleChecks
    from unetdist.data.sources import mask_kind_of, open_source

    data = config(roots, fmt)
    assert data.mask_kind == "auto"
    assert mask_kind_of(data) == ("instances", f"data.mask_kind=auto: instances, from {roots[fmt] / 'dataset.json'}")
    source = open_source(data, "val", SampleChecks(TILE, 1, 2, True))  # auto in the checks: dataset.json says
    samples = [sample for unit, count in enumerate(source.counts) for sample in source.read(unit, list(range(count)))]
    assert len(samples) == 9
    for sample in samples:
        raw = _raw_ids(roots, sample.key, TILE)
        assert sample.instances.dtype == np.uint16 and np.array_equal(sample.instances, raw)
        assert np.array_equal(sample.mask, (raw > 0).astype(np.uint8))  # trained as foreground
    with caplog.at_level(logging.INFO, logger="unetdist.data.preflight"):
        batch = next(iter(build_train_loader(data, rank=0, world_size=1, **ARGS)))
    assert "instances" not in batch and set(batch["mask"].unique().tolist()) == {0, 1}
    (line,) = [message for message in caplog.messages if message.startswith("masks:")]
    assert line.startswith("masks: instance ids, trained as background / foreground") and "\n" not in line


@pytest.mark.parametrize(("fmt", "augment_on", "workers"), [("webdataset", "worker", 1), ("zarr", "device", 1),
                                                             ("webdataset", "device", 0)])  # fmt: skip
def test_val_batches_carry_the_ids_of_their_window(roots, fmt, augment_on, workers):
    data = config(roots, fmt, tile_size=16, augment_on=augment_on, num_workers=workers)  # centre 16 of 32
    val = build_val_loader(data, rank=0, world_size=1, micro_batch_size=4, in_channels=1, num_classes=2,
                           use_weight_map=True)  # fmt: skip
    seen = 0
    for batch in val:
        instances = batch["instances"]
        assert instances.dtype == torch.int32 and instances.shape == (len(batch["key"]), 16, 16)
        model_input = to_model_input(batch, "cpu")  # passes the ids through, untouched
        assert model_input["instances"] is instances
        for key, ids, mask in zip(batch["key"], instances, model_input["mask"], strict=True):
            raw = _raw_ids(roots, key, 16, inset=8)
            assert np.array_equal(ids.numpy(), raw) and np.array_equal(mask.numpy(), raw > 0)
            seen += 1
    assert seen == 9


def test_pack_and_unpack_hand_over_the_instance_ids():
    from unetdist.data.batching import BatchOptions, collate, pack, unpack
    from unetdist.data.samples import Sample

    ids = np.arange(36, dtype=np.uint16).reshape(6, 6)
    sample = Sample("k", "here", np.zeros((1, 6, 6), np.uint8), (ids > 0).astype(np.uint8), None, instances=ids)
    options = BatchOptions(4, "device", "zscore", "raise", 0.0, None, instances=True)
    batch = collate([sample, sample], [(1, 2), (0, 0)], options)
    assert batch["instances"].dtype == torch.int32 and np.array_equal(batch["instances"][0].numpy(), ids[1:5, 2:6])
    (unpacked,) = unpack(pack([batch]))
    assert torch.equal(unpacked["instances"], batch["instances"]) and torch.equal(unpacked["mask"], batch["mask"])
    assert "instances" not in collate([sample], [(0, 0)], dataclasses.replace(options, instances=False))


def test_mask_kind_of_older_data_sets_and_explicit_kinds(roots, tmp_path: Path):
    import json
    import shutil

    from unetdist.data.sources import mask_kind_of

    older = tmp_path / "older"  # a data set prepared before dataset.json said its mask kind: 0/1 masks
    images, masks = write_synthetic(tmp_path, count=6, image_size=64, seed=2)
    prepare_dataset(images, masks, older, tile_size=TILE, mask_kind="binary", val_fraction=0.2)
    meta = json.loads((older / "dataset.json").read_text())
    del meta["mask_kind"]
    (older / "dataset.json").write_text(json.dumps(meta))
    data = DataConfig(root=str(older), tile_size=TILE, num_workers=0)
    kind, origin = mask_kind_of(data)
    assert kind == "classes" and "names none (older)" in origin
    batch = next(iter(build_train_loader(data, rank=0, world_size=1, **{**ARGS, "use_weight_map": "auto"})))
    assert set(batch["mask"].unique().tolist()) == {0, 1}
    (older / "dataset.json").write_text(json.dumps({**meta, "mask_kind": "labels"}))
    with pytest.raises(ValueError, match=r"dataset.json: mask_kind='labels', expected one of classes, instances, binary; "):
        mask_kind_of(data)
    (older / "dataset.json").write_text("{")  # never a guess: a wrong kind fails every sample
    with pytest.raises(ValueError, match=r"dataset.json: cannot read it for data.mask_kind=auto"):
        mask_kind_of(data)
    shutil.rmtree(older)
    assert mask_kind_of(data)[0] == "classes"  # missing: the source names it
    assert mask_kind_of(DataConfig(train_shards="x-{0..1}.tar"))[0] == "classes"  # the user's own shards
    assert mask_kind_of(config(roots, "webdataset", mask_kind="binary")) == ("binary", "data.mask_kind=binary")
    explicit = config(roots, "webdataset", mask_kind="classes", augment=False)  # instance ids read as classes
    with pytest.raises(DataError, match=r"mask label \d+ out of range .* set data.mask_kind=instances$"):
        next(iter(build_train_loader(explicit, rank=0, world_size=1, **ARGS)))


def test_sample_words_are_a_function_of_seed_and_position_only():
    import numpy as np

    from unetdist.data.augment import sample_words

    positions = np.array([5, 0, 1 << 40, 17])
    words = sample_words(3, positions)
    assert np.array_equal(words[2:3], sample_words(3, positions[2:3]))  # batch composition does not matter
    assert not np.array_equal(words, sample_words(4, positions))
    assert len({int(w) for w in words.ravel()}) == words.size


CRASH_WITH_LIVE_WORKERS = """
import sys
from unetdist.config import DataConfig
from unetdist.data import build_train_loader
data = DataConfig(root=sys.argv[1], tile_size=32, num_workers=1)
batches = iter(build_train_loader(data, rank=0, world_size=1, seed=0, micro_batch_size=2, in_channels=1,
                                  num_classes=2, use_weight_map=True))
next(batches)
raise RuntimeError("crash in training")
"""


def test_an_uncaught_error_ends_the_process_although_workers_ignore_sigterm(roots):
    """Workers ignore SIGTERM (Slurm signals every process); multiprocessing's exit handler
    relies on it, so without stopping them first a crashed run waited for them forever."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", CRASH_WITH_LIVE_WORKERS, str(roots["webdataset"])],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "crash in training" in done.stderr


# ---------------------------------------------------------------- a worker's DataError, one line


def _hand_shards(root: Path, bad: dict[str, object], empty_shards: bool = False) -> Path:
    """A prepare-like folder (dataset.json with counts, so shards are first read in the workers) of
    two train shards of 3 hand-made samples each, the last of the second shard ``bad``, and one val shard."""
    import json

    import webdataset as wds

    def sample(key: str, **fields) -> dict:
        mask = np.zeros((TILE, TILE), np.uint8)
        mask[: TILE // 2] = 1
        base = {"__key__": key, "image.npy": np.ones((1, TILE, TILE), np.uint8), "mask.npy": mask,
                "weight.npy": np.ones((TILE, TILE), np.float32)}
        return {**base, **fields}

    root.mkdir(parents=True)
    names = {"train": ["train-000000.tar", "train-000001.tar"], "val": ["val-000000.tar"]}
    groups = {"train-000000.tar": [sample(f"a{i}") for i in range(3)],
              "train-000001.tar": [sample("b0"), sample("b1"), sample("bad", **bad)],
              "val-000000.tar": [sample("v0"), sample("v1")]}
    for name, samples in groups.items():
        with wds.TarWriter(str(root / name)) as writer:
            for item in samples:
                writer.write(item)
        if empty_shards and name.startswith("train"):
            (root / name).write_bytes(b"")
    meta = {"format": "webdataset", "train_shards": names["train"], "val_shards": names["val"],
            "train_counts": [3, 3], "val_counts": [2]}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


BAD_SAMPLES = {
    "truncated shard": ({}, r"shard \S+train-000001\.tar sample #\d: missing; .* truncated"),
    "corrupt member": ({"image.npy": b"\x93NUMPY garbage"}, r"shard \S+train-000001\.tar sample bad: cannot decode image\.npy"),
    "zero-length shard": ({}, r"shard \S+train-000001\.tar: not a readable tar file: empty file"),
    # the wording of this one is samples.py's: only what it must name is pinned here
    "label >= num_classes": ({"mask.npy": np.full((TILE, TILE), 2, np.uint8)},
                             r"shard \S+train-000001\.tar sample bad: .*label.* 2\b.*num_classes.*"),
    "RGB into a 1-channel model": ({"image.npy": np.ones((3, TILE, TILE), np.uint8)},
                                   r"shard \S+train-000001\.tar sample bad: image shape \(3, 32, 32\), expected \[1, H, W\]"),
}


def _damage(root: Path, case: str) -> None:
    shard = root / "train-000001.tar"
    if case == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:2048])
    elif case == "zero-length shard":
        shard.write_bytes(b"")


@pytest.mark.parametrize("case", sorted(BAD_SAMPLES))
def test_a_workers_data_error_is_raised_as_its_one_line(tmp_path: Path, case: str):
    """Not torch's "Caught DataError in DataLoader worker process 0." with the worker's traceback
    folded into the message: the error as the worker raised it, naming shard, key and problem."""
    fields, message = BAD_SAMPLES[case]
    root = _hand_shards(tmp_path / "data", fields)
    _damage(root, case)
    data = DataConfig(root=str(root), tile_size=TILE, num_workers=2, block_size=1)
    with pytest.raises(DataError) as caught:
        for _ in build_train_loader(data, rank=0, world_size=1, **ARGS):
            pass
    assert re.fullmatch(message + r"[^\n]*", str(caught.value)), str(caught.value)  # one line


def test_every_shard_empty_with_skip_is_one_line_and_a_bad_val_sample_too(tmp_path: Path):
    root = _hand_shards(tmp_path / "data", {}, empty_shards=True)
    data = DataConfig(root=str(root), tile_size=TILE, num_workers=1, on_error="skip", block_size=1)
    with pytest.raises(DataError, match=r"^micro-batch 0: every sample is bad, e\.g\. shard \S+train-00000\d\.tar: "
                                        r"not a readable tar file: empty file$"):
        next(iter(build_train_loader(data, rank=0, world_size=1, **ARGS)))
    val_root = _hand_shards(tmp_path / "val", {})
    (val_root / "val-000000.tar").write_bytes(b"")
    val = build_val_loader(dataclasses.replace(data, root=str(val_root), on_error="raise"), rank=0, world_size=1,
                           micro_batch_size=2, in_channels=1, num_classes=2, use_weight_map=True)
    with pytest.raises(DataError, match=r"^shard \S+val-000000\.tar: not a readable tar file: empty file$"):
        list(val)


def test_train_exits_2_with_the_workers_one_line(tmp_path: Path):
    """The real entry point: exit code 2, the last line names the shard and the problem, no traceback."""
    import subprocess
    import sys

    from conftest import REPO_ROOT

    root = _hand_shards(tmp_path / "data", {})
    _damage(root, "truncated shard")
    result = subprocess.run(
        [sys.executable, "-m", "unetdist.train", f"data.root={root}", f"data.tile_size={TILE}", "data.num_workers=1",
         "data.block_size=1", "model.preset=padded", "model.base_width=4", "model.depth=2",
         "train.global_batch_size=6", "train.max_steps=3", "train.progress=false", "tracking.enabled=false",
         f"train.output_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Caught" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert re.search(rf"ERROR unetdist\.train: shard {root / 'train-000001.tar'} sample #\d: missing; the shard "
                     r"holds 0 complete sample\(s\) of 3 \(the tar file is truncated\)$", last), last
