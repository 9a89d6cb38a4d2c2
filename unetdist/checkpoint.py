"""Durable checkpoints of the whole training state, written by every rank, loaded safely.

A checkpoint is a directory ``checkpoints/step-00000100/`` holding
``trainer.pt`` (rank 0: model, optimizer, grad scaler, step, config, MLflow run id, versions),
``rank-00000.pt`` ... (each rank's own RNG states and data position) and ``MANIFEST.json``
(the SHA-256 of every part). The protocol, so that a crash at any point leaves the previous
good checkpoint in charge:

1. every rank writes its parts into ``.step-00000100.partial/`` (temporary name, fsync, rename);
2. rank 0 gathers the checksums, writes ``MANIFEST.json``, renames the directory into place,
   fsyncs the parent, and only then moves the ``latest`` pointer;
3. old checkpoints beyond ``keep`` are removed (every ``keep_every``-th is kept for good).

Loading verifies the manifest and every checksum and uses ``torch.load(weights_only=True)``,
so a checkpoint can never execute code. A corrupt newest checkpoint is reported by name and
the previous good one is used.

A save that runs out of space (ENOSPC, EDQUOT) or over a file size limit (EFBIG) stops every
rank with :class:`CheckpointWriteError`: one line naming the file, the size of the state and
the free space; the previous checkpoint stays in charge. ``unetdist.train`` exits with
:data:`EXIT_WRITE_FAILED`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from unetdist import distributed

log = logging.getLogger(__name__)

LATEST = "latest"
MANIFEST = "MANIFEST.json"
TRAINER_PART = "trainer.pt"
_NAME = re.compile(r"^step-(\d{8})$")


EXIT_WRITE_FAILED = 74  # EX_IOERR: a checkpoint could not be written; the previous one is intact
_NO_ROOM = {
    errno.ENOSPC: "no space left on device (ENOSPC)",
    errno.EDQUOT: "disk quota exceeded (EDQUOT)",
    errno.EFBIG: "file too large (EFBIG: over the process's `ulimit -f` or the file system's limit)",
}


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupt or from another run."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint that could not be written for lack of room; the previous one is intact."""


def rank_part(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def step_name(step: int) -> str:
    return f"step-{step:08d}"


# ---------------------------------------------------------------- file primitives


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    """Write through ``write(file)`` to a temporary name, fsync, rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def to_cpu(state: Any) -> Any:
    """A CPU copy of a nested state, so a background write never sees tensors the step changes."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: to_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(to_cpu(v) for v in state)
    return state


def state_bytes(state: Any) -> int:
    """The bytes of the tensors in a nested state: about the size of its file."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def _bytes_in(folder: Path) -> int:
    try:
        return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    except OSError:
        return 0


def _no_room(err: BaseException) -> OSError | None:
    """The OSError for lack of room behind ``err``: torch.save reports a failed write as an obscure
    RuntimeError ("unexpected pos ...") whose context is the file's OSError."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _NO_ROOM:
            return err
        err = err.__cause__ or err.__context__
    return None


def write_failure(
    directory: Path, step: int, rank: int, error: BaseException, path: Path, size: int
) -> CheckpointError | CheckpointWriteError:
    """The one-line error for a failed write of ``path`` (``size`` bytes of state) into ``directory``:
    for lack of room, what was needed, what is free and which checkpoint is still in charge."""
    name = step_name(step)
    no_room = _no_room(error)
    if no_room is None:
        return CheckpointError(f"writing checkpoint {name} failed on rank {rank}: {error}")
    try:
        free = f"{shutil.disk_usage(directory).free / 1e6:.1f} MB free there"
    except OSError:
        free = "free space unknown"
    pointer = directory / LATEST
    previous = "there is no previous checkpoint"
    if pointer.is_file():
        previous = f"the previous checkpoint {directory / pointer.read_text().strip()} is intact"
    return CheckpointWriteError(
        f"cannot write checkpoint {name} (rank {rank}): {_NO_ROOM[no_room.errno]} writing {path}; "
        f"the state is {size / 1e6:.1f} MB, {free}; {previous}"
    )


# ---------------------------------------------------------------- saving


class CheckpointWriter:
    """Saves checkpoints collectively; with ``async_save`` the parts are written on a thread.

    An asynchronous save becomes visible (manifest, rename, ``latest``) at the next save or
    at ``finish()``: until then the previous checkpoint stays in charge.
    """

    def __init__(self, directory: Path, rank: int, world_size: int, keep: int, keep_every: int = 0,
                 async_save: bool = False) -> None:
        self.directory = directory
        self.rank = rank
        self.world_size = world_size
        self.keep = keep
        self.keep_every = keep_every
        self.async_save = async_save
        self._pending: tuple[int, threading.Thread, dict[str, str]] | None = None
        self._error: tuple[BaseException, Path, int] | None = None  # error, file, bytes of state

    def save(self, step: int, trainer_state: dict[str, Any] | None, rank_state: dict[str, Any]) -> Path | None:
        """Every rank calls this; ``trainer_state`` is rank 0's (None elsewhere). Returns the
        finished checkpoint's path on rank 0 when the save is complete, else None."""
        finished = self.finish()
        start = time.perf_counter()
        partial = self.directory / f".{step_name(step)}.partial"
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)  # leftovers of a crashed save
            partial.mkdir(parents=True)
        distributed.barrier()
        parts = {rank_part(self.rank): rank_state}
        if trainer_state is not None:
            parts[TRAINER_PART] = trainer_state
        checksums: dict[str, str] = {}

        def write_parts() -> None:
            path = partial
            try:
                for name, state in parts.items():
                    path = partial / name
                    _write_atomic(path, lambda f, s=state: torch.save(s, f))
                    checksums[name] = sha256_file(path)
            except BaseException as err:  # surfaced on the training thread by finish()
                self._error = (err, path, state_bytes(parts))

        if self.async_save:
            parts = to_cpu(parts)
            thread = threading.Thread(target=write_parts, name=f"checkpoint-{step}", daemon=True)
            thread.start()
            self._pending = (step, thread, checksums)
            log.info("checkpoint step %d: state copied in %.2f s, writing in the background",
                     step, time.perf_counter() - start)
            return finished
        write_parts()
        self._pending = (step, None, checksums)
        return self.finish() or finished

    def finish(self) -> Path | None:
        """Complete the pending save (all ranks): gather checksums, manifest, rename, prune."""
        if self._pending is None:
            return None
        step, thread, checksums = self._pending
        self._pending = None
        start = time.perf_counter()
        if thread is not None:
            thread.join()
        written, self._error = self._error, None
        self._raise_on_any_rank(step, written)
        all_checksums = distributed.gather_object(checksums)
        path, committed = None, None
        if self.rank == 0:
            try:
                path = self._commit(step, all_checksums)
            except OSError as err:  # the manifest, the rename or the pointer
                written_bytes = _bytes_in(self.directory / f".{step_name(step)}.partial")
                committed = (err, self.directory / step_name(step), written_bytes)
            else:
                size_mb = sum(p.stat().st_size for p in path.iterdir()) / 1e6
                log.info("saved checkpoint %s (%.1f MB, finished in %.2f s)", path, size_mb, time.perf_counter() - start)
        # also the barrier: no rank resumes training before the checkpoint exists
        self._raise_on_any_rank(step, committed)
        return path

    def _raise_on_any_rank(self, step: int, failure: tuple[BaseException, Path, int] | None) -> None:
        """Every rank raises when a write failed on any rank (a collective), so none waits for the others."""
        if not distributed.any_rank(failure is not None):
            return
        if failure is None:
            raise CheckpointError(f"writing checkpoint {step_name(step)} failed on another rank (its message says why)")
        error, path, size = failure
        raise write_failure(self.directory, step, self.rank, error, path, size) from None

    def _commit(self, step: int, all_checksums: list[dict[str, str]]) -> Path:
        partial = self.directory / f".{step_name(step)}.partial"
        final = self.directory / step_name(step)
        files = {name: digest for checksums in all_checksums for name, digest in checksums.items()}
        manifest = {"step": step, "world_size": self.world_size, "files": files}
        _write_atomic(partial / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
        _fsync_dir(partial)
        if final.exists():  # the same step saved again (e.g. after a restart): replace it whole
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(self.directory)
        _write_atomic(self.directory / LATEST, lambda f: f.write(final.name.encode()))
        _fsync_dir(self.directory)
        self._prune()
        return final

    def _prune(self) -> None:
        """Keep the newest ``keep`` checkpoints, and every ``keep_every``-th step for good."""
        for old in list_checkpoints(self.directory)[: -self.keep]:
            if not (self.keep_every and _step_of(old) % self.keep_every == 0):
                shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- finding and loading


def _step_of(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def list_checkpoints(directory: Path) -> list[Path]:
    """Finished checkpoint directories, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name) and p.is_dir())


def verify(path: Path) -> dict[str, Any]:
    """The manifest of ``path``; ``CheckpointError`` unless every part matches its checksum."""
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST} (incomplete save?)")
    try:
        manifest = json.loads(manifest_file.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {path}: unreadable {MANIFEST} ({err})") from None
    if TRAINER_PART not in files:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} lists no {TRAINER_PART}")
    for name, digest in files.items():
        part = path / name
        if not part.is_file():
            raise CheckpointError(f"checkpoint {path}: part {name} is missing")
        if sha256_file(part) != digest:
            raise CheckpointError(f"checkpoint {part} does not match its checksum (truncated or corrupt)")
    return manifest


def latest_good_checkpoint(directory: Path) -> Path | None:
    """The newest checkpoint that verifies; None only when there is no checkpoint at all.

    A newer one that fails verification is reported by name and skipped; when checkpoints
    exist but none verifies, that is an error, not a silent fresh start.
    """
    candidates = list_checkpoints(directory)
    pointer = directory / LATEST
    if pointer.is_file():
        # the pointer names the newest complete save; anything newer is a leftover
        named = pointer.read_text().strip()
        candidates = [p for p in candidates if p.name <= named] or candidates
    problems = []
    for path in reversed(candidates):
        try:
            verify(path)
            return path
        except CheckpointError as err:
            log.warning("%s; trying the previous checkpoint", err)
            problems.append(str(err))
    if problems:
        raise CheckpointError(f"no good checkpoint in {directory}:\n  " + "\n  ".join(problems))
    return None


def _load_part(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # pickle/zip errors carry no file name
        raise CheckpointError(f"cannot load checkpoint part {path}: {err}") from err


def load_checkpoint(path: Path, rank: int = 0, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The trainer state of checkpoint ``path`` plus this rank's own part under ``"rank_state"``.

    ``rank_state`` is None when the checkpoint was saved by fewer ranks (an elastic resume).
    ``path`` may also be a single ``.pt`` file holding a trainer state (e.g. a copied model).
    """
    path = Path(path)
    if path.is_file():
        return {**_load_part(path, map_location), "rank_state": None, "saved_world_size": None}
    manifest = verify(path)
    state = _load_part(path / TRAINER_PART, map_location)
    own = path / rank_part(rank)
    state["rank_state"] = _load_part(own, map_location) if rank_part(rank) in manifest["files"] else None
    state["saved_world_size"] = manifest.get("world_size")
    return state
