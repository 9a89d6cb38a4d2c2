"""Durable checkpoints: atomic, checksummed, corrupt ones skipped by name, no pickle execution."""

import logging
import os

import pytest
import torch

from unetdist import checkpoint as ckpt


def state(step: int) -> dict:
    return {"step": step, "model": {"w": torch.full((3,), float(step))}, "config": {"a": {"b": 1}}}


def test_save_load_round_trip_and_keep(tmp_path):
    for step in (10, 20, 30, 40):
        ckpt.save_checkpoint(tmp_path, step, state(step), keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000030.pt", "step-00000040.pt"]
    assert (tmp_path / "latest").read_text() == "step-00000040.pt"
    loaded = ckpt.load_checkpoint(ckpt.latest_good_checkpoint(tmp_path))
    assert loaded["step"] == 40 and torch.equal(loaded["model"]["w"], torch.full((3,), 40.0))
    assert not list(tmp_path.glob(".*tmp*")), "no temporary files left behind"


def test_truncated_newest_is_reported_and_previous_used(tmp_path, caplog):
    ckpt.save_checkpoint(tmp_path, 1, state(1), keep=3)
    newest = ckpt.save_checkpoint(tmp_path, 2, state(2), keep=3)
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    with caplog.at_level(logging.WARNING):
        good = ckpt.latest_good_checkpoint(tmp_path)
    assert good.name == "step-00000001.pt"
    assert "step-00000002.pt does not match its checksum" in caplog.text
    with pytest.raises(ckpt.CheckpointError, match="step-00000002.pt"):
        ckpt.load_checkpoint(newest)


def test_interrupted_save_leaves_previous_in_charge(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, state(1), keep=3)
    # a crash after the data was written but before its rename: a temp file and no checksum
    (tmp_path / ".step-00000002.pt.tmp-999").write_bytes(b"partial")
    (tmp_path / "step-00000003.pt").write_bytes(b"no checksum beside me")
    assert ckpt.latest_good_checkpoint(tmp_path).name == "step-00000001.pt"


def test_empty_directory_has_no_checkpoint(tmp_path):
    assert ckpt.latest_good_checkpoint(tmp_path / "missing") is None


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_loading_never_executes_pickled_code(tmp_path):
    path = tmp_path / "step-00000001.pt"
    torch.save({"step": 1, "evil": Payload()}, path)
    (tmp_path / "step-00000001.pt.sha256").write_text(ckpt._sha256(path))
    with pytest.raises(ckpt.CheckpointError, match="cannot load checkpoint"):
        ckpt.load_checkpoint(path)
