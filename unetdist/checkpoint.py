"""Durable checkpoints: atomic writes, checksums, a ``latest`` pointer, safe loads.

A save writes ``step-00000100.pt`` under a temporary name in the same directory, fsyncs it,
records its SHA-256 beside it, renames it into place and fsyncs the directory; only then
does ``latest`` move. A crash at any point leaves the previous good checkpoint in charge.
Loads use ``torch.load(weights_only=True)``: a checkpoint cannot execute code.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

LATEST = "latest"
_NAME = re.compile(r"^step-(\d{8})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupt or from another run."""


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` durably as ``directory/step-XXXXXXXX.pt``; keep the newest ``keep``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step-{step:08d}.pt"
    tmp = directory / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        _write_atomic(path.with_name(path.name + ".sha256"), _sha256(tmp).encode())
        os.replace(tmp, path)
        _fsync_dir(directory)
    finally:
        tmp.unlink(missing_ok=True)
    _write_atomic(directory / LATEST, path.name.encode())
    _fsync_dir(directory)
    _prune(directory, keep)
    return path


def _prune(directory: Path, keep: int) -> None:
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
        old.with_name(old.name + ".sha256").unlink(missing_ok=True)


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def verify(path: Path) -> None:
    """Raise ``CheckpointError`` unless ``path`` matches its recorded checksum."""
    checksum_file = path.with_name(path.name + ".sha256")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not checksum_file.is_file():
        raise CheckpointError(f"checkpoint {path} has no checksum file {checksum_file.name} (incomplete save?)")
    if _sha256(path) != checksum_file.read_text().strip():
        raise CheckpointError(f"checkpoint {path} does not match its checksum (truncated or corrupt)")


def latest_good_checkpoint(directory: Path) -> Path | None:
    """The newest checkpoint that verifies, reporting any newer one that does not."""
    pointer = directory / LATEST
    candidates = list_checkpoints(directory)
    if pointer.is_file():
        named = directory / pointer.read_text().strip()
        # the pointer names the newest complete save; anything newer is a leftover
        candidates = [p for p in candidates if p.name <= named.name] or candidates
    for path in reversed(candidates):
        try:
            verify(path)
            return path
        except CheckpointError as err:
            log.warning("%s; falling back to the previous checkpoint", err)
    return None


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    verify(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # pickle/zip errors carry no file name
        raise CheckpointError(f"cannot load checkpoint {path}: {err}") from err
