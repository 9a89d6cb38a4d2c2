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
from unetdist.data.layout import sample_key
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

    def _chunk(self, chunk: int) -> np.ndarray:
        """One whole chunk: a view of its mapped file, or decompressed."""

        def path() -> Path:
            return self.folder / self.array.metadata.encode_chunk_key(
                (chunk,) + (0,) * (len(self.chunk_shape) - 1)
            )

        if self.decompress:
            raw = self.decompress(path().read_bytes())
            return np.frombuffer(raw, dtype=self.dtype).reshape(self.chunk_shape)

        def map_chunk() -> np.ndarray:
            with open(path(), "rb") as file:
                mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
            return np.frombuffer(mapped, dtype=self.dtype).reshape(
                self.chunk_shape
            )  # a short file fails here

        return self._maps.get(chunk, map_chunk)

    def read(self, begin: int, end: int) -> np.ndarray:
        """Rows ``[begin, end)``: views of the chunk (a copy only across chunks)."""
        parts = []
        for chunk in range(begin // self.rows, (end - 1) // self.rows + 1):
            block = self._chunk(chunk)
            first = chunk * self.rows
            parts.append(block[max(begin, first) - first : min(end, first + self.rows) - first])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


class ZarrTiles(StoredSamples):
    """Random access to one split of a pre-tiled store; picklable, opened lazily per process.

    One unit (the split's arrays); blocks default to the chunk length, so a block read is
    one chunk decode per array.
    """

    unit_name = "array"

    def __init__(self, store: str | Path, split: str, checks: SampleChecks) -> None:
        self.store, self.split, self.checks = str(store), split, checks
        if not Path(self.store).is_dir():
            raise ValueError(
                f"zarr store {self.store} not found: prepare it with `python -m unetdist.prepare --format zarr`"
            )
        self._pid = -1
        self._arrays: dict = {}
        self._origin_chunks: dict[int, np.ndarray] = {}
        self._chunk_files: dict[str, _ChunkFiles | None] = {}
        group = self._open()
        if "image" not in group or "mask" not in group:
            raise ValueError(
                f"zarr store {self.store}/{split}: expected arrays image and mask, found {sorted(group.keys())}"
            )
        self.counts = [int(group["image"].shape[0])]
        self.chunk_tiles = int(group["image"].chunks[0])
        self.stems = list(group.attrs.get("images", []))
        self._pid, self._arrays = -1, {}  # reopen after pickling / forking

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pid": -1, "_arrays": {}, "_origin_chunks": {}, "_chunk_files": {}}

    @property
    def block_size(self) -> int:
        return self.chunk_tiles

    @property
    def names(self) -> list[str]:
        return [f"{self.store}/{self.split}"]

    def _open(self):
        import zarr

        if self._pid != os.getpid():
            group = zarr.open_group(self.store, mode="r", path=self.split)
            self._arrays = {
                "group": group,
                **{name: group[name] for name in ("image", "mask", "weight", "origin") if name in group},
            }
            folder = Path(self.store) / self.split
            self._chunk_files = {
                name: _ChunkFiles.for_array(folder / name, self._arrays[name])
                for name in ("image", "mask", "weight")
                if name in self._arrays
            }
            self._pid = os.getpid()
        return self._arrays["group"]

    def _key(self, origin: np.ndarray, index: int) -> str:
        image, top, left = origin.tolist()  # Python ints: cheaper than int() of each numpy scalar
        stem = self.stems[image] if 0 <= image < len(self.stems) else f"image{image}"
        return sample_key(stem, top, left) if self.stems else f"{self.split}#{index}"

    def _read_runs(self, runs: list[tuple[int, int]]) -> list[dict[str, np.ndarray]]:
        """The fields of each ``[begin, end)`` run: from the chunk files directly where the layout
        allows (:class:`_ChunkFiles`), else fetched through zarr's event loop in one trip.

        A chunk the direct path cannot decode raises; it is not handed to zarr, whose Blosc
        codec would read past the end of a cut-short chunk."""
        names = ["image", "mask"] + (
            ["weight"] if self.checks.use_weight_map and "weight" in self._arrays else []
        )
        direct = [self._chunk_files.get(name) for name in names]
        if all(direct):
            try:
                return [
                    {
                        **{name: files.read(begin, end) for name, files in zip(names, direct, strict=True)},
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
        self._open()
        where = f"zarr store {self.store}/{self.split}"
        results: dict[int, Sample | DataError] = {}
        runs: list[list[int]] = []
        for i in sorted(set(indices)):
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
                try:
                    results[i] = check_sample(
                        key, where, one["image"][at], one["mask"][at], weight, self.checks
                    )
                except DataError as err:
                    results[i] = err
        return [results[i] for i in indices]
