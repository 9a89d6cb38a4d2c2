"""Writing a data set beside its output folder and moving it in only when it is complete.

:func:`unetdist.data.prepare.prepare_dataset` writes into a staging folder::

    with staged_output(out_dir) as staging:
        ...  # shards or data.zarr, then dataset.json, into `staging`

On a normal exit the new data set replaces an earlier one in ``out_dir``; on any exception
(a bad image pair, Ctrl-C, the SIGTERM that ``python -m unetdist.prepare`` turns into an
exit) only the staging folder is removed, and ``out_dir`` is left byte for byte as it was.

Only prepare's own names in ``out_dir`` are ever moved or deleted (:func:`previous_output`):
an output folder shared with other files (``--synthetic``'s ``raw/``, notes) keeps them. The
staging folder ``.<name>.partial-<pid>`` and the folder the earlier data set is moved
aside to, ``.<name>.previous-<pid>``, sit beside ``out_dir`` (inside it where its parent is
not writable or is another file system), so every move is a rename on one file system.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from unetdist.data.layout import DATASET_JSON, OWN_SHARD_NAME, STORE_NAME

log = logging.getLogger(__name__)

PARTIAL, PREVIOUS = "partial", "previous"


def side_folder(out_dir: Path, role: str) -> Path:
    """``.<name>.<role>-<pid>`` beside ``out_dir``, or inside it where the parent is not writable
    or is another file system (``out_dir`` a mount point): a rename must not cross devices."""
    out_dir = out_dir.resolve()
    name = f".{out_dir.name}.{role}-{os.getpid()}"
    parent = out_dir.parent
    if os.access(parent, os.W_OK) and parent.stat().st_dev == out_dir.stat().st_dev:
        return parent / name
    return out_dir / name


def previous_output(out_dir: Path) -> list[Path]:
    """What an earlier prepare wrote to ``out_dir``, dataset.json first: its shards and their
    indexes (``train|val-NNNNNN.tar[.index.json]``), its Zarr store and dataset.json, and nothing else."""
    found = [
        path
        for path in sorted(out_dir.iterdir())
        if (path.name == STORE_NAME and path.is_dir()) or (OWN_SHARD_NAME.match(path.name) and path.is_file())
    ]
    dataset_json = out_dir / DATASET_JSON
    return ([dataset_json] if dataset_json.is_file() else []) + found


def warn_leftovers(out_dir: Path) -> None:
    """Name the staging and set-aside folders that an interrupted (killed) prepare left behind."""
    resolved = out_dir.resolve()
    for folder in {resolved.parent, resolved}:
        for role in (PARTIAL, PREVIOUS):
            for path in sorted(folder.glob(f".{glob.escape(resolved.name)}.{role}-*")):
                if role == PARTIAL:
                    log.warning("%s: an incomplete data set left by an interrupted prepare; delete it", path)
                else:
                    log.warning(
                        "%s: the data set an interrupted prepare was replacing; if %s is missing, "
                        "move this folder's contents back, else delete it",
                        path,
                        out_dir / DATASET_JSON,
                    )


def swap_in(staging: Path, out_dir: Path) -> None:
    """Move the complete data set in ``staging`` into ``out_dir`` in place of an earlier one.

    The earlier output goes aside first, dataset.json first (so ``out_dir`` never claims a
    data set it does not hold), then the new one comes in, dataset.json last; a failure on
    the way moves everything back. The set-aside folder is deleted at the end.
    """
    previous = previous_output(out_dir)
    incoming = sorted(staging.iterdir(), key=lambda path: path.name == DATASET_JSON)
    aside = side_folder(out_dir, PREVIOUS)
    moved_out: list[Path] = []
    moved_in: list[Path] = []
    made_aside = False
    try:
        if previous:
            aside.mkdir()
            made_aside = True
        for path in previous:
            os.replace(path, aside / path.name)
            moved_out.append(path)
        for path in incoming:
            os.replace(path, out_dir / path.name)
            moved_in.append(path)
    except BaseException:
        for path in reversed(moved_in):
            os.replace(out_dir / path.name, path)
        for path in reversed(moved_out):  # dataset.json back last
            os.replace(aside / path.name, path)
        if made_aside:
            aside.rmdir()
        raise
    if previous:
        log.info("replaced the previous output in %s (%d item(s))", out_dir, len(previous))
        shutil.rmtree(aside, ignore_errors=True)
        if aside.exists():
            log.warning("%s: could not delete the previous data set set aside here; delete it", aside)


@contextmanager
def staged_output(out_dir: Path) -> Iterator[Path]:
    """A fresh staging folder for a new data set of ``out_dir`` (created if missing); see the
    module docstring for what happens on a normal exit and on an exception."""
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    warn_leftovers(out_dir)
    staging = side_folder(out_dir, PARTIAL)
    try:
        staging.mkdir()
        yield staging
        swap_in(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()  # a failed first run leaves no empty output folder behind
