"""Durable checkpoints: atomic, checksummed, corrupt ones skipped by name, no pickle execution."""

import json
import logging
import os

import pytest
import torch

from unetdist import checkpoint as ckpt


def trainer_state(step: int) -> dict:
    return {"step": step, "model": {"w": torch.full((3,), float(step))}, "config": {"a": {"b": 1}}}


def save(directory, step, keep=3, keep_every=0, async_save=False):
    writer = ckpt.CheckpointWriter(directory, rank=0, world_size=1, keep=keep, keep_every=keep_every,
                                   async_save=async_save)
    path = writer.save(step, trainer_state(step), {"rank": 0, "rng": {"torch": torch.get_rng_state()}})
    return path or writer.finish()


def test_save_load_round_trip_and_keep(tmp_path):
    for step in (10, 20, 30, 40):
        save(tmp_path, step, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000030", "step-00000040"]
    assert (tmp_path / "latest").read_text() == "step-00000040"
    loaded = ckpt.load_checkpoint(ckpt.latest_good_checkpoint(tmp_path))
    assert loaded["step"] == 40 and torch.equal(loaded["model"]["w"], torch.full((3,), 40.0))
    assert loaded["rank_state"]["rank"] == 0 and loaded["saved_world_size"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary files left behind"
    manifest = json.loads((tmp_path / "step-00000040" / "MANIFEST.json").read_text())
    assert set(manifest["files"]) == {"trainer.pt", "rank-00000.pt"}


def test_keep_every_keeps_milestones(tmp_path):
    for step in range(10, 110, 10):
        save(tmp_path, step, keep=2, keep_every=50)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        "step-00000050", "step-00000090", "step-00000100"]


def test_async_save_becomes_visible_at_finish(tmp_path):
    writer = ckpt.CheckpointWriter(tmp_path, rank=0, world_size=1, keep=3, async_save=True)
    state = trainer_state(5)
    assert writer.save(5, state, {"rank": 0}) is None
    state["model"]["w"].fill_(-1)  # the step goes on changing the live tensors
    path = writer.finish()
    assert path.name == "step-00000005"
    assert torch.equal(ckpt.load_checkpoint(path)["model"]["w"], torch.full((3,), 5.0))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_newest_is_reported_and_previous_used(tmp_path, caplog, damage):
    save(tmp_path, 1)
    newest = save(tmp_path, 2) / "trainer.pt"
    if damage == "truncate":
        with open(newest, "r+b") as f:
            f.truncate(os.path.getsize(newest) // 2)
    else:
        data = bytearray(newest.read_bytes())
        data[len(data) // 2] ^= 0xFF
        newest.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        good = ckpt.latest_good_checkpoint(tmp_path)
    assert good.name == "step-00000001"
    assert "step-00000002/trainer.pt does not match its checksum" in caplog.text
    with pytest.raises(ckpt.CheckpointError, match="step-00000002"):
        ckpt.load_checkpoint(newest.parent)


def test_no_good_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    only = save(tmp_path, 1)
    (only / "rank-00000.pt").unlink()
    with pytest.raises(ckpt.CheckpointError, match="(?s)no good checkpoint.*rank-00000.pt is missing"):
        ckpt.latest_good_checkpoint(tmp_path)


def test_interrupted_save_leaves_previous_in_charge(tmp_path):
    save(tmp_path, 1)
    # a crash before the rename: a partial directory; and one without a manifest
    (tmp_path / ".step-00000002.partial").mkdir()
    (tmp_path / ".step-00000002.partial" / "trainer.pt").write_bytes(b"partial")
    (tmp_path / "step-00000003").mkdir()
    assert ckpt.latest_good_checkpoint(tmp_path).name == "step-00000001"
    # the next save of step 2 cleans up the leftovers of the crashed one
    assert save(tmp_path, 2).name == "step-00000002"
    assert not (tmp_path / ".step-00000002.partial").exists()


def test_empty_directory_has_no_checkpoint(tmp_path):
    assert ckpt.latest_good_checkpoint(tmp_path / "missing") is None


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_loading_never_executes_pickled_code(tmp_path):
    path = save(tmp_path, 1)
    torch.save({"step": 1, "evil": Payload()}, path / "trainer.pt")
    manifest = json.loads((path / "MANIFEST.json").read_text())
    manifest["files"]["trainer.pt"] = ckpt.sha256_file(path / "trainer.pt")
    (path / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match="cannot load checkpoint part .*trainer.pt"):
        ckpt.load_checkpoint(path)
