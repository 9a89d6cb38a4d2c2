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


def image_to_chw(image: np.ndarray, mask_shape: tuple[int, ...], path: Path) -> np.ndarray:
    """[C, H, W]: 2-D -> C=1; channels-last (RGB PNG, most TIFFs) -> transposed.

    The mask's HxW decides which axis holds the channels.
    """
    if image.ndim == 2:
        return image[None]
    if image.ndim == 3:
        if image.shape[1:] == tuple(mask_shape):
            return image
        if image.shape[:2] == tuple(mask_shape):
            return np.ascontiguousarray(image.transpose(2, 0, 1))
    raise PrepareError(
        f"{path}: image shape {image.shape} does not match its mask's size {tuple(mask_shape)} "
        "(expected HxW, CxHxW or HxWxC)"
    )
