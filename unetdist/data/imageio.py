"""Image files in: TIFF/PNG reading, image/mask pairing by stem, OME-TIFF axes, and the [C, H, W] layout.

Used by prepare (folders of images and masks), and by predict and evaluate, which read the
same files. Every problem is a :class:`PrepareError` naming the file and what was expected.
An OME-TIFF (``x.ome.tif``) pairs by the stem ``x`` and is read by its axes
(:func:`read_ome_tiff`): T and Z planes apart, C and S (RGB samples) as channels.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from unetdist.data.layout import sample_key

log = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".tif", ".tiff", ".png")
OME_TIFF_SUFFIXES = (".ome.tif", ".ome.tiff")


class PrepareError(ValueError):
    """Bad input to prepare: the message names the file(s) and what was expected."""


def read_array(path: Path) -> np.ndarray:
    """A TIFF (tifffile) or PNG (PIL) as a numpy array, dtype kept."""
    try:
        if path.suffix.lower() == ".png":
            from PIL import Image

            with Image.open(path) as picture:
                return np.asarray(picture)
        import tifffile

        return tifffile.imread(path)
    except Exception as err:
        raise PrepareError(f"{path}: cannot read image: {err}") from err


def file_stem(path: Path) -> str:
    """The name images and masks pair by: ``x.tif`` -> ``x``, and ``x.ome.tif`` -> ``x`` (not ``x.ome``)."""
    return path.name[: -len(".ome") - len(path.suffix)] if is_ome_tiff(path) else path.stem


def is_ome_tiff(path: Path) -> bool:
    return path.name.lower().endswith(OME_TIFF_SUFFIXES)


def _list_by_stem(folder: Path, suffixes: tuple[str, ...] = SUPPORTED_SUFFIXES) -> dict[str, Path]:
    if not folder.is_dir():
        raise PrepareError(f"{folder}: not a folder")
    by_stem: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if path.suffix.lower() not in suffixes:
            log.warning("skipping %s: not one of %s", path, ", ".join(suffixes))
            continue
        stem = file_stem(path)
        if stem in by_stem:
            raise PrepareError(f"{folder}: two files with stem {stem!r}: {by_stem[stem].name}, {path.name}")
        by_stem[stem] = path
    return by_stem


def match_by_stem(
    images_dir: Path, masks_dir: Path, suffixes: tuple[str, ...] = SUPPORTED_SUFFIXES
) -> list[tuple[str, Path, Path]]:
    """(stem, image, mask) for every stem, sorted; any file without a partner is an error.
    ``suffixes``: the files to list (volumes add .npy)."""
    images, masks = _list_by_stem(images_dir, suffixes), _list_by_stem(masks_dir, suffixes)
    images_only = sorted(set(images) - set(masks))
    masks_only = sorted(set(masks) - set(images))
    if images_only or masks_only:
        raise PrepareError(
            "images and masks must match by file stem; "
            f"without a mask in {masks_dir}: {[images[s].name for s in images_only]}; "
            f"without an image in {images_dir}: {[masks[s].name for s in masks_only]}"
        )
    if not images:
        raise PrepareError(f"{images_dir}: no {'/'.join(suffixes)} images found")
    check_keys(images)
    return [(stem, images[stem], masks[stem]) for stem in sorted(images)]


def check_keys(stems) -> None:
    """Refuse two stems that would give the same shard keys (:func:`~unetdist.data.layout.sample_key`)."""
    keys: dict[str, str] = {}
    for stem in stems:
        clash = keys.setdefault(sample_key(stem, 0, 0), stem)
        if clash != stem:
            raise PrepareError(f"stems {clash!r} and {stem!r} give the same shard key once dots become '_'")


# What the last axis of a channels-last picture holds: grey, grey + alpha, RGB, RGBA.
PICTURE_CHANNELS = (1, 2, 3, 4)
# TIFF axis letters (tifffile's series axes) of a channel axis; any other first axis of a
# 3-D TIFF (Z depth, T time, I/Q a plain page sequence) is a stack of planes.
TIFF_CHANNEL_AXES = "CS"
# A first axis of these letters says nothing (a page sequence without metadata, or ImageJ's
# plain "images"): of up to this many pages it may well be channels saved without a channel
# axis (RGB, RGBA, a few stains); more pages are far more likely the planes of a z-stack.
TIFF_UNLABELLED_AXES, MAX_UNLABELLED_CHANNELS = "QI", 4


def is_channels_last(shape: tuple[int, ...]) -> bool:
    """Whether a 3-D shape is a picture ``[H, W, C]`` with its colour channels last (an RGB PNG,
    most colour TIFFs): a last axis of 1-4 and a first axis larger than any channel count.

    Predict, evaluate and the stored-sample decoder decide by this; prepare, which has the
    mask's size, matches the axes to it instead (:func:`image_to_chw`).
    """
    return len(shape) == 3 and shape[-1] in PICTURE_CHANNELS and shape[0] > max(PICTURE_CHANNELS)


def tiff_series(path: Path) -> tuple[str, tuple[int, ...]]:
    """tifffile's axis letters and shape of a TIFF's first series, from its headers alone."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tiff:
            if not tiff.series:
                raise ValueError("no image series")
            return tiff.series[0].axes, tuple(tiff.series[0].shape)
    except Exception as err:
        raise PrepareError(f"{path}: cannot read TIFF: {err}") from err


def _tiff_axes(path: Path) -> str:
    """tifffile's axis letters of a TIFF's first series ("" when it has none or is no TIFF)."""
    if path.suffix.lower() not in (".tif", ".tiff"):
        return ""
    try:
        return tiff_series(path)[0]
    except PrepareError:  # read_array has read it already; the axes only shape a warning
        return ""


# OME-TIFF axes (tifffile's letters): planes (time, depth), channels (C, and S: RGB samples), space.
OME_PLANE_AXES, OME_CHANNEL_AXES, OME_SPACE_AXES = "TZ", "CS", "YX"


def ome_plane_counts(axes: str, shape: tuple[int, ...], where: object) -> tuple[int, int]:
    """(T, Z) of an OME-TIFF series; :class:`PrepareError` for axes other than T, Z, C, S, Y, X."""
    unknown = [axis for axis in axes if axis not in OME_PLANE_AXES + OME_CHANNEL_AXES + OME_SPACE_AXES]
    if unknown or "Y" not in axes or "X" not in axes or len(set(axes)) != len(axes):
        raise PrepareError(
            f"{where}: OME-TIFF axes {axes} (shape {shape}); expected Y and X, and otherwise only "
            "T, Z, C and S (RGB samples), each at most once"
        )
    sizes = dict(zip(axes, shape, strict=True))
    return sizes.get("T", 1), sizes.get("Z", 1)


def ome_planes(array: np.ndarray, axes: str, where: object) -> np.ndarray:
    """An OME-TIFF series as [T, Z, C, H, W]: absent axes of size 1, C x S channels (RGB samples)."""
    ome_plane_counts(axes, array.shape, where)
    order = "TZCSYX"
    for axis in order:
        if axis not in axes:
            array, axes = array[..., None], axes + axis
    array = array.transpose([axes.index(axis) for axis in order])
    t, z, c, s, h, w = array.shape
    return array.reshape(t, z, c * s, h, w)


def read_ome_tiff(path: Path) -> tuple[np.ndarray, str]:
    """An OME-TIFF's first series as [T, Z, C, H, W] (:func:`ome_planes`), and its own axis letters."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tiff:
            series = tiff.series[0]
            axes, array = series.axes, series.asarray()
    except Exception as err:
        raise PrepareError(f"{path}: cannot read OME-TIFF: {err}") from err
    return ome_planes(array, axes, path), axes


def image_to_chw(
    image: np.ndarray, mask_shape: tuple[int, ...], path: Path | str, axes: str | None = None
) -> np.ndarray:
    """[C, H, W]: 2-D -> C=1; channels-last (RGB PNG, most TIFFs) -> transposed.

    The mask's HxW decides which axis holds the channels. A TIFF stack with a 2-D mask whose
    first axis is depth (TIFF axes Z: ImageJ slices, OME-less tifffile metadata), or a run of
    more than :data:`MAX_UNLABELLED_CHANNELS` pages of no stated kind, is a z-stack: refused,
    with the way to prepare it as a volume (``--spatial-dims 3``), since taking its planes as
    channels trains a 2-D model on a volume without a word. Other planes (time, a few pages)
    become channels of a 2-D image, with a warning. ``axes``: the image's TIFF axis letters
    where known (None: read them from ``path``, "" for none).
    """
    if image.ndim == 2:
        return image[None]
    if image.ndim == 3:
        if image.shape[1:] == tuple(mask_shape):
            if image.shape[0] <= 1:
                axes = ""
            elif axes is None:
                axes = _tiff_axes(Path(path))
            if axes and axes[0] not in TIFF_CHANNEL_AXES:
                _check_not_a_z_stack(image.shape, axes, path)
                log.warning(
                    "%s: a stack of %d planes (shape %s, TIFF axes %s) with a 2-D mask: its planes are "
                    "taken as %d channels of one 2-D image (train with model.in_channels=%d); for 3-D "
                    "segmentation of a z-stack, prepare it with --spatial-dims 3 and a 3-D mask",
                    path,
                    image.shape[0],
                    image.shape,
                    axes,
                    image.shape[0],
                    image.shape[0],
                )
            return image
        if image.shape[:2] == tuple(mask_shape):
            return np.ascontiguousarray(image.transpose(2, 0, 1))
    raise PrepareError(
        f"{path}: image shape {image.shape} does not match its mask's size {tuple(mask_shape)} "
        "(expected HxW, CxHxW or HxWxC)"
    )


def _check_not_a_z_stack(shape: tuple[int, ...], axes: str, path: Path | str) -> None:
    """:class:`PrepareError` for a [planes, H, W] TIFF whose planes are depth (see :func:`image_to_chw`)."""
    planes = shape[0]
    if axes[0] == "Z" or (axes[0] in TIFF_UNLABELLED_AXES and planes > MAX_UNLABELLED_CHANNELS):
        raise PrepareError(
            f"{path}: a z-stack of {planes} planes (shape {shape}, TIFF axes {axes}) with a 2-D mask; to "
            f"segment it in 3-D, prepare with --spatial-dims 3 --format zarr --whole-images and a "
            f"{planes}x{shape[1]}x{shape[2]} mask; for {planes} channels of one 2-D image, save it with "
            "a channel axis (TIFF axes CYX, or ImageJ channels)"
        )
