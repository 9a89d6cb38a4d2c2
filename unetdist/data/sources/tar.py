"""WebDataset tar shards as a random-access :class:`~unetdist.data.sources.base.Source`.

``list_shards`` resolves a data root or a brace pattern to shard paths; :class:`TarShards`
reads any sample of any shard by index: a shard's member table is built on first use by
walking the tar headers with seeks (no data is read), and the shard is memory-mapped, so a
sample's members are views of the page cache (npy tiles are decoded without a copy; the
batch is the first copy). Shards must not be rewritten in place while a run reads them
(replacing a file, e.g. by a rename, is safe). Members are grouped into samples the way webdataset does (the
key is the name up to its first dot), and decoded with :func:`unetdist.data.samples.decode_field`,
which keeps 16-bit PNGs 16-bit.

Random access needs seekable files: local disks, shared file systems, mounted object
stores. Stream URLs (``pipe:``, ``http:``) are refused with a message saying so.
"""

from __future__ import annotations

import json
import mmap
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from unetdist.data.cache import LruCache
from unetdist.data.layout import DATASET_JSON
from unetdist.data.samples import DataError, Sample, SampleChecks, check_sample, decode_sample
from unetdist.data.sources.base import StoredSamples

_CACHED_SHARD_INDEXES = 256

# ---------------------------------------------------------------- shard lists


def _expand_pattern(pattern: str) -> list[str]:
    import braceexpand

    urls = [url for part in pattern.split("::") for url in braceexpand.braceexpand(part.strip()) if url]
    if not urls:
        raise ValueError(f"shard pattern {pattern!r} expands to no shards")
    missing = [
        url for url in urls if urlparse(url).scheme in ("", "file") and not Path(_local_path(url)).is_file()
    ]
    if missing:
        raise ValueError(
            f"shard pattern {pattern!r}: {len(missing)} shard(s) do not exist, e.g. {missing[:3]}"
        )
    return urls


def _local_path(url: str) -> str:
    return urlparse(url).path if url.startswith("file:") else url


def list_shards(root: str | None, split: str, pattern: str | None = None) -> list[str]:
    """Shard URLs for ``split`` ("train"/"val").

    ``pattern`` wins when given: brace-expanded (``dir/train-{000000..000007}.tar``), several
    joined with ``::``, any URL webdataset opens (``pipe:``, ``file:``, ...). Otherwise
    ``ROOT/dataset.json``'s ``"<split>_shards"`` joined to ROOT (may be empty for val).
    """
    if pattern:
        return _expand_pattern(pattern)
    if not root:
        raise ValueError(
            f"no {split} shard pattern and no data root: set data.root (a prepare output folder)"
        )
    meta_path = Path(root) / DATASET_JSON
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise ValueError(
            f"{meta_path} not found: is {root} a folder written by `python -m unetdist.prepare`?"
        ) from None
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{meta_path}: cannot read: {err}") from err
    names = meta.get(f"{split}_shards") if isinstance(meta, dict) else None
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"{meta_path}: expected a list of shard file names under {split + '_shards'!r}")
    paths = [os.path.join(root, name) for name in names]
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise ValueError(
            f"{meta_path}: {len(missing)} listed {split} shard(s) are missing, e.g. {missing[:3]}"
        )
    return paths


def shard_counts(root: str | None, split: str, shards: list[str]) -> list[int] | None:
    """Per-shard sample counts from ``ROOT/dataset.json`` (``"<split>_counts"``), or None if absent."""
    if not root:
        return None
    meta = json.loads((Path(root) / DATASET_JSON).read_text())
    counts = meta.get(f"{split}_counts")
    if counts is None:
        return None
    if not isinstance(counts, list) or len(counts) != len(shards):
        raise ValueError(f"{root}/dataset.json: {split}_counts must list one count per {split} shard")
    return [int(count) for count in counts]


# ---------------------------------------------------------------- tar member tables


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


def index_tar(path: str) -> TarIndex:
    """The samples of one tar shard, from its headers only (seeks over member data)."""
    samples: list[TarSample] = []
    truncated = False
    current_key, fields = None, []
    with open(path, "rb") as file:
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
        except tarfile.TarError as err:
            if not samples and current_key is None:
                raise DataError(f"shard {path}: not a readable tar file: {err}") from err
            truncated = True
    if current_key is not None and not truncated:
        samples.append(TarSample(current_key, tuple(fields)))
    return TarIndex(path, tuple(samples), truncated)


def count_samples(paths: list[str]) -> list[int]:
    """Samples per shard by reading tar headers (for shard patterns without a dataset.json)."""
    return [len(index_tar(path).samples) for path in paths]


class TarShards(StoredSamples):
    """Random access to the samples of local tar shards; safe to pickle into DataLoader workers.

    ``counts`` (from dataset.json) fixes the sample count of each shard, so a shard that
    turns out shorter (truncated) yields a :class:`DataError` per missing sample instead of
    shifting every later position. Without counts the shards' headers are read once here.
    """

    unit_name = "shard"

    def __init__(self, paths: list[str], checks: SampleChecks, counts: list[int] | None = None) -> None:
        streams = [path for path in paths if urlparse(path).scheme not in ("", "file")]
        if streams:
            raise ValueError(
                f"{len(streams)} shard(s) are stream URLs, e.g. {streams[0]!r}: the loader reads samples by "
                "random access and needs local or mounted files (copy the shards, or mount the bucket "
                "with s3fs/gcsfuse and give paths)"
            )
        self.paths = [_local_path(path) for path in paths]
        self.checks = checks
        self.counts = list(counts) if counts is not None else count_samples(self.paths)
        self._indexes = LruCache(_CACHED_SHARD_INDEXES)
        self._maps = LruCache(_CACHED_SHARD_INDEXES)

    @property
    def names(self) -> list[str]:
        return self.paths

    def _index(self, unit: int) -> TarIndex:
        return self._indexes.get(unit, lambda: index_tar(self.paths[unit]))

    def _mapped(self, unit: int) -> memoryview:
        """The whole shard file, memory-mapped: samples are views of the page cache, read without copies."""

        def map_file() -> memoryview:
            with open(self.paths[unit], "rb") as file:
                return memoryview(mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ))

        return self._maps.get(unit, map_file)

    def read(self, unit: int, indices: list[int]) -> list[Sample | DataError]:
        """Samples ``indices`` of shard ``unit``, in that order."""
        path = self.paths[unit]
        try:
            index = self._index(unit)
        except (OSError, DataError) as err:
            error = err if isinstance(err, DataError) else DataError(f"shard {path}: cannot read: {err}")
            return [error] * len(indices)
        results: list[Sample | DataError] = []
        for i in indices:
            if i >= len(index.samples):
                results.append(
                    DataError(
                        f"shard {path} sample #{i}: missing; the shard holds {len(index.samples)} complete "
                        f"sample(s) of {self.counts[unit]}"
                        + (" (the tar file is truncated)" if index.truncated else "")
                    )
                )
                continue
            try:
                data = self._mapped(unit)
            except (OSError, ValueError) as err:
                results.append(DataError(f"shard {path}: cannot read: {err}"))
                continue
            results.append(self._decode(index.samples[i], data, path))
        return results

    def _decode(self, sample: TarSample, data: memoryview, path: str) -> Sample | DataError:
        fields = {name: data[offset : offset + size] for name, offset, size in sample.members}
        try:
            image, mask, weight = decode_sample(fields, sample.key, f"shard {path}")
            return check_sample(sample.key, f"shard {path}", image, mask, weight, self.checks)
        except DataError as err:
            return err

    def key(self, unit: int, index: int) -> str:
        samples = self._index(unit).samples
        return samples[index].key if index < len(samples) else f"#{index}"
