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


def test_a_full_disk_is_named_through_torch_save(tmp_path):
    """ENOSPC for real (/dev/full): torch.save reports it as "unexpected pos ...", and the message
    must still say what happened, how much was to be written, what is free and what is intact."""
    save(tmp_path, 5)
    with pytest.raises(Exception) as caught:  # noqa: PT011 - torch's RuntimeError, or the OSError of close()
        with open("/dev/full", "wb") as full:
            torch.save(trainer_state(6), full)
    error = ckpt.write_failure(tmp_path, 6, 0, caught.value, tmp_path / ".step-00000006.partial/trainer.pt", 1_500_000)
    assert isinstance(error, ckpt.CheckpointWriteError)
    assert str(error).startswith(
        f"cannot write checkpoint step-00000006 (rank 0): no space left on device (ENOSPC) writing "
        f"{tmp_path}/.step-00000006.partial/trainer.pt; the state is 1.5 MB, ")
    assert str(error).endswith(f"MB free there; the previous checkpoint {tmp_path / 'step-00000005'} is intact")
    other = ckpt.write_failure(tmp_path, 6, 0, PermissionError(13, "Permission denied"), tmp_path, 0)
    assert isinstance(other, ckpt.CheckpointError) and "Permission denied" in str(other)


@pytest.mark.slow
def test_a_save_over_the_file_size_limit_exits_74_and_keeps_the_previous(cell_shards, tmp_path):
    """A real failed write (EFBIG: RLIMIT_FSIZE below the checkpoint's size) in the real entry point:
    one line naming the file and the sizes, exit 74, and the previous checkpoint still resumes."""
    import resource
    import subprocess
    import sys

    from conftest import REPO_ROOT, tiny_run_overrides

    args = [sys.executable, "-m", "unetdist.train",
            *tiny_run_overrides(cell_shards, tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"),
            "tracking.enabled=false", "train.val_every=0", "checkpoint.every=2", "train.global_batch_size=4"]
    first = subprocess.run([*args, "train.max_steps=2"], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert first.returncode == 0, first.stderr[-3000:]
    previous = tmp_path / "run" / "checkpoints" / "step-00000002"
    size = (previous / "trainer.pt").stat().st_size

    def limit_file_size() -> None:  # Python ignores SIGXFSZ, so the write fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    full = subprocess.run([*args, "train.max_steps=4", "--resume", "auto"], capture_output=True, text=True,
                          timeout=120, cwd=REPO_ROOT, preexec_fn=limit_file_size)
    assert full.returncode == ckpt.EXIT_WRITE_FAILED == 74, full.stderr[-3000:]
    assert "Traceback" not in full.stderr
    last = full.stderr.strip().splitlines()[-1]
    assert (f"ERROR unetdist.train: cannot write checkpoint step-00000004 (rank 0): file too large (EFBIG: "
            f"over the process's `ulimit -f` or the file system's limit) writing "
            f"{tmp_path}/run/checkpoints/.step-00000004.partial/trainer.pt; the state is ") in last, last
    assert last.endswith(f"MB free there; the previous checkpoint {previous} is intact")
    assert ckpt.latest_good_checkpoint(tmp_path / "run" / "checkpoints") == previous
    assert ckpt.load_checkpoint(previous)["step"] == 2
