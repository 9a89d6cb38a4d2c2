"""Zarr v3 stores of pre-tiled samples (``prepare --format zarr``) as a random-access
:class:`~unetdist.data.sources.base.Source`.

The store's arrays are described in :mod:`unetdist.data.layout`, and how its chunks and
codecs were chosen in :mod:`unetdist.data.writers`. One unit: the split's arrays; blocks
default to the chunk length, so a block read is one chunk decode per array.

Uncompressed chunks are memory-mapped, so, as with tar shards, a store must not be rewritten
in place while a run reads it; like the shards' npy members they carry no checksum: a chunk
cut short is a DataError, damaged bytes in a whole-length one go unnoticed.

Reading opens the store lazily in the process that reads (never in the parent before a
fork), which avoids the deadlocks reported for zarr v3's event loop under forked workers.
Blosc chunks are decoded on the reading thread, never by Blosc's global thread pool, which
forked workers cannot use: numcodecs keeps the pool out of child processes, and
``numcodecs.blosc.use_threads = False`` keeps it out of a main process that reads
(``num_workers=0``) too, where it would add threads beside training's own.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

from unetdist.data.cache import LruCache
from unetdist.data.fetch import Fetcher, Piece
from unetdist.data.layout import sample_key
from unetdist.data.node_cache import Schedule, entry_name
from unetdist.data.remote import display, is_remote, join, zarr_store
from unetdist.data.samples import DataError, Sample, SampleChecks, check_sample
from unetdist.data.sources.base import StoredSamples

_CACHED_ORIGIN_CHUNKS = 64  # of the origin table's (1 << 16)-row chunks: ~50 MB at most
_CACHED_CHUNK_MAPS = 256  # per array: uncompressed chunk files kept mapped (page cache, not private memory)


def _blosc_decompress(data: bytes) -> bytes:
    """A Blosc chunk decompressed, after checking its length against its header: Blosc 1 trusts
    the header's size and reads past the end of a cut-short chunk (garbage, or a crash)."""
    import numcodecs.blosc

    header_bytes = int.from_bytes(data[12:16], "little") if len(data) >= 16 else -1
    if header_bytes != len(data):
        raise ValueError(f"Blosc chunk of {len(data)} bytes, its header says {header_bytes}")
    return numcodecs.blosc.decompress(data)


class _ChunkFiles:
    """Whole chunks of one local, unsharded array read straight from their files.

    zarr's own path costs ~1 ms of CPU per chunk here in asyncio tasks and thread hand-offs,
    several times the decompression, and that set the pace of Zarr loading. This covers the
    layout :class:`~unetdist.data.writers.ZarrWriter` writes (chunks split axis 0 only; bytes codec + at most one Zstd or
    Blosc compressor, both self-describing); :meth:`for_array` returns None for anything
    else, and the caller then reads through zarr. Uncompressed chunks are memory-mapped, as
    tar shards are (:mod:`unetdist.data.sources.tar`): tiles are views of the page cache and
    the batch is the first copy; the most recent maps are kept, which halves the cost of a
    read again (~110 vs ~210 us per 1 MiB chunk, copy into the batch included).
    """

    def __init__(self, folder: Path, array, decompress) -> None:
        self.folder, self.array, self.decompress = folder, array, decompress
        self.rows = array.chunks[0]
        self.dtype = array.dtype.newbyteorder("<")
        self.chunk_shape = array.chunks
        self._maps = LruCache(_CACHED_CHUNK_MAPS)

    @classmethod
    def for_array(cls, folder: Path, array) -> _ChunkFiles | None:
        import numcodecs
        import numcodecs.blosc
        from zarr.codecs import BloscCodec, BytesCodec, ZstdCodec

        metadata = array.metadata
        codecs = getattr(metadata, "codecs", None)
        if getattr(metadata, "zarr_format", None) != 3 or not codecs or not isinstance(codecs[0], BytesCodec):
            return None
        if (
            tuple(array.chunks[1:]) != tuple(array.shape[1:])
            or getattr(codecs[0].endian, "value", "little") != "little"
        ):
            return None
        if len(codecs) == 1:
            return cls(folder, array, None)
        if len(codecs) == 2 and isinstance(codecs[1], ZstdCodec):
            return cls(folder, array, numcodecs.Zstd().decode)
        if len(codecs) == 2 and isinstance(codecs[1], BloscCodec):
            # Called on a main process's main thread, numcodecs would decode with Blosc's global
            # thread pool (see the module docstring); single-threaded instead, through the one
            # switch numcodecs offers, process-wide.
            numcodecs.blosc.use_threads = False
            return cls(folder, array, _blosc_decompress)
        return None

    def chunk_key(self, chunk: int) -> str:
        return self.array.metadata.encode_chunk_key((chunk,) + (0,) * (len(self.chunk_shape) - 1))

    def _decoded(self, raw: bytes) -> np.ndarray:
        if self.decompress:
            raw = self.decompress(raw)
        return np.frombuffer(raw, dtype=self.dtype).reshape(self.chunk_shape)

    def _chunk(self, chunk: int, held: dict) -> np.ndarray:
        """One whole chunk: a view of its mapped file, or decompressed."""

        def path() -> Path:
            return self.folder / self.chunk_key(chunk)

        if self.decompress:
            return self._decoded(path().read_bytes())

        def map_chunk() -> np.ndarray:
            with open(path(), "rb") as file:
                mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
            return np.frombuffer(mapped, dtype=self.dtype).reshape(
                self.chunk_shape
            )  # a short file fails here

        return self._maps.get(chunk, map_chunk)

    def chunks(self, begin: int, end: int) -> range:
        return range(begin // self.rows, (end - 1) // self.rows + 1)

    def read(self, begin: int, end: int, held: dict | None = None) -> np.ndarray:
        """Rows ``[begin, end)``: views of the chunk (a copy only across chunks). ``held``: chunk
        bytes already fetched (remote stores)."""
        parts = []
        for chunk in self.chunks(begin, end):
            block = self._chunk(chunk, held or {})
            first = chunk * self.rows
            parts.append(block[max(begin, first) - first : min(end, first + self.rows) - first])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


class _RemoteChunks(_ChunkFiles):
    """Whole chunks of one array of a store at a URL, as objects fetched by key through the
    source's :class:`~unetdist.data.fetch.Fetcher` (node cache, merged requests, retries); a
    read's chunks of all arrays are fetched together (:meth:`ZarrTiles._fetch_chunks`)."""

    def __init__(self, folder: str, array, decompress, name: str) -> None:
        super().__init__(folder, array, decompress)  # type: ignore[arg-type]
        self.name = name

    def piece(self, chunk: int) -> Piece:
        size = -1 if self.decompress else int(np.prod(self.chunk_shape)) * self.dtype.itemsize
        return Piece(entry_name(0, chunk * self.rows, self.name), join(self.folder, self.chunk_key(chunk)), 0, size)

    def _chunk(self, chunk: int, held: dict) -> np.ndarray:
        return self._decoded(held[(self.name, chunk)])


class ZarrTiles(StoredSamples):
    """Random access to one split of a pre-tiled store; picklable, opened lazily per process.

    One unit (the split's arrays); blocks default to the chunk length, so a block read is
    one chunk decode per array.
    """

    unit_name = "array"

    def __init__(
        self,
        store: str | Path,
        split: str,
        checks: SampleChecks,
        fetcher: Fetcher | None = None,
        arrays: dict[str, str] | None = None,
        rows: tuple[int, int] | None = None,
    ) -> None:
        """``arrays``: a store of the user's own layout, {"image": path, "mask": path, "weight": path}
        in the store, instead of the prepared ``SPLIT/image`` ...; ``rows``: the split's rows
        ``[first, stop)`` of those arrays (default all)."""
        self.store, self.split, self.checks = str(store), split, checks
        self.remote = is_remote(self.store)
        self.fetcher = fetcher or (Fetcher(8, None) if self.remote else None)
        if not self.remote and not Path(self.store).is_dir():
            raise ValueError(
                f"zarr store {self.store} not found: prepare it with `python -m unetdist.prepare --format zarr`"
            )
        self.own_layout = arrays is not None
        self.paths = arrays or {name: f"{split}/{name}" for name in ("image", "mask", "weight", "origin")}
        self._pid = -1
        self._arrays: dict = {}
        self._origin_chunks: dict[int, np.ndarray] = {}
        self._chunk_files: dict[str, _ChunkFiles | None] = {}
        found = self._open()
        if "image" not in found or "mask" not in found:
            group = found["group"]
            raise ValueError(
                f"zarr store {self.store}/{split}: expected arrays image and mask, found {sorted(group.keys())}"
            )
        self.first, stop = rows or (0, int(found["image"].shape[0]))
        self.counts = [stop - self.first]
        self.chunk_tiles = int(found["image"].chunks[0])
        self.stems = list(found["group"].attrs.get("images", [])) if arrays is None else []
        self._pid, self._arrays = -1, {}  # reopen after pickling / forking

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pid": -1, "_arrays": {}, "_origin_chunks": {}, "_chunk_files": {}}

    @property
    def block_size(self) -> int:
        return self.chunk_tiles

    @property
    def names(self) -> list[str]:
        return [f"{display(self.store)}/{self.paths['image'] if self.own_layout else self.split}"]

    def follow(self, schedule: Schedule) -> None:
        super().follow(schedule)
        if self.fetcher is not None and self.fetcher.cache is not None:
            self.fetcher.cache.schedule = schedule

    def _open(self) -> dict:
        """{"group": the group holding the image array, and each array present by field name}."""
        import zarr

        if self._pid != os.getpid():
            root = zarr.open_group(zarr_store(self.store), mode="r")
            parent = self.paths["image"].rpartition("/")[0]
            self._arrays = {"group": root[parent] if parent else root}
            for name, path in self.paths.items():
                if path and path in root:
                    self._arrays[name] = root[path]
            self._chunk_files = {
                name: self._chunk_reader(name) for name in ("image", "mask", "weight") if name in self._arrays
            }
            self._pid = os.getpid()
        return self._arrays

    def _chunk_reader(self, name: str) -> _ChunkFiles | None:
        if not self.remote:
            return _ChunkFiles.for_array(Path(self.store) / self.paths[name], self._arrays[name])
        local = _ChunkFiles.for_array(Path("."), self._arrays[name])  # the codec checks, no files
        if local is None:
            return None
        return _RemoteChunks(join(self.store, self.paths[name]), self._arrays[name], local.decompress, name)

    def _fetch_chunks(self, readers: list[tuple[str, _ChunkFiles]], runs: list[tuple[int, int]]) -> dict:
        """The bytes of every chunk the runs touch, of every array, fetched together: {(array, chunk): bytes}."""
        assert self.fetcher is not None
        wanted = {
            (name, chunk): reader.piece(chunk)  # type: ignore[attr-defined]
            for name, reader in readers
            for begin, end in runs
            for chunk in reader.chunks(begin, end)
        }
        held = {}
        for key, got in zip(wanted, self.fetcher.get(list(wanted.values())), strict=True):
            if isinstance(got, DataError):
                raise got
            held[key] = got
        return held

    def _key(self, origin: np.ndarray, row: int) -> str:
        if not self.stems:
            return f"#{row}" if self.own_layout else f"{self.split}#{row}"
        image, top, left = origin.tolist()  # Python ints: cheaper than int() of each numpy scalar
        stem = self.stems[image] if 0 <= image < len(self.stems) else f"image{image}"
        return sample_key(stem, top, left)

    def _read_runs(self, runs: list[tuple[int, int]]) -> list[dict[str, np.ndarray]]:
        """The fields of each ``[begin, end)`` run: from the chunk files directly where the layout
        allows (:class:`_ChunkFiles`), else fetched through zarr's event loop in one trip.

        A chunk the direct path cannot decode raises; it is not handed to zarr, whose Blosc
        codec would read past the end of a cut-short chunk."""
        names = ["image", "mask"] + (
            ["weight"] if self.checks.use_weight_map != "false" and "weight" in self._arrays else []
        )
        direct = [self._chunk_files.get(name) for name in names]
        if all(direct):
            held = self._fetch_chunks(list(zip(names, direct, strict=True)), runs) if self.remote else None  # type: ignore[arg-type]
            try:
                return [
                    {
                        **{name: files.read(begin, end, held) for name, files in zip(names, direct, strict=True)},
                        "origin": self._origins(begin, end),
                    }
                    for begin, end in runs
                ]
            except FileNotFoundError:  # a chunk never written: zarr's fill value
                pass
        return self._read_runs_with_zarr(runs, names)

    def _read_runs_with_zarr(
        self, runs: list[tuple[int, int]], names: list[str]
    ) -> list[dict[str, np.ndarray]]:
        import asyncio

        from zarr.core.sync import sync

        async def fetch() -> list:
            reads = (
                self._arrays[name].async_array.getitem(slice(begin, end))
                for begin, end in runs
                for name in names
            )
            return await asyncio.gather(*reads)

        arrays = iter(sync(fetch()))
        out = []
        for begin, end in runs:
            fields = {name: next(arrays) for name in names}
            fields["origin"] = self._origins(begin, end)
            out.append(fields)
        return out

    def _origins(self, begin: int, end: int) -> np.ndarray:
        """Rows ``[begin, end)`` of the origin table, from whole cached chunks (a few bytes per tile)."""
        if "origin" not in self._arrays:
            return np.zeros((end - begin, 3), np.int32)
        origin = self._arrays["origin"]
        rows = origin.chunks[0]
        first, last = begin // rows, (end - 1) // rows
        if len(self._origin_chunks) > _CACHED_ORIGIN_CHUNKS:
            self._origin_chunks.clear()
        for chunk in range(first, last + 1):
            if chunk not in self._origin_chunks:
                self._origin_chunks[chunk] = origin[chunk * rows : (chunk + 1) * rows]
        table = np.concatenate([self._origin_chunks[chunk] for chunk in range(first, last + 1)])
        return table[begin - first * rows : end - first * rows]

    def _read_run(self, begin: int, end: int) -> dict[str, np.ndarray]:
        return self._read_runs([(begin, end)])[0]

    def read(self, unit: int, indices: list[int]) -> list[Sample | DataError]:
        """Samples ``indices`` of the split, rows ``first + i`` of its arrays."""
        self._open()
        where = f"zarr store {self.store}" + (f" {self.paths['image']}" if self.own_layout else f"/{self.split}")
        results: dict[int, Sample | DataError] = {}
        runs: list[list[int]] = []
        for i in sorted({self.first + i for i in indices}):
            if runs and i == runs[-1][-1] + 1:
                runs[-1].append(i)
            else:
                runs.append([i])
        try:
            fields_of_runs = self._read_runs([(run[0], run[-1] + 1) for run in runs])
        except Exception:  # a chunk that fails to decode: isolate it sample by sample
            fields_of_runs = [None] * len(runs)
        for run, fields in zip(runs, fields_of_runs, strict=True):
            for offset, i in enumerate(run):
                if fields is None:
                    try:
                        one = self._read_run(i, i + 1)
                    except Exception as err:  # noqa: BLE001 - any decode failure is bad data
                        chunk = i // self.chunk_tiles
                        results[i] = DataError(
                            f"{where} sample #{i} (chunk {chunk}): cannot decode: {type(err).__name__}: {err}"
                        )
                        continue
                    at = 0
                else:
                    one, at = fields, offset
                key = self._key(one["origin"][at], i)
                weight = one["weight"][at] if "weight" in one else None
                image = one["image"][at]
                try:
                    image = image[None] if image.ndim == 2 else image
                    results[i] = check_sample(
                        key, where, image, one["mask"][at], weight, self.checks, self.weights_of(0, i)
                    )
                except DataError as err:
                    results[i] = err
        return [results[self.first + i] for i in indices]
