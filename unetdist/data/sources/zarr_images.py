"""Zarr v3 stores of whole large images (``prepare --format zarr --whole-images``) as a
:class:`~unetdist.data.sources.base.Source` that samples tiles from them.

The split's arrays are described in :mod:`unetdist.data.layout` (written by
:class:`unetdist.data.writers.ZarrImageWriter`). Training samples random tile positions, a
``data.foreground_fraction`` share of them centred on a pixel of the image's foreground table
(precomputed at prepare, like nnU-Net's foreground locations, since reading a whole mask per
sample would be far too slow); validation reads a fixed grid. Like
:mod:`unetdist.data.sources.zarr_tiles`, stores are opened lazily in the process that reads.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from unetdist.data.augment import point_windows
from unetdist.data.layout import WHOLE_IMAGES, grid_windows, sample_key
from unetdist.data.remote import is_remote, zarr_store
from unetdist.data.samples import DataError, Sample, SampleChecks, check_sample

log = logging.getLogger(__name__)


class ZarrImages:
    """Tiles sampled from one split of a whole-image store; picklable, opened lazily per process.

    One unit per image. Training (``sampled``): each image holds ``tiles_per_image`` virtual
    samples per epoch, which the global sequence permutes like stored tiles; the window of
    the sample at global position p comes from p's random words
    (:func:`unetdist.data.augment.sample_words`, the same words that seed its augmentation),
    so it is a pure function of (seed, p), whatever the ranks and workers; the loader calls
    :meth:`read_windows`. With ``foreground_fraction`` that share of the windows is centred on
    a pixel of the image's foreground table (:func:`unetdist.data.augment.point_windows`).
    Validation: unit i's samples are the tiles of the fixed grid (:func:`grid_windows`) over
    image i, read by :meth:`read`.
    """

    unit_name = "image"
    block_size = 1

    def __init__(
        self,
        store: str | Path,
        split: str,
        checks: SampleChecks,
        tiles_per_image: int,
        sampled: bool | None = None,
        foreground_fraction: float = 0.0,
    ) -> None:
        import zarr

        self.store, self.split, self.checks = str(store), split, checks
        # a store at a URL: zarr reads it through obstore (no node cache yet); the stream reads ahead
        self.remote = is_remote(self.store)
        self.tiles_per_image = tiles_per_image
        self.sampled = split == "train" if sampled is None else sampled
        if tiles_per_image < 1:
            raise ValueError(f"data.tiles_per_image={tiles_per_image}: expected a positive number")
        if not 0.0 <= foreground_fraction <= 1.0:
            raise ValueError(f"data.foreground_fraction={foreground_fraction}: expected a fraction in [0, 1]")
        group = zarr.open_group(zarr_store(self.store), mode="r", path=split)
        attrs = dict(group.attrs)
        if attrs.get("layout") != WHOLE_IMAGES:
            raise ValueError(
                f"zarr store {self.store}/{split}: not a whole-image store (layout {attrs.get('layout')!r})"
            )
        self.stems = list(attrs["images"])
        self.shapes = [tuple(int(v) for v in shape) for shape in attrs["shapes"]]
        self.has_weight = "weights" in group
        # Row counts of the foreground tables; None: a store written before they existed.
        self.foreground_counts = (
            [int(n) for n in attrs["foreground"]["counts"]] if "foreground" in attrs else None
        )
        self.foreground_fraction = foreground_fraction if self.sampled else 0.0
        if self.foreground_fraction > 0 and self.foreground_counts is None:
            # Building the tables here would read every mask whole, in every rank at every start.
            log.warning(
                "zarr store %s/%s has no foreground tables (written before whole-image stores kept "
                "them): data.foreground_fraction=%s is ignored and training tiles are uniform; re-run "
                "python -m unetdist.prepare --format zarr --whole-images to write them",
                self.store,
                split,
                foreground_fraction,
            )
            self.foreground_fraction = 0.0
        size = checks.tile_size
        small = [stem for stem, (_, h, w) in zip(self.stems, self.shapes, strict=True) if min(h, w) < size]
        if small:
            raise ValueError(
                f"zarr store {self.store}/{split}: image(s) {small[:3]} smaller than data.tile_size={size}"
            )
        if self.sampled:
            self.counts = [tiles_per_image] * len(self.stems)
        else:
            self.grids = [grid_windows(h, w, size) for _, h, w in self.shapes]
            self.counts = [len(grid) for grid in self.grids]
        self._pid, self._arrays = -1, {}
        self._points: dict[int, np.ndarray] = {}  # foreground tables read so far (plain arrays)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pid": -1, "_arrays": {}, "_points": {}}

    def follow(self, schedule) -> None:
        pass

    @property
    def names(self) -> list[str]:
        return [f"{self.store}/{self.split}/images/{i}" for i in range(len(self.stems))]

    def _open(self) -> dict:
        import zarr

        if self._pid != os.getpid():
            group = zarr.open_group(zarr_store(self.store), mode="r", path=self.split)
            names = ("images", "masks") + (
                ("weights",) if self.has_weight and self.checks.use_weight_map else ()
            )
            self._arrays = {name: group[name] for name in names}
            self._pid = os.getpid()
        return self._arrays

    def foreground(self, unit: int) -> np.ndarray:
        """int32 [K, 2] (y, x): image ``unit``'s foreground table, read once per process."""
        import zarr

        if unit not in self._points:
            if not self.foreground_counts or not self.foreground_counts[unit]:
                self._points[unit] = np.zeros((0, 2), np.int32)
            else:
                self._points[unit] = zarr.open_array(
                    zarr_store(self.store), mode="r", path=f"{self.split}/foreground/{unit}"
                )[...]
        return self._points[unit]

    def windows(self, units: np.ndarray, words: np.ndarray) -> list[tuple[int, int]]:
        """Training windows of samples in ``units`` from their positions' random words: uniform, or
        with probability ``foreground_fraction`` centred on a pixel of the image's foreground table."""
        shapes = [self.shapes[int(u)][1:] for u in units]
        return point_windows(
            shapes,
            lambda i: self.foreground(int(units[i])),
            self.checks.tile_size,
            words,
            self.foreground_fraction,
        )

    def read_windows(
        self, units: np.ndarray, indices: np.ndarray, words: np.ndarray
    ) -> list[Sample | DataError]:
        """Training samples: image ``units[i]``'s tile at the window drawn from ``words[i]``."""
        return self._read(list(zip((int(u) for u in units), self.windows(units, words), strict=True)))

    def read(self, unit: int, indices: list[int]) -> list[Sample | DataError]:
        """Validation samples: grid tiles ``indices`` of image ``unit``."""
        if self.sampled:
            raise RuntimeError("ZarrImages.read: training windows depend on the position; use read_windows")
        return self._read([(unit, self.grids[unit][i]) for i in indices])

    def _read(self, wanted: list[tuple[int, tuple[int, int]]]) -> list[Sample | DataError]:
        import asyncio

        from zarr.core.sync import sync

        groups, size = self._open(), self.checks.tile_size
        names = [name for name in groups if name != "opened"]
        opened = self._arrays.setdefault("opened", {})
        for unit in {unit for unit, _ in wanted}:  # outside the event loop: opening is synchronous
            for name in names:
                if (name, unit) not in opened:
                    opened[name, unit] = groups[name][str(unit)]

        def selection(name: str, top: int, left: int) -> tuple:
            window = (slice(top, top + size), slice(left, left + size))
            return (slice(None), *window) if name == "images" else window

        async def fetch(items) -> list:
            reads = (
                opened[name, unit].async_array.getitem(selection(name, top, left))
                for unit, (top, left) in items
                for name in names
            )
            return await asyncio.gather(*reads)

        try:
            flat = iter(sync(fetch(wanted)))
            fetched = [{name: next(flat) for name in names} for _ in wanted]
        except Exception:  # a chunk that fails to decode: isolate it tile by tile
            fetched = []
            for item in wanted:
                try:
                    flat = iter(sync(fetch([item])))
                    fetched.append({name: next(flat) for name in names})
                except Exception as err:  # noqa: BLE001 - any decode failure is bad data
                    fetched.append(err)
        out: list[Sample | DataError] = []
        for (unit, (top, left)), fields in zip(wanted, fetched, strict=True):
            where = f"zarr store {self.store}/{self.split}/images/{unit}"
            key = sample_key(self.stems[unit], top, left)
            if isinstance(fields, Exception):
                out.append(
                    DataError(f"{where} sample {key}: cannot decode: {type(fields).__name__}: {fields}")
                )
                continue
            try:
                out.append(
                    check_sample(
                        key, where, fields["images"], fields["masks"], fields.get("weights"), self.checks
                    )
                )
            except DataError as err:
                out.append(err)
        return out
