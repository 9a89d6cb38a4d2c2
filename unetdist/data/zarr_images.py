"""Zarr v3 stores of whole large images (``prepare --format zarr --whole-images``) and tile sampling from them.

Layout of a split (``ROOT/data.zarr/SPLIT``)::

    images/<i>   [C, H, W]  the stored dtype, chunked in IMAGE_CHUNK squares (all channels per chunk)
    masks/<i>    [H, W]     uint8 class ids
    weights/<i>  [H, W]     float32 border weights (when prepared with them)

The group attributes list the stems and shapes. Training samples random tile positions,
validation a fixed grid; like :mod:`unetdist.data.zarr`, stores are opened lazily in the
process that reads.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from unetdist.data.samples import DataError, Sample, SampleChecks, check_sample

IMAGE_CHUNK = 256  # pixels per side of a whole image's 2-D chunks
WHOLE_IMAGES = "whole-images"  # the split group's "layout" attribute


def is_whole_image_store(store: str | Path, split: str) -> bool:
    """Whether ``store/split`` holds whole images (``images/<i>``) rather than pre-tiled arrays."""
    return (Path(store) / split / "images").is_dir()


class ZarrImageWriter:
    """Whole images of one split: ``SPLIT/images/<i>`` [C,H,W], ``masks/<i>`` [H,W] uint8,
    ``weights/<i>`` [H,W] float32, chunked in ``chunk`` x ``chunk`` pixel squares (all channels
    in a chunk), so a tile read decodes only the chunks it overlaps. The group attributes list
    the stems and the [C,H,W] shape of each image."""

    def __init__(self, store: Path, split: str, chunk: int = IMAGE_CHUNK) -> None:
        self.store, self.split, self.chunk = store, split, chunk
        self.group = None
        self.stems: list[str] = []
        self.shapes: list[list[int]] = []

    def write_image(self, stem: str, image: np.ndarray, mask: np.ndarray, weight: np.ndarray | None) -> None:
        import zarr
        from zarr.codecs import ZstdCodec

        if self.group is None:
            root = zarr.open_group(str(self.store), mode="a")
            self.group = root.create_group(self.split, overwrite=True)
            for name in ("images", "masks") + (("weights",) if weight is not None else ()):
                self.group.create_group(name)
        index, zstd = str(len(self.stems)), [ZstdCodec(level=1)]
        channels, height, width = image.shape
        ch, cw = min(self.chunk, height), min(self.chunk, width)
        fields = [("images", image, (channels, ch, cw)), ("masks", mask.astype(np.uint8), (ch, cw))]
        if weight is not None:
            fields.append(("weights", weight.astype(np.float32), (ch, cw)))
        for name, array, chunks in fields:
            out = self.group[name].create_array(index, shape=array.shape, dtype=array.dtype, chunks=chunks,
                                                compressors=zstd)
            out[...] = array
        self.stems.append(stem)
        self.shapes.append([int(channels), int(height), int(width)])

    def close(self) -> None:
        if self.group is not None:
            self.group.attrs.update({"layout": WHOLE_IMAGES, "images": self.stems, "shapes": self.shapes,
                                     "chunk": self.chunk})


def grid_windows(height: int, width: int, tile: int) -> list[tuple[int, int]]:
    """(top, left) of a fixed, non-overlapping grid of ``tile`` windows covering an image; the
    last row and column are shifted inwards to end at the edge (see ``prepare.tile_origins``)."""
    from unetdist.data.prepare import tile_origins

    return [(top, left) for top in tile_origins(height, tile) for left in tile_origins(width, tile)]


class ZarrImages:
    """Tiles sampled from one split of a whole-image store; picklable, opened lazily per process.

    One unit per image. Training (``sampled``): each image holds ``tiles_per_image`` virtual
    samples per epoch, which the global sequence permutes like stored tiles; the window of
    the sample at global position p comes from p's random words
    (:func:`unetdist.data.augment.sample_words`, the same words that seed its augmentation),
    so it is a pure function of (seed, p), whatever the ranks and workers; the loader calls
    :meth:`read_windows`. Validation: unit i's samples are the tiles of the fixed grid
    (:func:`grid_windows`) over image i, read by :meth:`read`.
    """

    def __init__(self, store: str | Path, split: str, checks: SampleChecks, tiles_per_image: int,
                 sampled: bool | None = None) -> None:
        import zarr

        self.store, self.split, self.checks = str(store), split, checks
        self.tiles_per_image = tiles_per_image
        self.sampled = split == "train" if sampled is None else sampled
        if tiles_per_image < 1:
            raise ValueError(f"data.tiles_per_image={tiles_per_image}: expected a positive number")
        group = zarr.open_group(self.store, mode="r", path=split)
        attrs = dict(group.attrs)
        if attrs.get("layout") != WHOLE_IMAGES:
            raise ValueError(f"zarr store {self.store}/{split}: not a whole-image store (layout {attrs.get('layout')!r})")
        self.stems = list(attrs["images"])
        self.shapes = [tuple(int(v) for v in shape) for shape in attrs["shapes"]]
        self.has_weight = "weights" in group
        size = checks.tile_size
        small = [stem for stem, (_, h, w) in zip(self.stems, self.shapes, strict=True) if min(h, w) < size]
        if small:
            raise ValueError(f"zarr store {self.store}/{split}: image(s) {small[:3]} smaller than data.tile_size={size}")
        if self.sampled:
            self.counts = [tiles_per_image] * len(self.stems)
        else:
            self.grids = [grid_windows(h, w, size) for _, h, w in self.shapes]
            self.counts = [len(grid) for grid in self.grids]
        self._pid, self._arrays = -1, {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pid": -1, "_arrays": {}}

    @property
    def names(self) -> list[str]:
        return [f"{self.store}/{self.split}/images/{i}" for i in range(len(self.stems))]

    def _open(self) -> dict:
        import zarr

        if self._pid != os.getpid():
            group = zarr.open_group(self.store, mode="r", path=self.split)
            names = ("images", "masks") + (("weights",) if self.has_weight and self.checks.use_weight_map else ())
            self._arrays = {name: group[name] for name in names}
            self._pid = os.getpid()
        return self._arrays

    def windows(self, units: np.ndarray, words: np.ndarray) -> list[tuple[int, int]]:
        """Training windows of samples in ``units`` from their positions' random words (uniform)."""
        from unetdist.data.augment import crop_windows

        stand_ins = [np.broadcast_to(np.uint8(0), self.shapes[int(u)][1:]) for u in units]
        return crop_windows(stand_ins, self.checks.tile_size, words, 0.0)

    def read_windows(self, units: np.ndarray, indices: np.ndarray, words: np.ndarray) -> list[Sample | DataError]:
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
            reads = (opened[name, unit].async_array.getitem(selection(name, top, left))
                     for unit, (top, left) in items for name in names)
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
            key = f"{self.stems[unit].replace('.', '_')}_y{top}_x{left}"
            if isinstance(fields, Exception):
                out.append(DataError(f"{where} sample {key}: cannot decode: {type(fields).__name__}: {fields}"))
                continue
            try:
                out.append(check_sample(key, where, fields["images"], fields["masks"], fields.get("weights"), self.checks))
            except DataError as err:
                out.append(err)
        return out
