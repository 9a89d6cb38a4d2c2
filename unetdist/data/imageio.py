"""Image files in: TIFF/PNG reading, image/mask pairing by stem, and the [C, H, W] layout.

Used by prepare (folders of images and masks), and by predict and evaluate, which read the
same files. Every problem is a :class:`PrepareError` naming the file and what was expected.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from unetdist.data.layout import sample_key

log = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".tif", ".tiff", ".png")


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


def _list_by_stem(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise PrepareError(f"{folder}: not a folder")
    by_stem: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            log.warning("skipping %s: not one of %s", path, ", ".join(SUPPORTED_SUFFIXES))
            continue
        if path.stem in by_stem:
            raise PrepareError(
                f"{folder}: two files with stem {path.stem!r}: {by_stem[path.stem].name}, {path.name}"
            )
        by_stem[path.stem] = path
    return by_stem


def match_by_stem(images_dir: Path, masks_dir: Path) -> list[tuple[str, Path, Path]]:
    """(stem, image, mask) for every stem, sorted; any file without a partner is an error."""
    images, masks = _list_by_stem(images_dir), _list_by_stem(masks_dir)
    images_only = sorted(set(images) - set(masks))
    masks_only = sorted(set(masks) - set(images))
    if images_only or masks_only:
        raise PrepareError(
            "images and masks must match by file stem; "
            f"without a mask in {masks_dir}: {[images[s].name for s in images_only]}; "
            f"without an image in {images_dir}: {[masks[s].name for s in masks_only]}"
        )
    if not images:
        raise PrepareError(f"{images_dir}: no {'/'.join(SUPPORTED_SUFFIXES)} images found")
    keys: dict[str, str] = {}
    for stem in images:
        clash = keys.setdefault(sample_key(stem, 0, 0), stem)
        if clash != stem:
            raise PrepareError(f"stems {clash!r} and {stem!r} give the same shard key once dots become '_'")
    return [(stem, images[stem], masks[stem]) for stem in sorted(images)]


# What the last axis of a channels-last picture holds: grey, grey + alpha, RGB, RGBA.
PICTURE_CHANNELS = (1, 2, 3, 4)
# TIFF axis letters (tifffile's series axes) of a channel axis; any other first axis of a
# 3-D TIFF (Z depth, T time, I/Q a plain page sequence) is a stack of planes.
TIFF_CHANNEL_AXES = "CS"


def is_channels_last(shape: tuple[int, ...]) -> bool:
    """Whether a 3-D shape is a picture ``[H, W, C]`` with its colour channels last (an RGB PNG,
    most colour TIFFs): a last axis of 1-4 and a first axis larger than any channel count.

    Predict, evaluate and the stored-sample decoder decide by this; prepare, which has the
    mask's size, matches the axes to it instead (:func:`image_to_chw`).
    """
    return len(shape) == 3 and shape[-1] in PICTURE_CHANNELS and shape[0] > max(PICTURE_CHANNELS)


def _tiff_axes(path: Path) -> str:
    """tifffile's axis letters of a TIFF's first series ("" when it has none or is no TIFF)."""
    if path.suffix.lower() not in (".tif", ".tiff"):
        return ""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tiff:
            return tiff.series[0].axes if tiff.series else ""
    except Exception:  # read_array has read it already; the axes only shape a warning
        return ""


def image_to_chw(image: np.ndarray, mask_shape: tuple[int, ...], path: Path) -> np.ndarray:
    """[C, H, W]: 2-D -> C=1; channels-last (RGB PNG, most TIFFs) -> transposed.

    The mask's HxW decides which axis holds the channels. A TIFF stack of planes (z, time,
    pages) with a 2-D mask becomes a multi-channel 2-D image, with a warning: 3-D
    segmentation of volumes is not supported yet.
    """
    if image.ndim == 2:
        return image[None]
    if image.ndim == 3:
        if image.shape[1:] == tuple(mask_shape):
            axes = _tiff_axes(path) if image.shape[0] > 1 else ""
            if axes and axes[0] not in TIFF_CHANNEL_AXES:
                log.warning(
                    "%s: a stack of %d planes (shape %s, TIFF axes %s) with a 2-D mask: its planes are "
                    "taken as %d channels of one 2-D image (train with model.in_channels=%d); volumes "
                    "(3-D segmentation of z-stacks) are not supported yet",
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
