"""The run says what it trained on: each data split as an MLflow dataset input.

A real tiny CPU training run (the entry point, in this process) against a real SQLite store,
read back only through ``MlflowClient``; then the same run resumed. The description itself
(:mod:`unetdist.data.lineage`) is a pure function, tested on sources of plain lists.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import tiny_run_overrides
from services.mlflow_server import free_port

from unetdist.config import DataConfig
from unetdist.data.lineage import common_location, describe_split, location, sample_list_digest
from unetdist.tracking import MLflowTracker, read_unsent
from unetdist.tracking.datasets import CONTEXT_TAG, dataset_inputs, dataset_record, source_json
from unetdist.tracking.replay import replay
from unetdist.tracking.sender import Sender

READ_KEYS = {"data.image_key": "image", "data.mask_key": "mask", "data.weight_key": "weight",
             "data.mask_kind": "classes"}  # fmt: skip


@dataclass
class ListSource:
    """The part of the Source protocol a description reads."""

    names: list[str]
    counts: list[int]
    unit_name: str = "shard"


def shards(folder: str, count: int) -> ListSource:
    return ListSource([f"{folder}/train-{index:06d}.tar" for index in range(count)], [16] * count)


def listed(client, run_id: str) -> list:
    """The run's dataset inputs, as the run page's Datasets row shows them."""
    return client.get_run(run_id).inputs.dataset_inputs


def inputs_by_context(client, run_id: str) -> dict[str, list]:
    found: dict[str, list] = {}
    for dataset_input in listed(client, run_id):
        context = {tag.key: tag.value for tag in dataset_input.tags}[CONTEXT_TAG]
        found.setdefault(context, []).append(dataset_input.dataset)
    return found


# --- the description: pure ----------------------------------------------------------------


def test_digest_follows_the_sample_list():
    data = DataConfig(root="/data/cells")
    digest = describe_split(data, "train", shards("/data/cells", 3)).digest
    assert describe_split(data, "train", shards("/data/cells", 3)).digest == digest, "same data, same digest"
    assert describe_split(data, "train", shards("/data/cells", 4)).digest != digest, "a shard added"
    fewer = shards("/data/cells", 3)
    fewer.counts[1] = 15
    assert describe_split(data, "train", fewer).digest != digest, "a shard's count changed"
    other_key = DataConfig(root="/data/cells", mask_key="labels")
    assert describe_split(other_key, "train", shards("/data/cells", 3)).digest != digest, "read differently"
    assert len(digest) == 16 and int(digest, 16) >= 0
    with pytest.raises(ValueError, match="2 unit names for 1 sample counts"):
        sample_list_digest("webdataset", "shard", ["a", "b"], [1], {})


def test_description_of_a_local_split():
    data = DataConfig(root="/data/cells", mask_kind="instances")
    lineage = describe_split(data, "val", shards("/data/cells", 2))
    assert (lineage.name, lineage.context, lineage.source) == ("cells-val", "validation", "/data/cells")
    assert (lineage.samples, lineage.units, lineage.unit_name) == (32, 2, "shard")
    assert lineage.profile() == {
        "format": "webdataset", "samples": 32, "units": 2, "unit": "shard", "data.image_key": "image",
        "data.mask_key": "mask", "data.weight_key": "weight", "data.mask_kind": "instances",
    }  # fmt: skip
    zarr = DataConfig(format="zarr", zarr_store="/stores/tiles.zarr", image_array="raw", mask_array="seg")
    tiles = describe_split(zarr, "train", ListSource(["/stores/tiles.zarr/train"], [500], "array"))
    assert (tiles.name, tiles.source) == ("tiles.zarr-train", "/stores/tiles.zarr")
    assert tiles.keys == {
        "data.zarr_store": "/stores/tiles.zarr", "data.image_array": "raw", "data.mask_array": "seg",
        "data.val_fraction": 0.1, "data.mask_kind": "classes",
    }  # fmt: skip
    ome = DataConfig(format="ome-zarr", images=["s3://lab/plate/A/*.zarr", "s3://lab/plate/B/1.zarr"],
                     labels="cells", level=1, channels=[0, 2])  # fmt: skip
    planes = [f"ome-zarr s3://lab/plate/{well} (z={z})" for well in ("A/1.zarr", "B/1.zarr") for z in (0, 1)]
    wells = describe_split(ome, "train", ListSource(planes, [9, 9, 9, 9], "image"))
    assert (wells.name, wells.source, wells.units) == ("plate-train", "s3://lab/plate", 4)
    assert wells.keys["data.images"] == ["s3://lab/plate/A/*.zarr", "s3://lab/plate/B/1.zarr"]
    assert [wells.keys[f"data.{key}"] for key in ("labels", "level", "channels")] == ["cells", 1, [0, 2]]


def test_no_credential_reaches_the_logged_source():
    secret_root = "https://alice:hunter2@data.example.org/sets/cells?token=t0ps3cret"
    shard = "https://alice:hunter2@data.example.org/sets/cells/train-{:06d}.tar?X-Amz-Signature=s1g{}"
    presigned = ListSource([shard.format(index, index) for index in range(2)], [16, 16])
    data = DataConfig(root=secret_root, train_shards=presigned.names[0] + "::" + presigned.names[1])
    lineage = describe_split(data, "train", presigned)
    entity = dataset_inputs([dataset_record(lineage)])[0].dataset
    written = json.dumps([entity.name, entity.digest, entity.source, entity.profile])
    for secret in ("hunter2", "t0ps3cret", "s1g0", "s1g1"):
        assert secret not in written, written
    assert lineage.source == "https://***@data.example.org/sets/cells" and lineage.name == "cells-train"
    assert (entity.source_type, json.loads(entity.source)) == ("http", {"url": lineage.source})
    resigned = ListSource([name.replace("s1g", "other") for name in presigned.names], presigned.counts)
    assert describe_split(data, "train", resigned).digest == lineage.digest, "newly signed, the same data"


def test_locations_and_mlflow_source_types():
    assert location("s3://bucket/cells/train-000000.tar?versionId=3") == "s3://bucket/cells/train-000000.tar"
    assert location("file:///data/cells") == "/data/cells"
    assert location("relative/cells") == str(Path("relative/cells").resolve())
    assert common_location(["s3://a/x.tar", "s3://b/y.tar"]) == "s3://a/x.tar, s3://b/y.tar"
    assert common_location(["/d/cells/train-1.tar", "/d/cells/train-2.tar"]) == "/d/cells"
    from mlflow.data.dataset_source_registry import get_dataset_source_from_json

    for where, kind in (("/data/cells", "local"), ("s3://bucket/cells", "s3"), ("https://h/cells", "http")):
        source_type, source = source_json(where)
        assert source_type == kind
        resolved = get_dataset_source_from_json(source, source_type)  # MLflow reads it back as its own
        assert getattr(resolved, "uri", None) or resolved.url == where


# --- through the tracker's queue ----------------------------------------------------------


def test_dataset_inputs_wait_out_a_dead_server(tmp_path, local_mlflow_store):
    """Queued like every call: a dead server holds them in the file of unsent calls; replay sends them."""
    from mlflow import MlflowClient

    dead_uri = f"http://127.0.0.1:{free_port()}"
    tracker = MLflowTracker(dead_uri, "lineage", local_dir=tmp_path, request_timeout_s=1, flush_timeout_s=1)
    record = dataset_record(describe_split(DataConfig(root="/data/cells"), "train", shards("/data/cells", 2)))
    tracker.log_dataset_inputs([record])
    tracker.finish("FINISHED")
    _, ops = read_unsent(tracker.unsent_path)
    assert [op["op"] for op in ops] == ["create_run", "dataset_inputs", "terminate"]

    run_id = replay(tracker.unsent_path, local_mlflow_store)
    (dataset,) = inputs_by_context(MlflowClient(local_mlflow_store), run_id)["training"]
    assert (dataset.name, dataset.digest, json.loads(dataset.source)) == (
        "cells-train", record["digest"], {"uri": "/data/cells"}
    )


def test_a_split_is_listed_once_and_a_changed_one_beside_it(local_mlflow_store, tmp_path, caplog):
    from mlflow import MlflowClient

    data = DataConfig(root="/data/cells")
    record = dataset_record(describe_split(data, "train", shards("/data/cells", 2)))
    with MLflowTracker(local_mlflow_store, "lineage", local_dir=tmp_path) as tracker:
        tracker.log_dataset_inputs([record])
        assert tracker.flush()
        # a leftover call replayed after this job's own: MLflow links a (name, digest) to a run once
        Sender(local_mlflow_store, tracker.run_id, None).send({"op": "dataset_inputs", "datasets": [record]})
    client = MlflowClient(local_mlflow_store)
    assert len(listed(client, tracker.run_id)) == 1

    grown = dataset_record(describe_split(data, "train", shards("/data/cells", 3)))
    with MLflowTracker(local_mlflow_store, "lineage", run_id=tracker.run_id, local_dir=tmp_path) as resumed:
        resumed.log_dataset_inputs([record, grown])
    changed = f"dataset cells-train differs from what this run trained on so far (digest {record['digest']}"
    assert changed in caplog.text
    digests = {d.dataset.digest for d in listed(client, tracker.run_id)}
    assert digests == {record["digest"], grown["digest"]}


# --- a real training run, then resumed ----------------------------------------------------


def test_training_run_lists_its_splits_and_a_resume_keeps_them(cell_shards, tmp_path, local_mlflow_store):
    from mlflow import MlflowClient

    from unetdist.train import main

    output_dir = tmp_path / "run"
    overrides = tiny_run_overrides(cell_shards, output_dir, local_mlflow_store) + [
        "data.num_workers=0", "model.depth=2", "model.base_width=4", "train.global_batch_size=2",
        "train.val_every=0", "train.val_max_batches=1", "checkpoint.every=2", "tracking.log_model=false",
        "tracking.image_every=0", "tracking.experiment=lineage",
    ]  # fmt: skip
    assert main([*overrides, "train.max_steps=2"]) == 0

    client = MlflowClient(local_mlflow_store)
    (run,) = client.search_runs([client.get_experiment_by_name("lineage").experiment_id])
    meta = json.loads((cell_shards / "dataset.json").read_text())
    found = inputs_by_context(client, run.info.run_id)
    assert sorted(found) == ["training", "validation"]
    for context, split in (("training", "train"), ("validation", "val")):
        (dataset,) = found[context]
        assert dataset.name == f"{cell_shards.name}-{split}"
        assert dataset.source_type == "local"
        assert json.loads(dataset.source) == {"uri": str(cell_shards)}
        names = [str(cell_shards / shard) for shard in meta[f"{split}_shards"]]
        counts = meta[f"{split}_counts"]
        read_keys = {**READ_KEYS, "data.mask_kind": "instances"}  # auto: as prepare's dataset.json says
        assert dataset.digest == sample_list_digest("webdataset", "shard", names, counts, read_keys)
        profile = json.loads(dataset.profile)
        assert profile["samples"] == sum(meta[f"{split}_counts"]) and profile["units"] == len(names)
        assert profile["format"] == "webdataset" and profile["data.mask_key"] == "mask"
    first = {(d.dataset.name, d.dataset.digest) for d in listed(client, run.info.run_id)}

    assert main([*overrides, "train.max_steps=4", "checkpoint.resume=auto"]) == 0
    (resumed,) = client.search_runs([client.get_experiment_by_name("lineage").experiment_id])
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    inputs = listed(client, run.info.run_id)
    assert len(inputs) == 2, "no duplicates"
    assert {(d.dataset.name, d.dataset.digest) for d in inputs} == first, "the same inputs"
