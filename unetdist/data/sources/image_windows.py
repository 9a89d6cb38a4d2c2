"""What every source of tiles cut from whole images shares: training windows from the position's
random words, a fixed validation grid, and concurrent reads of a batch's windows.

:class:`ImageWindows` is the base of :class:`~unetdist.data.sources.zarr_images.ZarrImages`
(``prepare --whole-images`` stores) and :class:`~unetdist.data.sources.ome_zarr.OmeZarrImages`
(OME-Zarr images with labels). A subclass says what a unit's window area is (``shapes``), how one
window is read (:meth:`ImageWindows._tile_reads`: the array reads of one tile) and checked
(:meth:`ImageWindows._sample`), and where its foreground pixels are (:meth:`ImageWindows.foreground`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable

import numpy as np

from unetdist.data.augment import point_windows
from unetdist.data.layout import grid_corners
from unetdist.data.node_cache import NodeCache, Schedule
from unetdist.data.samples import DataError, Sample, SampleChecks

# One array read of a tile: called (perhaps again, to isolate a failure) inside zarr's event loop.
TileRead = Callable[[], Awaitable[np.ndarray]]


def gather_tiles(tiles: list[list[TileRead]]) -> list[list[np.ndarray] | Exception]:
    """Each tile's arrays, all read concurrently on zarr's event loop; where a read fails (a chunk
    that does not decode), the tiles are read again one by one, so only the failing ones are errors."""
    from zarr.core.sync import sync

    async def fetch(items: list[list[TileRead]]) -> list[np.ndarray]:
        return await asyncio.gather(*(read() for reads in items for read in reads))

    def regroup(flat: list[np.ndarray], items: list[list[TileRead]]) -> list[list[np.ndarray]]:
        arrays = iter(flat)
        return [[next(arrays) for _ in reads] for reads in items]

    try:
        return regroup(sync(fetch(tiles)), tiles)  # type: ignore[return-value]
    except Exception:  # noqa: BLE001 - isolate the failing tile(s) below
        fetched: list[list[np.ndarray] | Exception] = []
        for reads in tiles:
            try:
                fetched.append(regroup(sync(fetch([reads])), [reads])[0])
            except Exception as err:  # noqa: BLE001 - any decode or read failure is bad data
                fetched.append(err)
        return fetched


class ImageWindows:
    """Tiles cut from whole images; picklable, with arrays opened lazily in each process.

    Training (``sampled``): each unit holds ``tiles_per_image`` virtual samples per epoch, which
    the global sequence permutes like stored tiles; the window of the sample at global position
    p comes from p's random words (:func:`unetdist.data.augment.sample_words`, the words that
    also seed its augmentation), so it is a pure function of (seed, p), whatever the ranks and
    workers. A ``foreground_fraction`` share of the windows is centred on a pixel of the unit's
    foreground table (:func:`unetdist.data.augment.point_windows`). Validation: unit i's samples
    are the tiles of a fixed grid (:func:`unetdist.data.layout.grid_windows`) over its area.
    """

    unit_name = "image"
    block_size = 1
    remote = False
    checks: SampleChecks
    sampled: bool
    foreground_fraction: float
    shapes: list[tuple[int, ...]]  # (height, width) of each unit's window area; a volume's (depth, height, width)
    chunk_cache: NodeCache | None = None  # at a URL with data.cache_dir: chunks through it (zarr_cache.py)
    counts: list[int]
    _pid = -1  # the process whose caches _caches holds (see _cache)

    def _set_units(self, shapes: list[tuple[int, ...]], tiles_per_image: int, what: list[str]) -> None:
        """Counts (and validation grids) of units of these window areas; ``what`` names them in errors."""
        tile = self.checks.tile_shape
        small = [name for name, shape in zip(what, shapes, strict=True)
                 if any(length < size for length, size in zip(shape, tile, strict=True))]  # fmt: skip
        if small:
            wanted = f"data.tile_size={tile[-1]}" if len(tile) == 2 else f"the tile {'x'.join(map(str, tile))}"
            raise ValueError(f"{small[0]}{f' (and {len(small) - 1} more)' if len(small) > 1 else ''}: "
                             f"smaller than {wanted}")
        self.shapes = shapes
        if self.sampled:
            self.counts = [tiles_per_image] * len(shapes)
        else:
            self.grids = [grid_corners(shape, tile) for shape in shapes]
            self.counts = [len(grid) for grid in self.grids]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)  # open arrays and read tables stay in the process that made them
        state.pop("_caches", None)
        state.pop("_pid", None)
        return state

    def _cache(self, name: str) -> dict:
        """This process's dict ``name`` (open arrays, read tables), empty in a new process. Callers keep
        the dict they got: readahead threads may race to make a process's caches, each then uses its own."""
        if self._pid != os.getpid():
            self._caches: dict[str, dict] = {}
            self._pid = os.getpid()
        return self._caches.setdefault(name, {})

    def follow(self, schedule: Schedule) -> None:
        pass

    def prefetch(self, units: np.ndarray, indices: np.ndarray) -> int | None:
        return None

    def foreground(self, unit: int) -> np.ndarray:
        """int32 [K, 2] (y, x) (a volume's [K, 3] (z, y, x)): foreground pixels of unit ``unit`` in its
        window area's coordinates."""
        raise NotImplementedError

    def windows(self, units: np.ndarray, words: np.ndarray) -> list[tuple[int, ...]]:
        """Training windows of samples in ``units`` from their positions' random words: uniform, or
        with probability ``foreground_fraction`` centred on a pixel of the unit's foreground table."""
        shapes = [self.shapes[int(unit)] for unit in units]
        return point_windows(
            shapes,
            lambda i: self.foreground(int(units[i])),
            self.checks.tile_size if self.checks.spatial_dims == 2 else self.checks.tile_shape,
            words,
            self.foreground_fraction,
        )

    def read_windows(
        self, units: np.ndarray, indices: np.ndarray, words: np.ndarray
    ) -> list[Sample | DataError]:
        """Training samples: unit ``units[i]``'s tile at the window drawn from ``words[i]``."""
        return self._read(list(zip((int(u) for u in units), self.windows(units, words), strict=True)))

    def read(self, unit: int, indices: list[int]) -> list[Sample | DataError]:
        """Validation samples: grid tiles ``indices`` of unit ``unit``."""
        if self.sampled:
            raise RuntimeError(
                f"{type(self).__name__}.read: training windows depend on the position; use read_windows"
            )
        return self._read([(unit, self.grids[unit][i]) for i in indices])

    # ------------------------------------------------------------ what a subclass provides

    # A tile's place is its corner, one number per spatial axis: (top, left), or (z, top, left).

    def _tile_reads(self, unit: int, *corner: int) -> list[TileRead]:
        """The array reads of the tile at ``corner`` of unit ``unit`` (opening arrays as needed)."""
        raise NotImplementedError

    def _sample(self, unit: int, *corner: int, arrays: list[np.ndarray]) -> Sample:
        """The checked sample of a tile from what its reads returned (:class:`DataError` if bad)."""
        raise NotImplementedError

    def _describe(self, unit: int, *corner: int) -> tuple[str, str]:
        """(where, key) of a tile, for its sample and its messages."""
        raise NotImplementedError

    # ------------------------------------------------------------ reading

    def _read(self, wanted: list[tuple[int, tuple[int, ...]]]) -> list[Sample | DataError]:
        # the reads are built (arrays opened: synchronous) outside the event loop, then run in it
        tiles = [self._tile_reads(unit, *corner) for unit, corner in wanted]
        out: list[Sample | DataError] = []
        for (unit, corner), arrays in zip(wanted, gather_tiles(tiles), strict=True):
            if isinstance(arrays, Exception):
                where, key = self._describe(unit, *corner)
                problem = f"cannot decode: {type(arrays).__name__}: {arrays}"
                out.append(DataError(f"{where} sample {key}: {problem}"))
                continue
            try:
                out.append(self._sample(unit, *corner, arrays=arrays))
            except DataError as err:
                out.append(err)
        return out

