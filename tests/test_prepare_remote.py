"""prepare and object stores: the index beside every shard, ``prepare index`` for shards made
elsewhere (local and on S3), and ``prepare --out s3://...`` (uploaded whole, dataset.json last),
against a real S3 server on loopback (the ``s3`` fixture)."""

from __future__ import annotations

import hashlib
import json
import tarfile
import tempfile
import uuid
from pathlib import Path

import pytest

from unetdist.data.remote import join, list_objects, read_bytes, upload_file
from unetdist.data.sources.tar_index import (
    file_sha256,
    index_document,
    index_tar,
    read_index,
    shard_index_url,
)
from unetdist.prepare import main

TINY = ["--synthetic", "4", "--image-size", "64", "--tile", "32", "--shard-size", "8"]


def _files(folder: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every file under ``folder``."""
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in files}


def _tar_members(path: Path) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of every file member, read with tarfile (independently of index_tar)."""
    with tarfile.open(path) as tar:
        return [(member.name, member.offset_data, member.size) for member in tar if member.isfile()]


def _webdataset_shards(folder: Path, count: int, per_shard: int) -> list[Path]:
    """Shards written by webdataset itself (no index), with fields of varied sizes."""
    import numpy as np
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with wds.ShardWriter(str(folder / "train-%06d.tar"), maxcount=per_shard, verbose=0) as writer:
        for index in range(count * per_shard):
            size = int(rng.integers(1, 3000))
            sample = {"__key__": f"sample{index:04d}", "image.npy": rng.random(size), "cls": str(index % 3)}
            writer.write(sample)
    return sorted(folder.glob("train-*.tar"))


@pytest.fixture(scope="module")
def prepared_locally(tmp_path_factory):
    """``format -> folder`` of a local prepare with the TINY arguments (each made once)."""
    made: dict[str, Path] = {}

    def prepare(output_format: str) -> Path:
        if output_format not in made:
            out = tmp_path_factory.mktemp(f"local-{output_format}")
            assert main([*TINY, "--format", output_format, "--out", str(out)]) == 0
            made[output_format] = out
        return made[output_format]

    return prepare


@pytest.fixture
def bucket(s3) -> str:
    """A new bucket on the session's S3 server (buckets outlive tests: each test makes its own)."""
    name = f"prepare-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(name)
    s3.clear_requests()
    return name


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch) -> Path:
    """The process's temporary folder for this test, to see what prepare leaves in it."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


# ---------------------------------------------------------------- the index beside each shard


def _index_names(shards: list[str]) -> list[str]:
    return sorted(f"{name}.index.json" for name in shards)


def test_prepare_writes_an_index_beside_every_shard_that_matches_the_tar(prepared_locally):
    out = prepared_locally("webdataset")
    meta = json.loads((out / "dataset.json").read_text())
    shards = meta["train_shards"] + meta["val_shards"]
    assert len(meta["train_shards"]) == 2 and len(meta["val_shards"]) == 1
    assert sorted(path.name for path in out.glob("*.index.json")) == _index_names(shards)
    for name, count in zip(shards, meta["train_counts"] + meta["val_counts"], strict=True):
        shard = out / name
        from_index, from_headers = read_index(str(shard)), index_tar(str(shard))
        assert len(from_index.samples) == count > 0
        assert from_index.samples == from_headers.samples  # keys, fields, offsets, sizes, sample by sample
        assert from_index.size == from_headers.size == shard.stat().st_size
        flat = [(f"{s.key}.{field}", at, size) for s in from_index.samples for field, at, size in s.members]
        assert flat == _tar_members(shard)
        document = json.loads(Path(shard_index_url(str(shard))).read_text())
        assert document["shard"] == name
        assert document["sha256"] == hashlib.sha256(shard.read_bytes()).hexdigest()


def test_a_rerun_with_fewer_shards_removes_their_stale_indexes(tmp_path: Path):
    out = tmp_path / "out"
    assert main([*TINY[:-1], "2", "--out", str(out)]) == 0  # shard size 2: 6 train shards
    (out / "notes.txt").write_text("the user's own file\n")
    assert len(list(out.glob("train-*.tar.index.json"))) == 6
    assert main([*TINY, "--out", str(out)]) == 0
    meta = json.loads((out / "dataset.json").read_text())
    shards = meta["train_shards"] + meta["val_shards"]
    assert sorted(path.name for path in out.glob("*.tar")) == sorted(shards)
    assert sorted(path.name for path in out.glob("*.index.json")) == _index_names(shards)
    assert (out / "notes.txt").read_text() == "the user's own file\n"


def test_the_same_tiles_give_the_same_shard_bytes(prepared_locally, tmp_path: Path):
    again = tmp_path / "again"
    assert main([*TINY, "--out", str(again)]) == 0
    first = _files(prepared_locally("webdataset"))
    assert {name: data for name, data in _files(again).items() if name != "dataset.json"} == {
        name: data for name, data in first.items() if name != "dataset.json"
    }


# ---------------------------------------------------------------- prepare index


def test_prepare_index_on_webdataset_shards(tmp_path: Path, capsys):
    shards = _webdataset_shards(tmp_path / "wds", count=2, per_shard=5)
    assert [path.name for path in shards] == ["train-000000.tar", "train-000001.tar"]
    assert not list((tmp_path / "wds").glob("*.index.json"))

    assert main(["index", str(tmp_path / "wds" / "train-{000000..000001}.tar")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [f"indexed {path}: 5 samples, {path.stat().st_size} bytes" for path in shards]
    for path in shards:
        written = json.loads(Path(shard_index_url(str(path))).read_text())
        assert written == index_document(index_tar(str(path)), file_sha256(str(path)))
        assert read_index(str(path)).samples == index_tar(str(path)).samples
        first_key = f"sample{int(path.stem[-1]) * 5:04d}"
        assert len(written["samples"]) == 5 and written["samples"][0][0] == first_key


def test_prepare_index_names_what_is_not_a_tar_file(tmp_path: Path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a tar file\n" * 100)
    (shard,) = _webdataset_shards(tmp_path / "wds", count=1, per_shard=3)
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    for argument, problem in ((notes, "not a readable tar file"), (tmp_path / "missing.tar", "No such file"),
                              (truncated, "truncated")):  # fmt: skip
        assert main(["index", str(argument)]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.startswith("prepare index: error: ") and captured.err.count("\n") == 1
        assert str(argument) in captured.err and problem in captured.err and "Traceback" not in captured.err
    assert not list(tmp_path.glob("*.index.json*"))


def test_prepare_index_of_shards_in_a_bucket(s3, bucket: str, tmp_path: Path, private_tmp: Path, capsys):
    shards = _webdataset_shards(tmp_path / "wds", count=2, per_shard=4)
    names = [path.name for path in shards]
    for path in shards:
        upload_file(path, f"s3://{bucket}/x/{path.name}")
    s3.clear_requests()

    assert main(["index", f"s3://{bucket}/x/train-{{000000..000001}}.tar"]) == 0
    # each shard read once, as a whole; each index written once
    assert [row[1:3] for row in s3.requests("GET")] == [(f"/{bucket}/x/{path.name}", "-") for path in shards]
    assert [row[1] for row in s3.requests("PUT")] == [f"/{bucket}/x/{name}" for name in _index_names(names)]
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"indexed s3://{bucket}/x/{path.name}: 4 samples, {path.stat().st_size} bytes"
                     for path in shards]  # fmt: skip
    for path in shards:
        url = f"s3://{bucket}/x/{path.name}"
        written = json.loads(read_bytes(shard_index_url(url)))
        # the same "shard" name too: the remote shard's, not the temporary file's
        assert written == index_document(index_tar(str(path)), file_sha256(str(path)))
        assert read_index(url).samples == index_tar(str(path)).samples

    missing = f"s3://{bucket}/x/train-000009.tar"
    assert main(["index", missing]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"prepare index: error: {missing} ") and captured.err.count("\n") == 1
    assert "404" in captured.err and "Traceback" not in captured.err
    assert not list(private_tmp.iterdir())  # the downloaded copies removed


# ---------------------------------------------------------------- prepare --out s3://...


@pytest.mark.parametrize("output_format", ["webdataset", "zarr"])
def test_prepare_to_a_bucket_uploads_what_a_local_prepare_writes(
    s3, bucket: str, prepared_locally, private_tmp: Path, capsys, output_format: str
):
    local = _files(prepared_locally(output_format))
    url = f"s3://{bucket}/cells"
    capsys.readouterr()
    assert main([*TINY, "--format", output_format, "--out", url]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Prepared {url}: 3 train images -> 12 tiles in ")
    assert out.endswith(f"Metadata: {url}/dataset.json\n")

    # every file, shards and their indexes, the Zarr store's objects and the raw images, byte for byte
    remote_names = [found[len(url) + 1 :] for found in list_objects(url)]
    assert sorted(remote_names) == sorted(local)
    assert any(name.startswith("data.zarr/") for name in local) == (output_format == "zarr")
    assert any(name.endswith(".tar.index.json") for name in local) == (output_format == "webdataset")
    for name, data in local.items():
        if name != "dataset.json":
            assert read_bytes(join(url, name)) == data, name
    # dataset.json: the same but for where the synthetic images are, which is beside it
    meta, local_meta = json.loads(read_bytes(join(url, "dataset.json"))), json.loads(local["dataset.json"])
    assert meta["source"]["images"] == f"{url}/raw/images" and meta["source"]["masks"] == f"{url}/raw/masks"
    for key in ("images", "masks"):
        del meta["source"][key], local_meta["source"][key]
    assert meta == local_meta

    # dataset.json went up once, after everything else had arrived
    writes = [row for row in s3.requests(None) if row[0] in ("PUT", "POST")]
    assert len(writes) == len(local) and all(row[3] == "200" for row in writes)
    assert [row[1] for row in writes if row[1].endswith("/dataset.json")] == [f"/{bucket}/cells/dataset.json"]
    assert writes[-1][1] == f"/{bucket}/cells/dataset.json"
    assert not list(private_tmp.iterdir())  # the temporary folder (and its staging folder) removed


def test_prepare_to_a_bucket_refuses_an_earlier_data_set_and_a_missing_bucket(
    s3, bucket: str, private_tmp: Path, capsys
):
    url = f"s3://{bucket}/cells"
    assert main([*TINY, "--out", url]) == 0
    before = {found: read_bytes(found) for found in list_objects(url)}
    s3.clear_requests()
    capsys.readouterr()

    assert main([*TINY, "--out", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"prepare: error: {url} already holds a data set (dataset.json)")
    assert err.count("\n") == 1
    assert not s3.requests("PUT") and {found: read_bytes(found) for found in list_objects(url)} == before

    missing = f"s3://no-such-{bucket}/cells"
    assert main([*TINY, "--out", missing]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"prepare: error: {missing} (LIST): 404") and err.count("\n") == 1
    assert "existing bucket" in err and "Traceback" not in err
    assert not list(private_tmp.iterdir())


def test_a_failed_upload_uploads_no_dataset_json_and_a_rerun_completes_it(
    s3, bucket: str, private_tmp: Path, capsys
):
    url = f"s3://{bucket}/cells"
    # every PUT of a val shard or index fails (403: not retried); train shards (2 tiles each) may arrive
    s3.set_faults(fail_next=99, fail_status=403, fail_code="AccessDenied", methods=["PUT"],
                  path_contains="val-")  # fmt: skip
    assert main([*TINY[:-1], "2", "--out", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"prepare: error: {url}/val-00000") and "403" in err and err.count("\n") == 1, err
    assert f"the data set at {url} is incomplete (no dataset.json)" in err
    s3.set_faults()
    assert not [found for found in list_objects(url) if found.endswith("/dataset.json")]
    assert not list(private_tmp.iterdir())

    # shards left by a failed upload are overwritten; those the new data set lacks are named
    before = {found[len(url) + 1 :] for found in list_objects(url)}
    assert main([*TINY, "--out", url]) == 0
    meta = json.loads(read_bytes(join(url, "dataset.json")))
    assert meta["train_shards"] == ["train-000000.tar", "train-000001.tar"]
    kept = ("train-000000", "train-000001")
    stale = sorted(name for name in before if name.startswith("train-") and name.split(".")[0] not in kept)
    if stale:
        warning = f"not part of the new data set (not in dataset.json), e.g. {stale[0]}"
        assert warning in capsys.readouterr().err
