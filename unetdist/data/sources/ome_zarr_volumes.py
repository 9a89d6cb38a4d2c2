"""OME-Zarr volumes as a data source (``data.format=ome-zarr model.spatial_dims=3``): the 3-D case of
:mod:`unetdist.data.sources.ome_zarr`, read in place (no copy into a whole-volume store).

    data.format=ome-zarr model.spatial_dims=3 data.images='[embryo*.ome.zarr]' data.labels=nuclei
    data.tile_depth=16 data.tile_size=64

One unit per (image, t): the image's z, y, x at ``data.level`` (an image needs a z axis), cut into
``(data.tile_depth, data.tile_size, data.tile_size)`` windows: random ones for training, a fixed 3-D
grid for validation (:mod:`unetdist.data.sources.image_windows`). Levels, channels, label images and
the split by image are the 2-D source's. A single image is split by region as ``prepare
--spatial-dims 3`` splits one volume (:func:`unetdist.data.splits.holdout_box`: its last part along
the axis that holds the most tiles validates, half a tile apart from the part that trains), so a
source and a store prepared from the same volume train and validate on the same voxels, under the
same keys ``{stem}[_t{t}]_z{z}_y{top}_x{left}`` (corners in the whole volume).

Foreground tables (``data.foreground_fraction``) come from the coarsest label level downsampled at
most a quarter tile per axis, built in each process when first needed: int32 [K, 3] (z, y, x).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from unetdist.data.layout import foreground_points, sample_key
from unetdist.data.remote import display
from unetdist.data.sources.image_windows import TileRead
from unetdist.data.sources.ome_zarr import OmeZarrImages
from unetdist.data.splits import RegionTooSmall, holdout_box


@dataclass(frozen=True)
class Volume:
    """A unit: time point ``t`` of image ``image``, its box (z0, z1, y0, y1, x0, x1) (a region split)."""

    image: int
    t: int
    box: tuple[int, ...]

    @property
    def corner(self) -> tuple[int, int, int]:
        return self.box[0], self.box[2], self.box[4]

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.box[1] - self.box[0], self.box[3] - self.box[2], self.box[5] - self.box[4]


class OmeZarrVolumes(OmeZarrImages):
    """Tiles of the (image, t) volumes of OME-Zarr images and their label images; picklable."""

    unit_name = "volume"  # an image's time point

    def _set_up_units(self, rows: tuple[str, float] | None, tiles_per_image: int) -> None:
        flat = [image for image in self.images if "z" not in image.axes]
        if flat:
            raise ValueError(
                f"ome-zarr {display(flat[0].url)}: axes {''.join(flat[0].axes)}, no z; model.spatial_dims=3 "
                "reads volumes: expected axes (t,) (c,) z, y, x"
            )
        self.planes = [  # the base class's name for its units: names, _where and foreground use it
            Volume(index, t, (0, image.size_z, 0, image.height, 0, image.width))
            for index, image in enumerate(self.images)
            for t in range(image.size_t)
        ]
        if rows is not None:
            self.planes = [self._region(volume, *rows) for volume in self.planes]
        self._set_units([volume.shape for volume in self.planes], tiles_per_image, self.names)

    def _region(self, volume: Volume, part: str, fraction: float) -> Volume:
        """The training or validation region of a volume of the one image, as prepare cuts it."""
        try:
            regions = holdout_box(volume.shape, self.checks.tile_shape, fraction)
        except RegionTooSmall as err:
            raise ValueError(
                f"ome-zarr {display(self.images[volume.image].url)}: {err} (data.val_fraction={fraction}); "
                "give more images, data.val_images, or data.val_fraction=0"
            ) from None
        return Volume(volume.image, volume.t, regions.val if part == "val" else regions.train)

    def _where(self, volume: Volume) -> str:
        image = self.images[volume.image]
        where = [f"t={volume.t}"] * (image.size_t > 1)
        if volume.shape != (image.size_z, image.height, image.width):
            names = ("planes", "rows", "columns")
            where += [f"{name} {volume.box[2 * i]}-{volume.box[2 * i + 1] - 1}" for i, name in enumerate(names)]
        return f"ome-zarr {display(image.url)}" + (f" ({', '.join(where)})" if where else "")

    def foreground(self, unit: int) -> np.ndarray:
        """int32 [K, 3] (z, y, x): foreground voxels of volume ``unit`` (in its box), from a coarse level."""
        tables = self._cache("foreground")
        if unit not in tables:
            volume = self.planes[unit]
            image = self.images[volume.image]
            coarse = self._array(volume.image, image.foreground_path)[_selection(image.label_axes, volume.t, 0)]
            points = foreground_points(coarse).astype(np.float64)
            # a coarse voxel's centre, in level data.level's voxels
            full = np.array([image.size_z, image.height, image.width])
            centres = np.minimum((points + 0.5) * (full / np.array(coarse.shape)), full - 1).astype(int)
            start, stop = np.array(volume.box[0::2]), np.array(volume.box[1::2])
            inside = np.all((centres >= start) & (centres < stop), axis=1)
            tables[unit] = (centres[inside] - start).astype(np.int32).reshape(-1, 3)
        return tables[unit]

    def _tile_reads(self, unit: int, *corner: int) -> list[TileRead]:
        volume = self.planes[unit]
        image = self.images[volume.image]
        window = tuple(slice(start + at, start + at + size)
                       for start, at, size in zip(volume.corner, corner, self.checks.tile_shape, strict=True))  # fmt: skip
        pixels = self._array(volume.image, image.image_path).async_array
        labels = self._array(volume.image, image.label_path).async_array
        pixel_window = _selection(image.axes, volume.t, slice(*image.channels), window)
        label_window = _selection(image.label_axes, volume.t, 0, window)
        return [lambda: pixels.getitem(pixel_window), lambda: labels.getitem(label_window)]

    def _describe(self, unit: int, *corner: int) -> tuple[str, str]:
        volume = self.planes[unit]
        image = self.images[volume.image]
        stem = image.stem + f"_t{volume.t}" * (image.size_t > 1)
        return self._where(volume), sample_key(stem, *(start + at for start, at in zip(volume.corner, corner, strict=True)))


def _selection(axes: tuple[str, ...], t: int, channel: int | slice, window: tuple[slice, ...] | None = None):
    """The index of ``window`` (z, y, x slices; None: all) of time point ``t`` in an array of ``axes``
    (t and an int channel drop out)."""
    z, y, x = window or (slice(None),) * 3
    index = {"t": t, "c": channel, "z": z, "y": y, "x": x}
    return tuple(index[axis] for axis in axes)
