"""OME-Zarr images (OME-NGFF 0.4 and 0.5) with a label image as a data source (``data.format=ome-zarr``).

    data.format=ome-zarr data.images='[plates/*.ome.zarr, s3://bucket/b.ome.zarr]' data.labels=nuclei
    data.mask_kind=instances data.level=0 data.channels='[0]' data.val_fraction=0.1

Each image's label image is ``IMAGE/labels/<data.labels>`` (checked by :mod:`unetdist.data.ngff`);
both are read at multiscale level ``data.level`` (the label image at its level of the same
downsampling). One unit per 2-D plane: every (image, t, z) of an image with t or z axes is its own
unit; ``data.channels`` picks channels (all when empty). Training cuts random windows, validation a
fixed grid (:mod:`unetdist.data.sources.image_windows`, shared with ``prepare --whole-images``
stores); label windows reach :func:`~unetdist.data.samples.check_sample` as stored (instance ids
stay ids: ``data.mask_kind`` says how to read them).

The validation split: the images in ``data.val_images``, else the last ceil(f * N) of N >= 2 images
(f = ``data.val_fraction``), else, for a single image, its bottom round(f * H) rows (at least a
tile), with a gap of half a tile above them that neither split reads (prepare's rule:
:func:`unetdist.data.splits.holdout_lengths`); training windows never reach into them.
``data.foreground_fraction``: each plane's foreground table is built when first needed, in each
process, from the coarsest label level downsampled at most tile_size / 4 (a tile centre needs
no finer position).

With ``model.spatial_dims=3`` the units are volumes, one per (image, t), cut into 3-D windows:
:mod:`unetdist.data.sources.ome_zarr_volumes` (:class:`OmeZarrImages` with other units).
"""

from __future__ import annotations

import glob
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from unetdist.config import DataConfig
from unetdist.data.layout import IMAGE_DTYPES, foreground_points, sample_key
from unetdist.data.ngff import NgffImage, label_image, read_image
from unetdist.data.remote import display, is_remote, zarr_store
from unetdist.data.samples import Sample, SampleChecks, check_sample
from unetdist.data.sources.image_windows import ImageWindows, TileRead
from unetdist.data.splits import fits, holdout_lengths
from unetdist.data.zarr_cache import node_cached

AXES = "tczyx"  # the axes a plane is cut from, in NGFF's order


@dataclass(frozen=True)
class ImageLevels:
    """What reading one image's planes needs: paths inside the image group and the axes."""

    url: str
    stem: str  # sample keys: {stem}[_t{t}][_z{z}]_y{top}_x{left}
    axes: tuple[str, ...]
    label_axes: tuple[str, ...]
    image_path: str  # the image array at data.level
    label_path: str  # labels/<name>/<the level of the same downsampling>
    foreground_path: str  # labels/<name>/<the coarsest level downsampled <= tile_size / 4>
    channels: tuple[int, int]  # the channel range read: [start, stop)
    pick: tuple[int, ...] | None  # offsets into that range; None: all of it
    size_t: int
    size_z: int
    height: int
    width: int


@dataclass(frozen=True)
class Plane:
    """A unit: plane (t, z) of image ``image``, its rows [row0, row0 + height) (a region split)."""

    image: int
    t: int
    z: int
    row0: int
    height: int


def open_ome_zarr(
    data: DataConfig, split: str, checks: SampleChecks, source: type[OmeZarrImages] | None = None
) -> OmeZarrImages:
    """The OME-Zarr source of ``split`` ("train" or "val") named by the data config; ``source``: its
    class (volumes: :class:`~unetdist.data.sources.ome_zarr_volumes.OmeZarrVolumes`)."""
    if not data.labels:
        raise ValueError(
            "data.labels is empty: data.format=ome-zarr needs the name of the label image (labels/NAME "
            "beside each image) that holds the masks"
        )
    images = expand_images(data.images, "data.images")
    if not images:
        raise ValueError("data.images is empty: data.format=ome-zarr needs NGFF image paths, URLs or globs")
    held_out = expand_images(data.val_images, "data.val_images")
    rows: tuple[str, float] | None = None  # a region split: (the part, val_fraction)
    if held_out:
        held = {_same(url) for url in held_out}
        chosen = held_out if split == "val" else [url for url in images if _same(url) not in held]
        if not chosen:
            raise ValueError("every image of data.images is in data.val_images: none is left to train on")
    elif data.val_fraction == 0:
        if split == "val":
            raise ValueError(
                "no validation split: data.val_fraction=0 and data.val_images is empty; set either "
                "(data.format=ome-zarr)"
            )
        chosen = images
    elif len(images) >= 2:
        held_count = math.ceil(data.val_fraction * len(images))
        if held_count >= len(images):
            raise ValueError(
                f"data.val_fraction={data.val_fraction} of {len(images)} images holds out {held_count}: "
                "none is left to train on; set a smaller fraction or data.val_images"
            )
        chosen = images[-held_count:] if split == "val" else images[:-held_count]
    else:
        chosen, rows = images, (split, data.val_fraction)
    return (source or OmeZarrImages)(
        chosen,
        data.labels,
        checks,
        level=data.level,
        channels=tuple(data.channels),
        tiles_per_image=data.tiles_per_image,
        sampled=split == "train",
        foreground_fraction=data.foreground_fraction if split == "train" else 0.0,
        rows=rows,
    )


def expand_images(entries: list[str], key: str) -> list[str]:
    """Image paths and URLs in the given order, each local glob expanded (sorted); duplicates dropped."""
    out: list[str] = []
    for entry in entries:
        if not is_remote(entry) and glob.has_magic(entry):
            matches = sorted(glob.glob(entry))
            if not matches:
                raise ValueError(f"{key}: {entry!r} matches nothing")
            out.extend(matches)
        else:
            out.append(entry)
    return list(dict.fromkeys(out))


def _same(url: str) -> str:
    return url.rstrip("/") if is_remote(url) else os.path.normpath(os.path.abspath(url))


class OmeZarrImages(ImageWindows):
    """Tiles of the planes of OME-Zarr images and their label images; picklable, opened lazily per process."""

    unit_name = "plane"  # an image's (t, z) plane

    def __init__(
        self,
        urls: list[str],
        labels: str,
        checks: SampleChecks,
        *,
        level: int = 0,
        channels: tuple[int, ...] = (),
        tiles_per_image: int = 16,
        sampled: bool = True,
        foreground_fraction: float = 0.0,
        rows: tuple[str, float] | None = None,
    ) -> None:
        self.checks, self.sampled = checks, sampled
        self.foreground_fraction = foreground_fraction if sampled else 0.0
        self.remote = any(is_remote(url) for url in urls)
        stems = [_stem(url) for url in urls]
        if len(set(stems)) < len(stems):  # keys must tell the images apart
            stems = [f"{index}-{stem}" for index, stem in enumerate(stems)]

        def describe(url: str, stem: str) -> ImageLevels:
            return _image_levels(url, stem, labels=labels, level=level, channels=channels, checks=checks)

        with ThreadPoolExecutor(min(16, len(urls))) as pool:  # a few metadata requests per image
            self.images = list(pool.map(describe, urls, stems))
        self._set_up_units(rows, tiles_per_image)

    def _set_up_units(self, rows: tuple[str, float] | None, tiles_per_image: int) -> None:
        """The units (here planes) of the images described, their window areas and counts."""
        checks = self.checks
        self.planes = [
            Plane(index, t, z, 0, image.height)
            for index, image in enumerate(self.images)
            for t in range(image.size_t)
            for z in range(image.size_z)
        ]
        if rows is not None:
            self.planes = [_region(p, self.images[p.image], rows, checks.tile_size) for p in self.planes]
        self._set_units(
            [(plane.height, self.images[plane.image].width) for plane in self.planes],
            tiles_per_image,
            self.names,
        )

    @property
    def names(self) -> list[str]:
        return [self._where(plane) for plane in self.planes]

    def _where(self, plane: Plane) -> str:
        image = self.images[plane.image]
        where = [f"t={plane.t}"] * (image.size_t > 1) + [f"z={plane.z}"] * (image.size_z > 1)
        where += [f"rows {plane.row0}-{plane.row0 + plane.height - 1}"] * (plane.height < image.height)
        return f"ome-zarr {display(image.url)}" + (f" ({', '.join(where)})" if where else "")

    def _array(self, image: int, path: str):
        """Array ``path`` of image ``image``'s group, opened once per process."""
        import zarr

        arrays, groups = self._cache("arrays"), self._cache("groups")
        if (image, path) not in arrays:
            if image not in groups:  # one store (one client, for a URL) per image and process
                store = node_cached(zarr_store(self.images[image].url), self.chunk_cache)
                groups[image] = zarr.open_group(store, mode="r")
            arrays[image, path] = groups[image][path]
        return arrays[image, path]

    def foreground(self, unit: int) -> np.ndarray:
        """int32 [K, 2] (y, x): foreground pixels of plane ``unit`` (in its rows), from a coarse level."""
        tables = self._cache("foreground")
        if unit not in tables:
            plane = self.planes[unit]
            image = self.images[plane.image]
            whole = (slice(None), slice(None))
            coarse = self._array(plane.image, image.foreground_path)[
                _selection(image.label_axes, plane.t, plane.z, *whole, channel=0)
            ]
            points = foreground_points(coarse).astype(np.float64)
            # a coarse pixel's centre, in level data.level's pixels
            factor = np.array([image.height / coarse.shape[0], image.width / coarse.shape[1]])
            ys, xs = np.minimum((points + 0.5) * factor, [image.height - 1, image.width - 1]).astype(int).T
            inside = (ys >= plane.row0) & (ys < plane.row0 + plane.height)
            tables[unit] = np.stack([ys[inside] - plane.row0, xs[inside]], axis=1).astype(np.int32)
        return tables[unit]

    def _tile_reads(self, unit: int, top: int, left: int) -> list[TileRead]:
        plane = self.planes[unit]
        image = self.images[plane.image]
        size = self.checks.tile_size
        rows, cols = slice(plane.row0 + top, plane.row0 + top + size), slice(left, left + size)
        pixels = self._array(plane.image, image.image_path).async_array
        labels = self._array(plane.image, image.label_path).async_array
        channel = slice(*image.channels)
        pixel_window = _selection(image.axes, plane.t, plane.z, rows, cols, channel=channel)
        label_window = _selection(image.label_axes, plane.t, plane.z, rows, cols, channel=0)
        return [lambda: pixels.getitem(pixel_window), lambda: labels.getitem(label_window)]

    def _describe(self, unit: int, top: int, left: int) -> tuple[str, str]:
        plane = self.planes[unit]
        image = self.images[plane.image]
        stem = image.stem + f"_t{plane.t}" * (image.size_t > 1) + f"_z{plane.z}" * (image.size_z > 1)
        return self._where(plane), sample_key(stem, plane.row0 + top, left)

    def _sample(self, unit: int, *corner: int, arrays: list[np.ndarray]) -> Sample:
        pixels, labels = arrays
        image = self.images[self.planes[unit].image]
        if "c" not in image.axes:
            pixels = pixels[None]
        elif image.pick is not None:
            pixels = pixels[list(image.pick)]
        where, key = self._describe(unit, *corner)  # a plane's (top, left), a volume's (z, top, left)
        return check_sample(key, where, pixels, labels, None, self.checks)


def _selection(axes: tuple[str, ...], t: int, z: int, rows: slice, cols: slice, channel: int | slice):
    """The index of a window of plane (t, z) in an array of ``axes`` (t, z and an int channel drop out)."""
    index = {"t": t, "c": channel, "z": z, "y": rows, "x": cols}
    return tuple(index[axis] for axis in axes)


def _stem(url: str) -> str:
    name = url.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".ome.zarr", ".zarr"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _region(plane: Plane, image: ImageLevels, rows: tuple[str, float], tile_size: int) -> Plane:
    """The training (top) or validation (bottom) rows of a plane of the one image (a region split),
    half a tile apart (:func:`~unetdist.data.splits.holdout_lengths`, as prepare splits one image)."""
    part, fraction = rows
    lengths = holdout_lengths(image.height, tile_size, fraction)
    if not fits(lengths, tile_size):
        raise ValueError(
            f"ome-zarr {display(image.url)}: {image.height} rows cannot hold out {lengths.val} validation "
            f"rows (data.val_fraction={fraction}, at least data.tile_size) and a {lengths.gap}-row gap and "
            f"keep {tile_size} to train on; give more images, data.val_images, or data.val_fraction=0"
        )
    row0, height = (image.height - lengths.val, lengths.val) if part == "val" else (0, lengths.train)
    return Plane(plane.image, plane.t, plane.z, row0, height)


def _image_levels(
    url: str, stem: str, *, labels: str, level: int, channels: tuple[int, ...], checks: SampleChecks
) -> ImageLevels:
    """Read and check an image's metadata and its label image's; what reading its planes needs."""
    import zarr

    where = f"ome-zarr {display(url)}"
    image = read_image(url)
    ordered = [axis for axis in AXES if axis in image.axes] == list(image.axes)
    if not ordered or not {"y", "x"} <= set(image.axes):
        raise ValueError(
            f"{where}: axes {''.join(image.axes)}; expected axes among t, c, z, y, x in that order, with y "
            "and x"
        )
    if level >= len(image.levels):
        raise ValueError(
            f"{where}: data.level={level} out of range: it has {len(image.levels)} level(s), "
            f"0..{len(image.levels) - 1}"
        )
    label = label_image(image, labels)
    label_level = _matching_level(image, label, level)
    label_path = f"labels/{labels}/{label.levels[label_level]}"
    group = zarr.open_group(zarr_store(url), mode="r")
    pixels, label_array = group[image.levels[level]], group[label_path]
    sizes = dict(zip(image.axes, pixels.shape, strict=True))
    label_sizes = dict(zip(label.axes, label_array.shape, strict=True))
    mismatched = [axis for axis in label.axes if axis != "c" and label_sizes[axis] != sizes[axis]]
    if mismatched:
        raise ValueError(
            f"{where}: level {level} {list(pixels.shape)} ({''.join(image.axes)}) and {label_path} "
            f"{list(label_array.shape)} ({''.join(label.axes)}) differ in {''.join(mismatched)}; expected "
            "the same spatial and time sizes"
        )
    if np.dtype(pixels.dtype) not in IMAGE_DTYPES:
        expected = ", ".join(map(str, IMAGE_DTYPES))
        raise ValueError(f"{where}: dtype {pixels.dtype}; expected one of {expected}")
    count = sizes.get("c", 1)
    chosen = list(channels) or list(range(count))
    outside = [channel for channel in chosen if not 0 <= channel < count]
    if outside:
        raise ValueError(
            f"{where}: data.channels={list(channels)}: channel {outside[0]} out of range for its {count} "
            "channel(s)"
        )
    if len(chosen) != checks.in_channels:
        raise ValueError(
            f"{where}: {len(chosen)} channel(s) chosen (data.channels={list(channels)}; empty: all), "
            f"model.in_channels={checks.in_channels}; expected as many"
        )
    start, stop = min(chosen), max(chosen) + 1
    foreground_level = _foreground_level(label, label_level, checks.tile_shape)
    return ImageLevels(
        url=url,
        stem=stem,
        axes=image.axes,
        label_axes=label.axes,
        image_path=image.levels[level],
        label_path=label_path,
        foreground_path=f"labels/{labels}/{label.levels[foreground_level]}",
        channels=(start, stop),
        pick=None if chosen == list(range(start, stop)) else tuple(channel - start for channel in chosen),
        size_t=sizes.get("t", 1),
        size_z=sizes.get("z", 1),
        height=sizes["y"],
        width=sizes["x"],
    )


def _downsampling(image: NgffImage, level: int, base: int) -> dict[str, float]:
    """Per axis but the channel's, how much coarser ``level`` is than ``base`` (scale ratios)."""
    return {
        axis: image.scales[level][i] / image.scales[base][i]
        for i, (axis, kind) in enumerate(zip(image.axes, image.axis_types, strict=True))
        if kind != "channel"
    }


def _matching_level(image: NgffImage, label: NgffImage, level: int) -> int:
    """The label level downsampled like image level ``level`` (relative to each one's level 0, whose
    sizes :func:`label_image` matched: a label image may state its scale in other units)."""
    wanted = _downsampling(image, level, 0)
    for candidate in range(len(label.levels)):
        found = _downsampling(label, candidate, 0)
        if all(math.isclose(value, wanted[axis], rel_tol=1e-6) for axis, value in found.items()):
            return candidate
    axes = "".join(_downsampling(label, 0, 0))
    levels = [[round(v, 4) for v in _downsampling(label, i, 0).values()] for i in range(len(label.levels))]
    raise ValueError(
        f"ome-zarr {display(label.url)}: no level downsampled like image level {level} "
        f"({[round(wanted[axis], 4) for axis in axes]}, axes {axes}); its levels: {levels}; expected a label "
        "level of the same scale"
    )


def _foreground_level(label: NgffImage, base: int, tile: tuple[int, ...]) -> int:
    """The coarsest label level (from ``base`` on) with t as at ``base`` and each tile axis (y, x; a
    volume's z, y, x) downsampled at most its tile length / 4: its pixels place a tile centre to
    within a quarter tile. In 2-D z is no tile axis: it stays as at ``base`` (each plane is a unit)."""
    limits = dict(zip("zyx"[-len(tile):], (length / 4 for length in tile), strict=True))
    chosen = base
    for candidate in range(base, len(label.levels)):
        ratio = _downsampling(label, candidate, base)
        fine = all(value <= limits[axis] if axis in limits else value == 1 for axis, value in ratio.items())
        if fine:
            chosen = candidate
    return chosen
