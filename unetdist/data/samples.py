"""One stored sample: decoding its fields with the dtype kept, and checking it against the model.

Shared by the tar and Zarr sources. Every problem is a :class:`DataError` whose message
names the store (shard file / Zarr store), the sample key and what was wrong, so
``data.on_error=skip`` can log it and ``raise`` can stop the run with it.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass

import numpy as np

from unetdist.data.imageio import is_channels_last
from unetdist.data.layout import IMAGE_DTYPES

IMAGE_SUFFIXES = ("npy", "png", "tif", "tiff")
NPY_MAGIC = b"\x93NUMPY"


class DataError(ValueError):
    """A sample that cannot be used; the message names store, key and problem."""


@dataclass(frozen=True)
class SampleChecks:
    """What a decoded sample must look like for the model it feeds."""

    tile_size: int
    in_channels: int
    num_classes: int
    use_weight_map: bool


@dataclass
class Sample:
    """A checked sample: image [C,H,W] in its stored dtype, mask [H,W] integer, weight [H,W] or None."""

    key: str
    where: str  # shard file or store, for messages
    image: np.ndarray
    mask: np.ndarray
    weight: np.ndarray | None


def load_npy(data: bytes | memoryview) -> np.ndarray:
    """An ``.npy`` file's bytes as a read-only array viewing them (no copy, no pickles).

    Tiles of a data set share a few headers, so each distinct header is parsed once.
    """
    view = memoryview(data)
    if bytes(view[:6]) != NPY_MAGIC or len(view) < 10:
        raise ValueError("not an .npy file")
    length_bytes = 2 if view[6] == 1 else 4  # format version 1.0: 2-byte header length; 2.0, 3.0: 4
    header_end = 8 + length_bytes + int.from_bytes(view[8 : 8 + length_bytes], "little")
    layout = _npy_header(bytes(view[:header_end]))
    if layout is None:  # a rarer format version: numpy's own reader (copies)
        return np.load(io.BytesIO(view), allow_pickle=False)
    dtype, shape, fortran_order = layout
    array = np.frombuffer(view, dtype=dtype, count=math.prod(shape), offset=header_end)
    return array.reshape(shape, order="F" if fortran_order else "C")


@functools.lru_cache(maxsize=64)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool] | None:
    stream = io.BytesIO(header)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    reader = read_header.get(np.lib.format.read_magic(stream))
    if reader is None:
        return None
    shape, fortran_order, dtype = reader(stream)
    if dtype.hasobject:
        raise ValueError("object arrays are not allowed")
    return dtype, shape, fortran_order


def decode_field(name: str, data: bytes | memoryview) -> np.ndarray:
    """Bytes of one tar member (``image.npy``, ``mask.png``, ``image.tif`` ...) as an array, dtype kept.

    PNG goes through PIL, which keeps 16-bit PNGs as uint16 (webdataset's image decoders
    would turn them into 8-bit).
    """
    suffix = name.rsplit(".", 1)[-1].lower()
    if suffix == "npy":
        return load_npy(data)
    if suffix == "png":
        from PIL import Image

        with Image.open(io.BytesIO(data)) as picture:
            picture.load()
            array = np.asarray(picture)
        return array.astype(np.uint16) if array.dtype == np.int32 and picture.mode.startswith("I") else array
    if suffix in ("tif", "tiff"):
        import tifffile

        return tifffile.imread(io.BytesIO(data))
    raise ValueError(f"no decoder for .{suffix}")


def _field(fields: dict[str, memoryview], stem: str, where: str, key: str) -> np.ndarray | None:
    for suffix in IMAGE_SUFFIXES:
        name = f"{stem}.{suffix}"
        if name in fields:
            try:
                return decode_field(name, fields[name])
            except Exception as err:  # any decoder failure is bad data, named below
                raise DataError(f"{where} sample {key}: cannot decode {name}: {err}") from err
    return None


def decode_sample(fields: dict[str, memoryview], key: str, where: str) -> tuple:
    """(image, mask, weight-or-None) decoded from a sample's raw tar members."""
    image = _field(fields, "image", where, key)
    mask = _field(fields, "mask", where, key)
    weight = _field(fields, "weight", where, key)
    missing = [name for name, value in (("image", image), ("mask", mask)) if value is None]
    if missing:
        raise DataError(f"{where} sample {key}: missing {missing}; it has {sorted(fields)}")
    if image.ndim == 2:  # single-channel PNG/TIFF
        image = image[None]
    elif is_channels_last(image.shape):  # an RGB(A) picture, as predict reads it
        image = np.ascontiguousarray(image.transpose(2, 0, 1))
    return image, mask, weight


def check_sample(
    key: str, where: str, image: np.ndarray, mask: np.ndarray, weight: np.ndarray | None, checks: SampleChecks
) -> Sample:
    """A :class:`Sample` after checking shapes, dtypes and labels; :class:`DataError` otherwise."""
    at = f"{where} sample {key}"
    if image.ndim != 3 or image.shape[0] != checks.in_channels:
        raise DataError(f"{at}: image shape {image.shape}, expected [{checks.in_channels}, H, W] (model.in_channels)")
    if image.dtype not in IMAGE_DTYPES:
        raise DataError(f"{at}: image dtype {image.dtype}, expected one of {', '.join(map(str, IMAGE_DTYPES))}")
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise DataError(f"{at}: mask must be an integer HxW array, got {mask.dtype} {mask.shape}")
    if image.shape[1:] != mask.shape:
        raise DataError(f"{at}: image size {image.shape[1:]} differs from mask size {mask.shape}")
    low, high = 0 if mask.dtype.kind == "u" else int(mask.min()), int(mask.max())
    if low < 0 or high >= checks.num_classes:
        bad = high if high >= checks.num_classes else low
        if high == 255 and set(np.unique(mask).tolist()) <= {0, 255}:
            # a 0/255 binary mask: more classes would be the wrong fix
            raise DataError(
                f"{at}: mask labels 0/255; binary masks are 0/1 here: prepare the masks with "
                "--mask-kind binary, which maps 255 -> 1"
            )
        raise DataError(f"{at}: mask label {bad} out of range for num_classes={checks.num_classes} (model.num_classes)")
    if min(mask.shape) < checks.tile_size:
        raise DataError(f"{at}: tile {mask.shape} is smaller than data.tile_size={checks.tile_size}")
    if not checks.use_weight_map:
        weight = None
    elif weight is None:
        raise DataError(
            f"{at}: missing its weight map (prepare with instance masks and without --no-weight-map, "
            "or set loss.use_weight_map=false)"
        )
    elif weight.shape != mask.shape or not np.issubdtype(weight.dtype, np.floating):
        raise DataError(f"{at}: weight must be a float array of the mask's shape {mask.shape}, got {weight.dtype} {weight.shape}")
    return Sample(key, where, image, mask, weight)
