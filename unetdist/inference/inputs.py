"""What ``python -m unetdist.predict`` reads: its inputs listed and image files read for the model.

    items = list_inputs(["images/", "big.zarr", "s3://bucket/cells.ome.zarr"])
    image = read_image_for_model(Path(items[0].path), in_channels=1)       # [C, H, W]
    volume = read_volume_for_model(Path("stack.tif"), in_channels=1)         # [C, Z, Y, X]

An input is an image file (.tif/.tiff/.png), a folder of them (and of Zarr stores), a Zarr array
or group, or an OME-Zarr image, locally or (Zarr only) at a URL. Each has a stem that names its
outputs; two inputs with one stem are refused, as their outputs would collide.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unetdist.data import remote
from unetdist.data.imageio import SUPPORTED_SUFFIXES, file_stem, read_array
from unetdist.inference.engine import InputError, as_chw, as_czyx
from unetdist.inference.zarr_sources import is_ngff_image, location_name

log = logging.getLogger("unetdist.predict")
ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup")  # v3, then v2 array and group


@dataclass(frozen=True)
class InputItem:
    stem: str
    path: str  # a local path or a URL
    is_zarr: bool
    is_ngff: bool = False  # an OME-Zarr image (a Zarr group with NGFF multiscales metadata)

    @property
    def shown(self) -> str:
        """The path or URL for messages (a URL without its query string)."""
        return remote.display(self.path)


def zarr_input(name: str, location: str) -> InputItem:
    """The Zarr store ``name`` at ``location``: an OME-Zarr image, or plain arrays."""
    if is_ngff_image(location):
        return InputItem(name.removesuffix(".zarr").removesuffix(".ome"), location, True, is_ngff=True)
    return InputItem(name.removesuffix(".zarr"), location, True)


def is_zarr_path(path: Path) -> bool:
    return path.suffix == ".zarr" or (
        path.is_dir() and any((path / marker).exists() for marker in ZARR_MARKERS)
    )


def remote_input(url: str) -> InputItem:
    """The Zarr store at ``url``; a missing one, or an image file at a URL, is an InputError."""
    name = location_name(url)
    if Path(name).suffix.lower() in SUPPORTED_SUFFIXES:
        raise InputError(
            f"{remote.display(url)}: image files at URLs are not read yet: copy it here first, "
            "or convert it to Zarr"
        )
    # one HEAD for a v3 store; a missing object, bucket or credential is named here, before any work
    if not any(remote.exists(remote.join(url, marker)) for marker in ZARR_MARKERS):
        what = "no such Zarr store" if name.endswith(".zarr") else "not a Zarr store"
        raise InputError(f"{remote.display(url)}: {what} (no {' or '.join(ZARR_MARKERS)} there)")
    return zarr_input(name, url)


def list_inputs(locations: list[str], ngff_in_place: bool = False) -> list[InputItem]:
    """Every image named by ``locations`` (files, folders of files, Zarr stores; Zarr stores at
    URLs), in order.

    A missing path or two images with one stem (their outputs would collide; not OME-Zarr images
    written ``ngff_in_place``, into their own labels/) is an InputError.
    """
    items: list[InputItem] = []
    for location in locations:
        if remote.is_remote(location):
            items.append(remote_input(location))
            continue
        path = Path(remote.local_path(location))
        if not path.exists():
            raise InputError(f"{path}: no such file or folder")
        if is_zarr_path(path):
            items.append(zarr_input(path.name, str(path)))
        elif path.is_dir():
            for child in sorted(path.iterdir()):
                if child.name.startswith("."):
                    continue
                if is_zarr_path(child):
                    items.append(zarr_input(child.name, str(child)))
                elif child.is_file() and child.suffix.lower() in SUPPORTED_SUFFIXES:
                    items.append(InputItem(file_stem(child), str(child), False))
                else:
                    log.warning(
                        "skipping %s: not one of %s or a Zarr store", child, ", ".join(SUPPORTED_SUFFIXES)
                    )
        else:
            items.append(InputItem(file_stem(path), str(path), False))
    seen: dict[str, InputItem] = {}
    for item in items:
        if item.is_ngff and ngff_in_place:
            continue
        if item.stem in seen:
            raise InputError(
                f"{seen[item.stem].shown} and {item.shown} have the same stem {item.stem!r}: "
                "outputs would collide"
            )
        seen[item.stem] = item
    if not items:
        raise InputError(f"no images found in {', '.join(remote.display(str(p)) for p in locations)}")
    return items


def read_image_for_model(path: Path, in_channels: int | None) -> np.ndarray:
    """``[C, H, W]`` from a TIFF/PNG: HxW, CxHxW or HxWxC (decided by the model's channel count)."""
    try:
        image = read_array(path)
    except ValueError as err:  # PrepareError names the file
        raise InputError(str(err)) from err
    if (
        image.ndim == 3
        and in_channels is not None
        and image.shape[0] != in_channels
        and image.shape[-1] == in_channels
    ):
        image = np.moveaxis(image, -1, 0)
    return as_chw(image, in_channels, str(path))


def read_volume_for_model(path: Path, in_channels: int | None) -> np.ndarray:
    """``[C, Z, Y, X]`` from a TIFF stack: ZxYxX, or ZxCxYxX (ImageJ's hyperstack order) or CxZxYxX
    (decided by the model's channel count; ZxCxYxX when both fit)."""
    try:
        volume = read_array(path)
    except ValueError as err:  # PrepareError names the file
        raise InputError(str(err)) from err
    if volume.ndim == 4 and in_channels is not None and volume.shape[1] == in_channels:
        volume = np.moveaxis(volume, 1, 0)
    return as_czyx(volume, in_channels, str(path))


def read_for_model(path: Path, model: object) -> np.ndarray:
    """A 3-D model's volume (:func:`read_volume_for_model`) or a 2-D model's image."""
    in_channels = getattr(model, "in_channels", None)
    if getattr(model, "spatial_dims", 2) == 3:
        return read_volume_for_model(path, in_channels)
    return read_image_for_model(path, in_channels)
