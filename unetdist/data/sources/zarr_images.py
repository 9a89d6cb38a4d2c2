"""Zarr v3 stores of whole large images (``prepare --format zarr --whole-images``) as a
:class:`~unetdist.data.sources.base.Source` that samples tiles from them.

The split's arrays are described in :mod:`unetdist.data.layout` (written by
:class:`unetdist.data.writers.ZarrImageWriter`). Training samples random tile positions, a
``data.foreground_fraction`` share of them centred on a pixel of the image's foreground table
(precomputed at prepare, like nnU-Net's foreground locations, since reading a whole mask per
sample would be far too slow); validation reads a fixed grid (the windows and the reads:
:mod:`unetdist.data.sources.image_windows`). Like :mod:`unetdist.data.sources.zarr_tiles`, stores
are opened lazily in the process that reads.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from unetdist.data.layout import WHOLE_IMAGES, sample_key
from unetdist.data.remote import is_remote, zarr_store
from unetdist.data.samples import Sample, SampleChecks, check_sample
from unetdist.data.sources.image_windows import ImageWindows, TileRead
from unetdist.data.zarr_cache import node_cached

log = logging.getLogger(__name__)


class ZarrImages(ImageWindows):
    """Tiles sampled from one split of a whole-image store; picklable, opened lazily per process.

    One unit per image: training windows from the positions' random words, a
    ``foreground_fraction`` share of them centred on a pixel of the image's stored foreground
    table; validation: a fixed grid (:class:`~unetdist.data.sources.image_windows.ImageWindows`).
    """

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
        # a store at a URL: zarr reads it through obstore (and the node cache, when open_source gives
        # one: chunk_cache); the stream reads ahead
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
        # where each stored image lies in its source image (a region of it: prepare's region split);
        # keys are the source image's pixels, so a region's keys never repeat the other region's
        self.spatial_dims = int(attrs.get("spatial_dims", 2))  # 3: whole volumes
        if self.spatial_dims != checks.spatial_dims:
            held = "3-D volumes" if self.spatial_dims == 3 else "2-D images"
            raise ValueError(f"zarr store {self.store}/{split} holds {held}: set model.spatial_dims={self.spatial_dims}")
        self.offsets = [tuple(int(v) for v in offset) for offset in attrs.get("offsets", [])]
        self.offsets += [(0,) * self.spatial_dims] * (len(self.stems) - len(self.offsets))  # stores before offsets
        image_shapes = [tuple(int(v) for v in shape) for shape in attrs["shapes"]]
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
        self._set_units(
            [shape[1:] for shape in image_shapes],
            tiles_per_image,
            [f"zarr store {self.store}/{split}: image {stem}" for stem in self.stems],
        )

    @property
    def names(self) -> list[str]:
        return [f"{self.store}/{self.split}/images/{i}" for i in range(len(self.stems))]

    def _fields(self) -> tuple[str, ...]:
        with_weights = self.has_weight and self.checks.use_weight_map != "false"
        return ("images", "masks") + (("weights",) if with_weights else ())

    def _array(self, name: str, unit: int):
        """Array ``name``/<unit> of the split, opened once per process."""
        import zarr

        arrays = self._cache("arrays")
        if (name, unit) not in arrays:
            if "group" not in arrays:
                store = node_cached(zarr_store(self.store), self.chunk_cache)
                arrays["group"] = zarr.open_group(store, mode="r", path=self.split)
            arrays[name, unit] = arrays["group"][name][str(unit)]
        return arrays[name, unit]

    def foreground(self, unit: int) -> np.ndarray:
        """int32 [K, 2] (y, x) (a volume's [K, 3]): image ``unit``'s foreground table, read once per process."""
        import zarr

        points = self._cache("foreground")
        if unit not in points:
            if not self.foreground_counts or not self.foreground_counts[unit]:
                points[unit] = np.zeros((0, self.spatial_dims), np.int32)
            else:
                points[unit] = zarr.open_array(
                    zarr_store(self.store), mode="r", path=f"{self.split}/foreground/{unit}"
                )[...]
        return points[unit]

    def _tile_reads(self, unit: int, *corner: int) -> list[TileRead]:
        window = tuple(slice(start, start + size) for start, size in zip(corner, self.checks.tile_shape, strict=True))
        reads = []
        for name in self._fields():
            array = self._array(name, unit).async_array
            selection = (slice(None), *window) if name == "images" else window
            reads.append(lambda array=array, selection=selection: array.getitem(selection))
        return reads

    def _describe(self, unit: int, *corner: int) -> tuple[str, str]:
        key = sample_key(self.stems[unit], *(start + at for start, at in zip(self.offsets[unit], corner, strict=True)))
        return f"zarr store {self.store}/{self.split}/images/{unit}", key

    def _sample(self, unit: int, *corner: int, arrays: list[np.ndarray]) -> Sample:
        where, key = self._describe(unit, *corner)
        fields = dict(zip(self._fields(), arrays, strict=True))
        return check_sample(key, where, fields["images"], fields["masks"], fields.get("weights"), self.checks)
