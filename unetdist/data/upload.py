"""Prepared data into object stores: a data set uploaded whole, and indexes for shards already there.

``python -m unetdist.prepare ... --out s3://bucket/cells`` prepares into a local temporary folder
as it would into any folder (:mod:`unetdist.data.staging` and all), then copies every file under
it to the URL, relative paths kept::

    with remote_output("s3://bucket/cells") as folder:
        ...  # prepare into `folder`
    # now uploaded, dataset.json last; the folder is gone (also after a failure)

An object store has no rename, so "moved in when complete" becomes "announced when complete":
``dataset.json`` is uploaded after everything else has arrived, and its presence means the data
set is complete. Up to :data:`UPLOADS_IN_FLIGHT` files go up at once (a Zarr store is thousands of
small objects; each request is a round trip); large files go up in parts
(:func:`unetdist.data.remote.upload_file`). The temporary folder needs room for the whole data set
(``TMPDIR`` chooses where it is).

An earlier data set at the URL (a ``dataset.json``, or objects under ``data.zarr/``) is refused
before any work, not overwritten: its dataset.json would claim a data set while the new one was
still arriving, and Zarr leaves chunks that hold only the fill value unwritten, so a stale chunk
of the earlier store would be read as new data. Shards left by an upload that failed are
overwritten; those the new data set does not overwrite are named in a warning.

``python -m unetdist.prepare index URL...`` (:func:`index_shard`) writes the index of a shard
made elsewhere: remote shards are read by their index, never by scanning their tar headers.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

from unetdist.data.layout import DATASET_JSON, OWN_SHARD_NAME, STORE_NAME
from unetdist.data.remote import (
    RemoteError,
    display,
    download_file,
    is_remote,
    join,
    list_objects,
    local_path,
    upload_file,
    write_bytes,
)
from unetdist.data.samples import DataError
from unetdist.data.sources.tar_index import (
    file_sha256,
    index_document,
    index_tar,
    shard_index_url,
    write_local_index,
)

log = logging.getLogger(__name__)

UPLOADS_IN_FLIGHT = 8
TEMP_PREFIX = "unetdist-prepare-"
_UNLISTABLE = ("http", "https")  # plain HTTP servers have no LIST


# ---------------------------------------------------------------- a data set to a URL


def _relative_names(url: str) -> list[str]:
    """The names of the objects under ``url``, relative to it (list_objects gives ``url/name``)."""
    base = url.split("?")[0].rstrip("/")
    return [found[len(base) + 1 :] for found in list_objects(url)]


def check_remote_output(url: str) -> set[str]:
    """Before any work: the store answers a LIST of ``url`` (a missing bucket or credentials fail
    here, not after the data set is made) and holds no data set of prepare's there (module
    docstring). Returns the names of shards and indexes already there."""
    if urlsplit(url).scheme.lower() in _UNLISTABLE:
        return set()
    try:
        names = _relative_names(url)
    except RemoteError as err:
        raise RemoteError(
            f"{err}; --out must be in an existing bucket that the credentials in the environment "
            "(AWS_*, GOOGLE_*, AZURE_*) can list and write"
        ) from None
    earlier = [name for name in names if name == DATASET_JSON or name.startswith(f"{STORE_NAME}/")]
    if earlier:
        in_store = sum(name.startswith(f"{STORE_NAME}/") for name in earlier)
        held = (["dataset.json"] if DATASET_JSON in earlier else []) + (
            [f"{in_store} object(s) under {STORE_NAME}/"] if in_store else []
        )
        raise RemoteError(
            f"{display(url)} already holds a data set ({', '.join(held)}); prepare to another URL, or delete "
            f"prepare's objects there first (e.g. `aws s3 rm --recursive {display(url).rstrip('/')}/`)"
        )
    return {name for name in names if OWN_SHARD_NAME.match(name)}


def upload_tree(folder: Path, url: str) -> list[str]:
    """Copy every file under ``folder`` to ``url``, relative paths kept, ``dataset.json`` last
    (only once all others have arrived); the names uploaded. A failure names the object and says
    that the data set at ``url`` is incomplete."""
    names = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    pool = ThreadPoolExecutor(UPLOADS_IN_FLIGHT, thread_name_prefix="upload")
    try:
        first = [name for name in names if name != DATASET_JSON]
        futures = [pool.submit(upload_file, folder / name, join(url, name)) for name in first]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for future in futures:  # in order: the first failure is the one reported
            if future in done and future.exception() is not None:
                raise future.exception()
        pool.shutdown()
        if DATASET_JSON in names:
            upload_file(folder / DATASET_JSON, join(url, DATASET_JSON))
    except DataError as err:
        raise RemoteError(f"{err}; the data set at {display(url)} is incomplete (no dataset.json)") from None
    finally:
        pool.shutdown(cancel_futures=True)  # after a failure or Ctrl-C: only those in flight finish
    log.info("uploaded %d file(s) to %s", len(names), display(url))
    return names


@contextmanager
def remote_output(url: str) -> Iterator[Path]:
    """A local temporary folder to prepare ``url``'s data set in: uploaded on a normal exit
    (:func:`upload_tree`), removed in every case."""
    there_before = check_remote_output(url)
    folder = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))
    try:
        yield folder
        uploaded = set(upload_tree(folder, url))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    stale = sorted(there_before - uploaded)
    if stale:
        log.warning(
            "%s: %d shard object(s) of an earlier, failed upload are not part of the new data set "
            "(not in dataset.json), e.g. %s; delete them",
            display(url),
            len(stale),
            ", ".join(stale[:3]),
        )


# ---------------------------------------------------------------- shard indexes


def index_shard(shard: str) -> dict:
    """Write the index of the tar ``shard`` (a path or a URL) beside it; the index's content.

    A remote shard is downloaded once to a temporary file (removed after) and indexed from there.
    """
    if not is_remote(shard):
        written = write_local_index(local_path(shard))
        return json.loads(Path(written).read_text())
    with tempfile.TemporaryDirectory(prefix=TEMP_PREFIX) as folder:
        copy = os.path.join(folder, "shard.tar")
        download_file(shard, copy)
        try:
            index = index_tar(copy)
        except DataError as err:
            raise DataError(str(err).replace(copy, display(shard))) from None
        document = index_document(replace(index, path=shard), file_sha256(copy))
        write_bytes(shard_index_url(shard), json.dumps(document, separators=(",", ":")).encode())
    return document
