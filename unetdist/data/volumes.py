"""Volumes in, for ``prepare --spatial-dims 3``: 3-D image/mask files, their voxel spacing, and the
[C, Z, Y, X] layout.

:class:`VolumePairs` (``--images``, ``--masks`` with ``--spatial-dims 3``) matches the files of two
folders by stem, each file one volume: TIFF stacks (ImageJ hyperstacks, OME-TIFF, plain tifffile
stacks) of axes (z, y, x) or (z, c, y, x), and ``.npy`` arrays. :func:`check_volume` holds a pair
to what prepare stores (one :class:`~unetdist.data.imageio.PrepareError` line naming the file),
the volume counterpart of :func:`unetdist.data.pair_masks.check_pair`::

    image, labels = check_volume(pair, "instances", tile=(16, 64, 64))   # [C, Z, Y, X], [Z, Y, X]
    spacing = voxel_spacing(pair, given=None)                          # (z, y, x)

The spacing is read from the image file's metadata: ImageJ's ``spacing`` (z) and the
resolution tags (y, x: one over the pixels per unit), or OME-TIFF's PhysicalSizeZ/Y/X; in the
file's unit. ``--spacing z,y,x`` wins over it; where neither says, 1, 1, 1 with a warning,
since a planner would take a coarse z for an isotropic one.

:class:`NgffVolumePairs` (``--from-ome-zarr`` with ``--spatial-dims 3``): each OME-Zarr image with a
z axis, per time point, is one volume; its spacing is the NGFF scale of the level read.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from unetdist.data.imageio import PrepareError, is_ome_tiff, match_by_stem, ome_planes
from unetdist.data.inputs import NgffPairs, Pair, PairSource, ngff_stem
from unetdist.data.layout import IMAGE_DTYPES
from unetdist.data.pair_masks import check_labels
from unetdist.data.remote import display

__all__ = ["VOLUME_SUFFIXES", "NgffVolumePairs", "VolumePairs", "check_volume", "read_volume", "voxel_spacing"]

log = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".tif", ".tiff", ".npy")
Spacing = tuple[float, float, float]  # (z, y, x)


def read_volume(path: Path) -> tuple[np.ndarray, str, tuple[float | None, ...] | None]:
    """(array, TIFF axis letters or "" for .npy, (z, y, x) spacing from the metadata or None; an
    axis the metadata does not give is None). An OME-TIFF comes as ZCYX of its one time point."""
    if path.suffix.lower() == ".npy":
        try:
            return np.load(path, allow_pickle=False), "", None
        except Exception as err:
            raise PrepareError(f"{path}: cannot read .npy volume: {err}") from err
    import tifffile

    try:
        with tifffile.TiffFile(path) as tiff:
            series = tiff.series[0]
            array, axes = series.asarray(), series.axes
            spacing = _ome_spacing(tiff.ome_metadata) if tiff.is_ome else _imagej_spacing(tiff)
    except Exception as err:
        raise PrepareError(f"{path}: cannot read TIFF volume: {err}") from err
    if is_ome_tiff(path):
        planes = ome_planes(array, axes, path)  # [T, Z, C, Y, X]
        if planes.shape[0] != 1:
            raise PrepareError(f"{path}: {planes.shape[0]} time points (OME-TIFF axes {axes}); expected one "
                               "volume per file")  # fmt: skip
        return planes[0], "ZCYX", spacing
    return array, axes, spacing


def _imagej_spacing(tiff) -> tuple[float | None, ...] | None:
    """(z, y, x) of an ImageJ file: its "spacing", and one over the resolution tags' pixels per unit."""
    if not tiff.is_imagej:
        return None  # a plain TIFF's resolution is a print resolution (dots per inch), not a voxel size
    page = tiff.pages.first
    sizes = []
    for tag in ("YResolution", "XResolution"):
        value = page.tags.get(tag)
        numerator, denominator = value.value if value is not None else (0, 0)
        sizes.append(denominator / numerator if numerator and denominator else None)
    z = tiff.imagej_metadata.get("spacing")
    return (float(z) if z else None, *sizes)


def _ome_spacing(xml: str | None) -> tuple[float | None, ...] | None:
    """(z, y, x) PhysicalSize of an OME-XML's first Pixels element."""
    pixels = re.search(r"<(?:\w+:)?Pixels\b[^>]*>", xml or "")
    if pixels is None:
        return None
    found = []
    for axis in "ZYX":
        size = re.search(rf'\bPhysicalSize{axis}="([^"]+)"', pixels.group(0))
        found.append(float(size.group(1)) if size else None)
    return tuple(found)


def voxel_spacing(pair: Pair, given: Sequence[float] | None) -> Spacing:
    """``given`` (``--spacing``) if any, else the file's, an axis it lacks 1.0 (warned)."""
    if given is not None:
        return tuple(float(size) for size in given)
    read = pair.spacing or (None, None, None)
    missing = [axis for axis, size in zip("zyx", read, strict=True) if not size]
    if missing:
        log.warning("%s: no voxel size along %s in its metadata: taken as 1; set --spacing z,y,x",
                    pair.image_where, ", ".join(missing))  # fmt: skip
    return tuple(float(size) if size else 1.0 for size in read)


class VolumePairs(PairSource):
    """``images_dir`` and ``masks_dir`` volumes (:data:`VOLUME_SUFFIXES`) matched by stem, one
    volume per file; each :class:`~unetdist.data.inputs.Pair` carries the image's metadata spacing."""

    def __init__(self, images_dir: str | Path, masks_dir: str | Path) -> None:
        self.images_dir, self.masks_dir = Path(images_dir), Path(masks_dir)
        self._files: dict[str, tuple[Path, Path]] = {}

    def items(self) -> list[tuple[str, str]]:
        matched = match_by_stem(self.images_dir, self.masks_dir, VOLUME_SUFFIXES)
        self._files = {stem: (image, mask) for stem, image, mask in matched}
        return [(stem, stem) for stem in self._files]

    def read(self, stems: Sequence[str]) -> Iterator[Pair]:
        for stem in stems:
            image_path, mask_path = self._files[stem]
            image, axes, spacing = read_volume(image_path)
            mask = _mask_volume(*read_volume(mask_path)[:2])
            yield Pair(stem, image, mask, str(image_path), str(mask_path), mask_path.name, axes, spacing)

    def provenance(self) -> dict:
        return {"images": str(self.images_dir.resolve()), "masks": str(self.masks_dir.resolve())}


class NgffVolumePairs(NgffPairs):
    """NGFF images with a z axis and their label image ``labels/<labels>`` at ``level``: each time
    point is one volume (``NAME``, or ``NAME_t0``... of an image with several), image [C, Z, Y, X] of
    the ``channels``, labels [Z, Y, X]; the spacing is the level's NGFF scale (z, y, x), in the
    axes' unit. The plan (levels, sizes, channels) is :class:`~unetdist.data.inputs.NgffPairs`'s;
    the time points of one image stay in one split (their group is the image)."""

    def items(self) -> list[tuple[str, str]]:
        planes = super().items()  # checks every image and label image, one stem per (t, z) plane
        self._volumes: dict[str, tuple] = {}
        items = []
        for url in dict.fromkeys(url for _, url in planes):
            plan = next(self._planes[stem][0] for stem, group in planes if group == url)
            if "z" not in plan.image_index:  # _axis_roles: "z" is the space axis before y and x
                raise PrepareError(f"ome-zarr {display(url)}: axes without z; --spatial-dims 3 needs images "
                                   "with a z axis ((t,) (c,) z, y, x)")  # fmt: skip
            base = ngff_stem(url)
            for t in range(plan.planes[0]):
                stem = f"{base}_t{t}" if plan.planes[0] > 1 else base
                self._volumes[stem] = (plan, t, self._spacings[url])
                items.append((stem, url))
        return items

    def _plan(self, image, label):
        plan = super()._plan(image, label)
        # the voxel size of the level read: its scale's space axes (z, y, x), kept from the metadata
        # read once (at a URL, a request)
        scale = image.scales[self.level]
        self._spacings = getattr(self, "_spacings", {})
        self._spacings[image.url] = tuple(float(v) for role, v in zip(plan.image_index, scale, strict=True)
                                          if role in ("z", "yx"))  # fmt: skip
        return plan

    def read(self, stems: Sequence[str]) -> Iterator[Pair]:
        for stem in stems:
            plan, t, spacing = self._volumes[stem]
            when = f" time point t={t}" if plan.planes[0] > 1 else ""
            everything = slice(None)
            image = self._array(plan.url, plan.image_path)[_ngff_index(plan.image_index, t, everything)]
            if "c" in plan.image_index and self.channels is not None:
                image = image[self.channels]  # NGFF puts c before z: the first axis left
            mask = self._array(plan.label_url, plan.label_path)[_ngff_index(plan.label_index, t, 0)]
            axes = "CZYX" if "c" in plan.image_index else "ZYX"
            yield Pair(stem, image, mask, f"ome-zarr {display(plan.url)}{when}",
                       f"ome-zarr {display(plan.label_url)}{when}", f"labels/{self.labels}", axes, spacing)  # fmt: skip

    def provenance(self) -> dict:
        return {**super().provenance(), "spatial_dims": 3}


def _ngff_index(roles: tuple[str, ...], t: int, channel: slice | int) -> tuple:
    """The index of time point ``t``'s volume: all of z, y and x, ``channel`` of a channel axis."""
    return tuple({"t": t, "c": channel}.get(role, slice(None)) for role in roles)


def _mask_volume(mask: np.ndarray, axes: str) -> np.ndarray:
    """A mask file's array without the singleton axes that are not space (an OME-TIFF's C, a
    leading 1 of a .npy), so that :func:`check_volume` sees what it holds."""
    if axes:
        keep = [i for i, axis in enumerate(axes) if axis in "ZYX" or mask.shape[i] != 1]
        return mask.reshape([mask.shape[i] for i in keep])
    while mask.ndim > 3 and mask.shape[0] == 1:
        mask = mask[0]
    return mask


def check_volume(pair: Pair, mask_kind: str, tile: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One volume pair checked; returns (image [C, Z, Y, X], labels [Z, Y, X])."""
    mask, mask_where = pair.mask, pair.mask_where
    if mask.dtype == bool:  # a boolean .npy mask: 0/1
        mask = mask.astype(np.uint8)
    if mask.ndim != 3:
        raise PrepareError(f"{mask_where}: mask shape {mask.shape}; a volume (--spatial-dims 3) needs a "
                           "single-channel (z, y, x) label volume")  # fmt: skip
    check_labels(mask, mask_kind, mask_where)
    image = _to_czyx(pair.image, pair.image_axes or "", mask.shape, pair)
    if image.dtype not in IMAGE_DTYPES:
        raise PrepareError(f"{pair.image_where}: image dtype {image.dtype} not supported; convert to one "
                           f"of {', '.join(str(d) for d in IMAGE_DTYPES)}")  # fmt: skip
    small = [axis for axis, size, length in zip("zyx", mask.shape, tile, strict=True) if size < length]
    if small:
        raise PrepareError(
            f"{pair.image_where}: volume {'x'.join(map(str, mask.shape))} is smaller than the tile "
            f"{'x'.join(map(str, tile))} along {', '.join(small)}; use a smaller --tile-depth or --tile"
        )
    return image, mask


def _to_czyx(image: np.ndarray, axes: str, mask_shape: tuple[int, ...], pair: Pair) -> np.ndarray:
    """[C, Z, Y, X] of a (z, y, x), (z, c, y, x) or (c, z, y, x) volume, by its axis letters where
    they say (ImageJ, OME-TIFF), else by which axes have the mask's sizes; (z, c, y, x), ImageJ's
    order, where both would fit."""
    found = f"image shape {image.shape}" + (f" (TIFF axes {axes})" if axes else "")
    if image.ndim == 2 or (image.ndim == 3 and axes[:1] in ("C", "S")):
        relabel = "; if its planes are z, save it with TIFF axes ZYX (ImageJ slices)" if image.ndim == 3 else ""
        raise PrepareError(
            f"{pair.image_where}: {found} is a 2-D image, but its mask {pair.mask_name} is a volume of shape "
            f"{mask_shape}; --spatial-dims 3 needs (z, y, x) or (z, c, y, x) images{relabel}"
        )
    if image.ndim == 3 and image.shape == mask_shape:
        return image[None]
    if image.ndim == 4 and "Z" in axes and ("C" in axes or "S" in axes):
        channel = axes.index("C" if "C" in axes else "S")
        image = np.moveaxis(image, channel, 0)
        if image.shape[1:] == mask_shape:
            return np.ascontiguousarray(image)
    elif image.ndim == 4:
        if image.shape[0] == mask_shape[0] and image.shape[2:] == mask_shape[1:]:
            return np.ascontiguousarray(image.transpose(1, 0, 2, 3))
        if image.shape[1:] == mask_shape:
            return image
    raise PrepareError(
        f"{pair.image_where}: {found} does not match its mask {pair.mask_name} of shape {mask_shape}; "
        "expected (z, y, x) or (z, c, y, x) of the mask's z, y and x"
    )


def check_volume_settings(
    spatial_dims: int,
    whole_images: bool,
    tile_depth: int,
    spacing: Sequence[float] | None,
    *,
    webdataset: bool = False,
    context_margin: int = 0,
) -> None:
    """prepare's options that concern volumes, one :class:`PrepareError` naming the flags.
    ``webdataset``: the output is tar shards (3-D tiles, :mod:`unetdist.data.volume_tiles`)."""
    if spatial_dims not in (2, 3):
        raise PrepareError(f"--spatial-dims must be 2 or 3, got {spatial_dims}")
    if spatial_dims == 3 and not (whole_images or webdataset):
        raise PrepareError(
            "--spatial-dims 3 needs --format webdataset (3-D tiles) or --format zarr --whole-images "
            "(no pre-tiled Zarr of volumes yet)"
        )
    if spatial_dims == 3 and context_margin:
        # a valid-conv model's margin differs per axis where z pools fewer levels: 2-D prepare's one
        # margin per side would be wrong along z
        raise PrepareError("--context-for goes with --spatial-dims 2 (volumes store no overlap-tile context yet)")
    if spatial_dims == 2 and (tile_depth or spacing is not None):
        raise PrepareError(f"{'--tile-depth' if tile_depth else '--spacing'} goes with --spatial-dims 3")
    if tile_depth < 0:
        raise PrepareError(f"--tile-depth must be 0 (a cube) or positive, got {tile_depth}")
    if spacing is not None and (len(spacing) != 3 or not all(size > 0 for size in spacing)):
        raise PrepareError(f"--spacing needs three positive voxel sizes z,y,x, got {list(spacing)}")


def volume_metadata(tile: tuple[int, ...], spacings: dict[str, Spacing]) -> dict:
    """dataset.json's volume entries: spatial_dims, the tile depth, and the median spacing per axis
    (the planner's one spacing for the data set: the typical volume, not an outlier's)."""
    median = np.median(np.asarray(list(spacings.values()), dtype=np.float64), axis=0) if spacings else np.ones(3)
    return {"spatial_dims": 3, "tile_depth": int(tile[0]), "spacing": [float(size) for size in median]}
