"""Where Zarr inputs come from: stores opened, arrays viewed channels first, names and errors.

    for stem, array in open_zarr_inputs("s3://bucket/big.zarr"):      # an array, or a group's arrays
        source = ChannelFirst(array, stem, in_channels=1, spatial_dims=3)   # [C, Z, Y, X], read lazily

A :class:`ChannelFirst` view reads only the box it is sliced with, so the block-wise prediction of
:mod:`unetdist.inference.zarr_io` never holds more of an image than a block's tiles need.
:class:`PlaneView` is one plane of an N-D (OME-Zarr) array.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from unetdist.data import remote
from unetdist.inference.engine import InputError

ERROR_LINE_CHARS = 300


def location_name(location: str | os.PathLike[str]) -> str:
    """The last part of a path or URL (``big.zarr`` for ``s3://bucket/data/big.zarr/``)."""
    text = str(location)
    if remote.is_remote(text):
        return PurePosixPath(urlsplit(text).path.rstrip("/")).name
    return Path(remote.local_path(text)).name


def one_line(err: BaseException) -> str:
    """An error's first line, shortened: obstore's errors append a debug dump and the response body
    (of which the S3 error code is kept: ``... 404 Not Found: NoSuchBucket``)."""
    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    if "<?xml" in first:
        code = re.search(r"<Code>([^<]*)</Code>", text)
        first = first.split("<?xml")[0].rstrip(": ") + (f": {code.group(1)}" if code else "")
    return first if len(first) <= ERROR_LINE_CHARS else first[: ERROR_LINE_CHARS - 3] + "..."


class ChannelFirst:
    """A ``[C, *spatial]`` read-only view of an array whose trailing ``spatial_dims`` axes are
    spatial, with at most one channel axis before them (Zarr or numpy): a 2-D model's ``[H, W]``
    or ``[C, H, W]``, a 3-D model's ``[Z, Y, X]`` or ``[C, Z, Y, X]``."""

    def __init__(self, array: Any, name: str, in_channels: int | None, spatial_dims: int = 2) -> None:
        if array.ndim == spatial_dims:
            self.shape = (1, *array.shape)
        elif array.ndim == spatial_dims + 1:
            self.shape = tuple(array.shape)
        else:
            raise InputError(f"{name}: {_dims_problem(tuple(array.shape), spatial_dims)}")
        dtype = np.dtype(array.dtype)
        if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating) or dtype.kind == "b"):
            raise InputError(f"{name}: dtype {dtype} is not a real number type")
        if in_channels is not None and self.shape[0] != in_channels:
            layout = "channels first" if spatial_dims == 2 else "channels first, then z, y, x"
            hint = " (a ZxYxX volume needs a 3-D model)" if spatial_dims == 2 and array.ndim == 3 else ""
            raise InputError(
                f"{name}: has {self.shape[0]} channel(s) (shape {tuple(array.shape)}, {layout}), "
                f"the model expects {in_channels}{hint}"
            )
        self.array, self.name, self.ndim, self.dtype = array, name, spatial_dims + 1, dtype

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        channels, *spatial = key
        if self.array.ndim == self.ndim - 1:
            return np.asarray(self.array[tuple(spatial)])[None][channels]
        return np.asarray(self.array[(channels, *spatial)])


def _dims_problem(shape: tuple[int, ...], spatial_dims: int) -> str:
    if spatial_dims == 3:
        hint = " (a 2-D image: predict it with a 2-D model)" if len(shape) == 2 else ""
        return f"a 3-D model takes a ZxYxX or channels-first CxZxYxX volume, got shape {shape}{hint}"
    hint = " (a volume: predict it with a 3-D model, model.spatial_dims 3)" if len(shape) == 4 else ""
    return f"expected a 2-D HxW or channels-first CxHxW array, got shape {shape}{hint}"


class PlaneView:
    """A ``[C, H, W]`` read-only view of one plane of an N-D array whose last axes are y, x: the
    axes in ``fixed`` (index -> position) held, ``channel_axis`` (None: one channel) kept."""

    ndim = 3

    def __init__(self, array: Any, fixed: dict[int, int], channel_axis: int | None) -> None:
        self.array, self.fixed, self.channel_axis = array, fixed, channel_axis
        channels = 1 if channel_axis is None else array.shape[channel_axis]
        self.shape = (channels, *array.shape[-2:])
        self.dtype = array.dtype

    def __getitem__(self, key: tuple[slice, slice, slice]) -> np.ndarray:
        channels, rows, cols = key
        index = [self.fixed.get(axis, slice(None)) for axis in range(self.array.ndim)]
        index[-2:] = [rows, cols]
        if self.channel_axis is None:
            return np.asarray(self.array[tuple(index)])[None][channels]
        index[self.channel_axis] = channels
        return np.asarray(self.array[tuple(index)])


def is_ngff_image(location: str) -> bool:
    """Whether the Zarr group at ``location`` carries NGFF ``multiscales`` metadata (0.5: in
    ``zarr.json``'s ``attributes.ome``; 0.4: in ``.zattrs``): one or two small reads."""
    v3 = _read_json(location, "zarr.json")
    if v3 is not None:
        return v3.get("node_type") == "group" and "multiscales" in v3.get("attributes", {}).get("ome", {})
    return "multiscales" in (_read_json(location, ".zattrs") or {})


def _read_json(location: str, key: str) -> dict | None:
    url = remote.join(location, key)
    try:
        if not remote.is_remote(url) and not Path(url).is_file():
            return None
        document = json.loads(remote.read_bytes(url))
    except remote.RemoteError as err:
        if ": 404" in str(err):
            return None
        raise
    except ValueError:  # not JSON: not metadata we can read
        return None
    return document if isinstance(document, dict) else None


def open_zarr_inputs(location: str | os.PathLike[str]) -> list[tuple[str, Any]]:
    """``(stem, array)`` for a Zarr array, or for every array directly inside a Zarr group, at a
    local path or a URL."""
    import zarr

    location = str(location)
    try:
        node = zarr.open(store=remote.zarr_store(location), mode="r")
    except Exception as err:  # zarr and obstore raise several types for a missing/corrupt store
        raise InputError(f"{remote.display(location)}: cannot open as Zarr: {one_line(err)}") from err
    stem = location_name(location).removesuffix(".zarr")
    if isinstance(node, zarr.Array):
        return [(stem, node)]
    arrays = sorted(node.arrays(), key=lambda item: item[0])
    if not arrays:
        raise InputError(f"{remote.display(location)}: a Zarr group without arrays")
    return [(f"{stem}_{name}", array) for name, array in arrays]


