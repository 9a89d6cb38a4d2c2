"""Tar shard member tables: read from the headers of a local shard, or from the index file beside it.

A remote shard is never scanned (fsspec's ``tar::s3://`` costs ~2 GETs per member): ``prepare``
writes ``SHARD.index.json`` beside each shard (:func:`shard_index_url`), and
``python -m unetdist.prepare index URL...`` writes it for shards made elsewhere. With it, a
run of consecutive samples is one contiguous byte range, one ranged GET::

    {"format": "unetdist-tar-index", "version": 1, "shard": "train-000000.tar",
     "size": 1310720, "sha256": "...",
     "samples": [["img1_y0_x0", [["image.npy", 512, 73856], ["mask.npy", 74752, 9344]]], ...]}

``size`` is checked on every ranged read of the shard (the response carries the object's
size), so a shard rewritten after its index was made is an error, never wrong bytes.
Members are grouped into samples the way webdataset does (the key is the name up to its
first dot).
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from dataclasses import dataclass

from unetdist.data.remote import display, is_remote, local_path, read_bytes
from unetdist.data.samples import DataError

INDEX_FORMAT = "unetdist-tar-index"
INDEX_VERSION = 1
INDEX_SUFFIX = ".index.json"


@dataclass(frozen=True)
class TarSample:
    key: str
    members: tuple[tuple[str, int, int], ...]  # (field name, data offset, size)

    @property
    def span(self) -> tuple[int, int]:
        return self.members[0][1], self.members[-1][1] + self.members[-1][2]


@dataclass(frozen=True)
class TarIndex:
    path: str
    samples: tuple[TarSample, ...]
    truncated: bool  # the file ends inside a member or header
    size: int = -1  # the shard's size in bytes (-1: not known)


def shard_index_url(shard: str) -> str:
    """Where the index of ``shard`` lives: beside it, same name plus ``.index.json`` (before a query string)."""
    path, mark, query = shard.partition("?")
    return path + INDEX_SUFFIX + mark + query


def index_tar(path: str) -> TarIndex:
    """The samples of one local tar shard, from its headers only (seeks over member data)."""
    samples: list[TarSample] = []
    truncated = False
    current_key, fields = None, []
    with open(local_path(path), "rb") as file:
        file_size = os.fstat(file.fileno()).st_size
        try:
            with tarfile.open(fileobj=file, mode="r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    if member.offset_data + member.size > file_size:
                        truncated = True
                        break
                    folder, base = os.path.split(member.name)
                    stem, dot, field = base.partition(".")
                    key = os.path.join(folder, stem) if folder else stem
                    if key != current_key:
                        if current_key is not None:
                            samples.append(TarSample(current_key, tuple(fields)))
                        current_key, fields = key, []
                    fields.append((field if dot else "", member.offset_data, member.size))
                # a cut exactly between members looks like a clean end to tarfile: a complete
                # archive ends with two zero blocks after its last member
                truncated = truncated or file_size < tar.offset + 2 * tarfile.BLOCKSIZE
        except tarfile.TarError as err:
            if not samples and current_key is None:
                raise DataError(f"shard {path}: not a readable tar file: {err}") from err
            truncated = True
    if current_key is not None and not truncated:
        samples.append(TarSample(current_key, tuple(fields)))
    return TarIndex(path, tuple(samples), truncated, file_size)


def index_document(index: TarIndex, sha256: str) -> dict:
    """The JSON content of a shard's index file."""
    if index.truncated:
        raise DataError(f"shard {display(index.path)}: the tar file is truncated; not indexing it")
    return {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "shard": os.path.basename(index.path.split("?")[0]),
        "size": index.size,
        "sha256": sha256,
        "samples": [[s.key, [list(m) for m in s.members]] for s in index.samples],
    }


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(local_path(path), "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_local_index(shard: str) -> str:
    """Index a local shard and write ``SHARD.index.json`` beside it (temp file + rename); its path."""
    document = index_document(index_tar(shard), file_sha256(shard))
    target = local_path(shard_index_url(shard))
    partial = f"{target}.partial-{os.getpid()}"
    with open(partial, "w") as file:
        json.dump(document, file, separators=(",", ":"))
    os.replace(partial, target)
    return target


def read_index(shard: str) -> TarIndex:
    """The member table of ``shard`` from its index file (remote shards need one)."""
    url = shard_index_url(shard)
    try:
        document = json.loads(read_bytes(url))
    except DataError as err:
        if ": 404" in str(err):
            raise DataError(
                f"shard {display(shard)}: no index {display(url)}; remote shards are read by their index: "
                f"write it once with `python -m unetdist.prepare index {display(shard)}`"
            ) from None
        raise
    except (OSError, ValueError) as err:
        raise DataError(f"{display(url)}: cannot read the shard index: {err}") from None
    if not isinstance(document, dict) or document.get("format") != INDEX_FORMAT:
        raise DataError(f"{display(url)}: not a unetdist shard index (expected format {INDEX_FORMAT!r})")
    if document.get("version") != INDEX_VERSION:
        raise DataError(f"{display(url)}: shard index version {document.get('version')!r}, expected {INDEX_VERSION}")
    try:
        samples = tuple(
            TarSample(str(key), tuple((str(f), int(o), int(n)) for f, o, n in members))
            for key, members in document["samples"]
        )
        return TarIndex(shard, samples, False, int(document["size"]))
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{display(url)}: malformed shard index: {err}") from None


def shard_table(shard: str) -> TarIndex:
    """A shard's member table: its index for a remote shard, its headers for a local one."""
    return read_index(shard) if is_remote(shard) else index_tar(shard)
