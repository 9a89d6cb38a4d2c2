"""WebDataset tar shards, local or at URLs, as a random-access :class:`~unetdist.data.sources.base.Source`.

``list_shards`` resolves a data root or a brace pattern to shard paths or URLs; :class:`TarShards`
reads any sample of any shard by index, from the shard's member table
(:mod:`unetdist.data.sources.tar_index`).

Local shards: the table is built on first use by walking the tar headers with seeks (no data
is read), and the shard is memory-mapped, so a sample's members are views of the page cache
(npy tiles are decoded without a copy; the batch is the first copy). Shards must not be
rewritten in place while a run reads them (replacing a file, e.g. by a rename, is safe).

Remote shards (``s3://``, ``gs://``, ``az://``, ``https://``): the table is the index file
beside the shard, and a sample is one byte range of it, fetched by :class:`~unetdist.data.fetch.Fetcher`
(samples that touch are one GET; the node cache first). Members are decoded with
:func:`unetdist.data.samples.decode_field`, which keeps 16-bit PNGs 16-bit.

Span mode: with a node cache that can hold the split (``data.cache_limit_gb`` less the node's
readahead window, against the split's size estimated from its first shard), the unit fetched
and cached is a span, the samples starting in one ``data.fetch_span_mb`` of a shard: one GET
(by one process of the node) for all of them, one cache entry, kept memory-mapped by each
process, so that a warm epoch reads like a local one (a file open per sample cost a third of
the local rate). An epoch reads every sample once, so a fetched span is all used, from the
cache: GETs per sample fall from ~1 to a few hundredths, as S3 bills them and as moto (~8 ms
of CPU per GET here) serves them. Without such a cache each sample is fetched on its own.
"""

from __future__ import annotations

import json
import mmap
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from unetdist.data.cache import LruCache
from unetdist.data.fetch import Fetcher, Piece
from unetdist.data.layout import DATASET_JSON
from unetdist.data.node_cache import Schedule, entry_name
from unetdist.data.remote import display, exists, is_remote, join, local_path, read_bytes
from unetdist.data.samples import DataError, Sample, SampleChecks, check_sample, decode_sample
from unetdist.data.sources.base import StoredSamples, WeightsOf
from unetdist.data.sources.tar_index import TarIndex, TarSample, shard_table

_CACHED_SHARD_INDEXES = 256
_MAPPED_SPANS = 1024  # per process: 8 GB of address space at 8 MB, no memory (the page cache's pages)

# ---------------------------------------------------------------- shard lists


def _expand_pattern(pattern: str) -> list[str]:
    import braceexpand

    urls = [url for part in pattern.split("::") for url in braceexpand.braceexpand(part.strip()) if url]
    if not urls:
        raise ValueError(f"shard pattern {pattern!r} expands to no shards")
    missing = [
        url for url in urls if urlparse(url).scheme in ("", "file") and not Path(local_path(url)).is_file()
    ]
    if missing:
        raise ValueError(
            f"shard pattern {pattern!r}: {len(missing)} shard(s) do not exist, e.g. {missing[:3]}"
        )
    return urls


def dataset_meta(root: str) -> dict:
    """``ROOT/dataset.json`` (ROOT a folder or a URL), parsed; a ValueError naming it otherwise."""
    meta_url = join(root, DATASET_JSON)
    try:
        meta = json.loads(read_bytes(meta_url))
    except FileNotFoundError:
        meta = None
    except DataError as err:  # remote: names URL and cause (403: credentials)
        if ": 404" not in str(err):
            raise
        meta = None
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{display(meta_url)}: cannot read: {err}") from err
    if meta is None:
        raise ValueError(
            f"{display(meta_url)} not found: is {display(root)} a folder written by `python -m unetdist.prepare`?"
        )
    if not isinstance(meta, dict):
        raise ValueError(f"{display(meta_url)}: expected a JSON object")
    return meta


def list_shards(root: str | None, split: str, pattern: str | None = None) -> list[str]:
    """Shard paths or URLs for ``split`` ("train"/"val").

    ``pattern`` wins when given: brace-expanded (``dir/train-{000000..000007}.tar``,
    ``s3://bucket/cells/train-{000000..000007}.tar``), several joined with ``::``. Otherwise
    ``ROOT/dataset.json``'s ``"<split>_shards"`` joined to ROOT (may be empty for val).
    """
    if pattern:
        return _expand_pattern(pattern)
    if not root:
        raise ValueError(
            f"no {split} shard pattern and no data root: set data.root (a prepare output folder)"
        )
    meta = dataset_meta(root)
    meta_url = display(join(root, DATASET_JSON))
    names = meta.get(f"{split}_shards")
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"{meta_url}: expected a list of shard file names under {split + '_shards'!r}")
    paths = [join(root, name) for name in names]
    # remote shards are not checked one by one here (a HEAD each); a missing one is named when read
    missing = [path for path in paths if not is_remote(path) and not exists(path)]
    if missing:
        raise ValueError(
            f"{meta_url}: {len(missing)} listed {split} shard(s) are missing, e.g. {missing[:3]}"
        )
    return paths


def shard_counts(root: str | None, split: str, shards: list[str]) -> list[int] | None:
    """Per-shard sample counts from ``ROOT/dataset.json`` (``"<split>_counts"``), or None if absent."""
    if not root:
        return None
    counts = dataset_meta(root).get(f"{split}_counts")
    if counts is None:
        return None
    if not isinstance(counts, list) or len(counts) != len(shards):
        raise ValueError(f"{display(root)}/dataset.json: {split}_counts must list one count per {split} shard")
    return [int(count) for count in counts]


# ---------------------------------------------------------------- samples


def count_samples(paths: list[str]) -> list[int]:
    """Samples per shard from their tables (for shard patterns without a dataset.json)."""
    return [len(shard_table(path).samples) for path in paths]


class TarShards(StoredSamples):
    """Random access to the samples of tar shards; safe to pickle into DataLoader workers.

    ``counts`` (from dataset.json) fixes the sample count of each shard, so a shard that
    turns out shorter (truncated) yields a :class:`DataError` per missing sample instead of
    shifting every later position. Without counts the shards' tables are read once here.
    Remote shards need ``fetcher`` (:func:`unetdist.data.sources.open_source` makes it).
    """

    unit_name = "shard"

    def __init__(
        self,
        paths: list[str],
        checks: SampleChecks,
        counts: list[int] | None = None,
        fetcher: Fetcher | None = None,
    ) -> None:
        streams = [path for path in paths if urlparse(path).scheme not in ("", "file") and not is_remote(path)]
        if streams:
            raise ValueError(
                f"{len(streams)} shard(s) are stream URLs, e.g. {streams[0]!r}: the loader reads samples by "
                "random access: give paths or object-store URLs (s3://, gs://, az://, https://)"
            )
        self.paths = [path if is_remote(path) else local_path(path) for path in paths]
        self.remote = any(is_remote(path) for path in self.paths)
        if self.remote and fetcher is None:
            fetcher = Fetcher(8, None)
        self.fetcher = fetcher
        self.checks = checks
        self.counts = list(counts) if counts is not None else count_samples(self.paths)
        self._indexes = LruCache(_CACHED_SHARD_INDEXES)
        self._maps = LruCache(_CACHED_SHARD_INDEXES)
        self._span_bytes: int | None = None  # spans in use (0: sample by sample); decided on first read
        self._span_starts = LruCache(_CACHED_SHARD_INDEXES)
        self._spans_mapped = LruCache(_MAPPED_SPANS)

    @property
    def names(self) -> list[str]:
        return [display(path) for path in self.paths]

    def follow(self, schedule: Schedule) -> None:
        super().follow(schedule)
        if self.fetcher is not None and self.fetcher.cache is not None:
            self.fetcher.cache.schedule = schedule

    def _index(self, unit: int) -> TarIndex:
        def table() -> TarIndex:
            index = shard_table(self.paths[unit])
            if self.fetcher is not None and index.size >= 0:
                self.fetcher.sizes[self.paths[unit]] = index.size
            return index

        return self._indexes.get(unit, table)

    def _mapped(self, unit: int) -> memoryview:
        """The whole shard file, memory-mapped: samples are views of the page cache, read without copies."""

        def map_file() -> memoryview:
            with open(self.paths[unit], "rb") as file:
                return memoryview(mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ))

        return self._maps.get(unit, map_file)

    def _sample_bytes(self, unit: int, samples: list[TarSample], wanted: list[int]) -> list[tuple[memoryview, int] | DataError]:
        """(bytes holding sample i's members, the offset those bytes start at) per wanted index."""
        if not self.remote:
            try:
                data = self._mapped(unit)
            except (OSError, ValueError) as err:
                return [DataError(f"shard {self.paths[unit]}: cannot read: {err}")] * len(wanted)
            return [(data, 0)] * len(wanted)
        assert self.fetcher is not None
        if self._span():
            return self._span_views(unit, samples, wanted)[0]
        pieces = [Piece(entry_name(unit, i, "s"), self.paths[unit], *samples[i].span) for i in wanted]
        return [
            got if isinstance(got, DataError) else (memoryview(got), piece.start)
            for piece, got in zip(pieces, self.fetcher.get(pieces), strict=True)
        ]

    def prefetch(self, units: np.ndarray, indices: np.ndarray) -> int | None:
        """Span mode: the spans of these samples fetched into the node cache and mapped (a fetch that
        fails is left to the read, which names it), and the bytes of those that were not in the
        node cache; else None (see the Source protocol)."""
        if not self.remote or not self._span():
            return None
        total = 0
        for unit in np.unique(units).tolist():
            try:
                samples = self._index(unit).samples
            except (OSError, DataError):
                continue
            wanted = sorted({i for i in indices[units == unit].tolist() if i < len(samples)})
            total += self._span_views(unit, list(samples), wanted)[1]
        return total

    def _span_views(
        self, unit: int, samples: list[TarSample], wanted: list[int]
    ) -> tuple[list[tuple[memoryview, int] | DataError], int]:
        """Span mode: each wanted sample's span, mapped from the node cache (kept mapped: reads then
        cost what a local shard's do), or fetched whole by one GET (one process of the node); and
        the bytes of the spans that were not in the node cache (fetched, or waited for)."""
        span, url, cache = self._span(), self.paths[unit], self.fetcher.cache
        keys = [(unit, samples[i].span[0] // span) for i in wanted]
        views = [self._spans_mapped.peek(key) for key in keys]
        if None not in views:  # a warm cache: as cheap as a local shard's read
            return views, 0
        held = dict(zip(keys, views, strict=True))  # (view, first byte) per span; None: not mapped here
        missing: dict[tuple[int, int], Piece] = {}
        missing_before = {key for key, got in held.items() if got is None}
        for key in missing_before:
            starts = self._span_starts.get(unit, lambda: np.array([sample.span[0] for sample in samples]))
            first, last = np.searchsorted(starts, [key[1] * span, (key[1] + 1) * span]).tolist()
            piece = Piece(entry_name(unit, first, f"n{last - first}"), url, samples[first].span[0],
                          samples[last - 1].span[1], group=f"{url} {first}")  # fmt: skip
            mapped = cache.mapped(piece.name)
            held[key] = (mapped, piece.start) if mapped is not None else None
            if mapped is None:
                missing[key] = piece
        unmapped = set()  # fetched but not cached (a full or unwritable cache): held for this read only
        for (key, piece), got in zip(missing.items(), self.fetcher.get(list(missing.values())), strict=True):
            mapped = None if isinstance(got, DataError) else cache.mapped(piece.name)
            if mapped is None and not isinstance(got, DataError):
                unmapped.add(key)
            held[key] = got if isinstance(got, DataError) else (mapped or memoryview(got), piece.start)
        for key, got in held.items():
            if not isinstance(got, DataError) and key in missing_before and key not in unmapped:
                self._spans_mapped.put(key, got)
        brought = sum(len(held[key][0]) for key in missing if not isinstance(held[key], DataError))
        return [held[key] for key in keys], brought

    def _span(self) -> int:
        """``data.fetch_span_mb`` in bytes when the node cache can hold the split, else 0; the split's
        size is estimated from its first shard's bytes per sample (its index: one small GET)."""
        if self._span_bytes is None:
            fetcher, self._span_bytes = self.fetcher, 0
            if fetcher is not None and fetcher.cache is not None and fetcher.span_bytes > 0:
                first = next((unit for unit, count in enumerate(self.counts) if count), None)
                try:
                    index = self._index(first) if first is not None else None
                except (OSError, DataError):  # named where that shard is read; sample by sample meanwhile
                    index = None
                if index is not None and index.samples and index.size > 0:
                    estimate = index.size / len(index.samples) * sum(self.counts)
                    self._span_bytes = fetcher.span_bytes if estimate <= fetcher.cache_room_bytes else 0
        return self._span_bytes

    def read(self, unit: int, indices: list[int]) -> list[Sample | DataError]:
        """Samples ``indices`` of shard ``unit``, in that order."""
        path = display(self.paths[unit])
        try:
            index = self._index(unit)
        except (OSError, DataError) as err:
            error = err if isinstance(err, DataError) else DataError(f"shard {path}: cannot read: {err}")
            return [error] * len(indices)
        present = [i for i in indices if i < len(index.samples)]
        held = dict(zip(present, self._sample_bytes(unit, list(index.samples), present), strict=True))
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
            got = held[i]
            if isinstance(got, DataError):
                results.append(DataError(f"shard {path} sample {index.samples[i].key}: {got}"))
                continue
            results.append(self._decode(index.samples[i], *got, path, self.weights_of(unit, i)))
        return results

    def _decode(
        self, sample: TarSample, data: memoryview, base: int, path: str, weights_of: WeightsOf | None
    ) -> Sample | DataError:
        fields = {name: data[offset - base : offset - base + size] for name, offset, size in sample.members}
        try:
            image, mask, weight = decode_sample(fields, sample.key, f"shard {path}", self.checks.keys)
            _check_dims(image, sample.key, path, self.checks.spatial_dims)
            return check_sample(sample.key, f"shard {path}", image, mask, weight, self.checks, weights_of)
        except DataError as err:
            return err

    def key(self, unit: int, index: int) -> str:
        samples = self._index(unit).samples
        return samples[index].key if index < len(samples) else f"#{index}"


def _check_dims(image: np.ndarray, key: str, path: str, spatial_dims: int) -> None:
    """A volume's tile read by a 2-D model, or an image's by a 3-D one: one line saying so, before
    the shape check's, which would only say that the shape is not the expected one."""
    stored = image.ndim - 1  # [C, *spatial]
    if stored in (2, 3) and stored != spatial_dims:
        kind = "a 3-D tile (a volume's)" if stored == 3 else "a 2-D tile (an image's)"
        raise DataError(f"shard {path} sample {key}: {kind}, image shape {tuple(image.shape)}, but "
                        f"model.spatial_dims={spatial_dims}; set model.spatial_dims={stored} for these shards")  # fmt: skip
