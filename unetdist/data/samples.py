"""One stored sample: decoding its fields with the dtype kept, and checking it against the model.

Shared by the tar and Zarr sources. Every problem is a :class:`DataError` whose message
names the store (shard file / Zarr store), the sample key and what was wrong, so
``data.on_error=skip`` can log it and ``raise`` can stop the run with it.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from unetdist.data.imageio import is_channels_last
from unetdist.data.layout import IMAGE_DTYPES

IMAGE_SUFFIXES = ("npy", "png", "tif", "tiff")
NPY_MAGIC = b"\x93NUMPY"


class DataError(ValueError):
    """A sample that cannot be used; the message names store, key and problem."""


MASK_KINDS = ("classes", "instances", "binary")
# auto: what the data set says (resolved by open_source and the loader, from a prepared data
# set's dataset.json); a source opened without them reads its masks as classes.
AUTO = "auto"
TARGETS = ("semantic", "boundary")  # loss.target
# Border weight maps computed in the workers from instance masks: the prepare defaults (the paper's).
COMPUTED_W0, COMPUTED_SIGMA = 10.0, 5.0


@dataclass(frozen=True)
class SampleChecks:
    """What a decoded sample must look like for the model it feeds, and how to read its mask.

    ``use_weight_map`` (``loss.use_weight_map``): "auto" takes a stored weight map, else computes
    one from an instance mask, else trains without; "true" requires a stored or computed one;
    "false" drops it. ``keys`` name the image, mask and weight members (``data.image_key`` ...).
    ``mask_kind`` (``data.mask_kind``): "auto" reads masks as classes unless resolved first (see
    :data:`AUTO`). ``target`` (``loss.target``): "semantic" trains the mask's classes (instance
    ids: foreground 1); "boundary" the background / interior / boundary classes of instance ids
    (:func:`unetdist.instance_targets.boundary_classes`, a rim of ``boundary_width_px``).
    """

    tile_size: int
    in_channels: int
    num_classes: int
    use_weight_map: str | bool
    mask_kind: str = AUTO
    keys: tuple[str, str, str] = ("image", "mask", "weight")
    target: str = "semantic"
    boundary_width_px: int = 2
    spatial_dims: int = 2  # 3: volumes, image [C, Z, Y, X] (model.spatial_dims)
    tile_depth: int = 0  # 3-D tiles' z extent (data.tile_depth); 0: tile_size
    ignore_index: int = -1  # a mask value trained and scored nowhere (data.ignore_index); -1: none

    @property
    def tile_shape(self) -> tuple[int, ...]:
        """The model's input tile per spatial axis."""
        size = self.tile_size
        return (self.tile_depth or size, size, size) if self.spatial_dims == 3 else (size, size)

    def __post_init__(self) -> None:
        if isinstance(self.use_weight_map, bool):  # callers of before "auto" existed
            object.__setattr__(self, "use_weight_map", "true" if self.use_weight_map else "false")
        known = self.mask_kind in (*MASK_KINDS, AUTO) and self.target in TARGETS
        if self.use_weight_map not in ("auto", "true", "false") or not known:
            settings = f"mask_kind={self.mask_kind!r}, target={self.target!r}"
            raise ValueError(f"use_weight_map={self.use_weight_map!r}, {settings}: unknown")
        if self.target == "boundary" and self.mask_kind not in ("instances", AUTO):
            raise ValueError(f"target=boundary needs instance ids, not mask_kind={self.mask_kind!r}")


@dataclass
class Sample:
    """A checked sample: image [C,H,W] in its stored dtype, mask [H,W] integer (the training
    target), weight [H,W] or None, and the instance ids [H,W] the mask came from (instance
    masks only; validation batches carry them). A volume's: [C,Z,Y,X] and [Z,Y,X]."""

    key: str
    where: str  # shard file or store, for messages
    image: np.ndarray
    mask: np.ndarray
    weight: np.ndarray | None
    weight_computed: bool = False  # computed from an instance mask, not stored (the start-up log says which)
    instances: np.ndarray | None = None


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


def member_names(stem: str) -> tuple[str, ...]:
    """The member names ``stem`` (``data.image_key`` ...) matches: itself when it ends in a known
    suffix (``seg.png``, ``png``), and ``stem.npy|png|tif|tiff``."""
    own = (stem,) if stem.rsplit(".", 1)[-1].lower() in IMAGE_SUFFIXES else ()
    return own + tuple(f"{stem}.{suffix}" for suffix in IMAGE_SUFFIXES)


def _field(fields: dict[str, memoryview], stem: str, where: str, key: str) -> np.ndarray | None:
    for name in member_names(stem):
        if name in fields:
            try:
                return decode_field(name, fields[name])
            except Exception as err:  # any decoder failure is bad data, named below
                raise DataError(f"{where} sample {key}: cannot decode {name}: {err}") from err
    return None


def decode_sample(
    fields: dict[str, memoryview], key: str, where: str, keys: tuple[str, str, str] = ("image", "mask", "weight")
) -> tuple:
    """(image, mask, weight-or-None) decoded from a sample's raw tar members named by ``keys``."""
    image_key, mask_key, weight_key = keys
    image = _field(fields, image_key, where, key)
    mask = _field(fields, mask_key, where, key)
    weight = _field(fields, weight_key, where, key)
    missing = [stem for stem, value in ((image_key, image), (mask_key, mask)) if value is None]
    if missing:
        raise DataError(
            f"{where} sample {key}: no member for {missing} (data.image_key={image_key}, "
            f"data.mask_key={mask_key}, each with .npy/.png/.tif/.tiff or its own suffix); it has "
            f"{sorted(fields)}: set data.image_key and data.mask_key to those names"
        )
    if image.ndim == 2:  # single-channel PNG/TIFF
        image = image[None]
    elif is_channels_last(image.shape):  # an RGB(A) picture, as predict reads it
        image = np.ascontiguousarray(image.transpose(2, 0, 1))
    return image, mask, weight


def check_sample(
    key: str,
    where: str,
    image: np.ndarray,
    mask: np.ndarray,
    weight: np.ndarray | None,
    checks: SampleChecks,
    weights_of: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Sample:
    """A :class:`Sample` after checking shapes, dtypes and labels; :class:`DataError` otherwise.
    ``weights_of`` makes the weight map of an instance mask (default: computed here; a source may
    cache them: :mod:`unetdist.data.weight_cache`)."""
    at = f"{where} sample {key}"
    dims, axes = checks.spatial_dims, "Z, Y, X" if checks.spatial_dims == 3 else "H, W"
    if image.ndim != dims + 1 or image.shape[0] != checks.in_channels:
        raise DataError(f"{at}: image shape {image.shape}, expected [{checks.in_channels}, {axes}] (model.in_channels"
                        f"{', model.spatial_dims=3' if dims == 3 else ''})")
    if image.dtype not in IMAGE_DTYPES:
        raise DataError(f"{at}: image dtype {image.dtype}, expected one of {', '.join(map(str, IMAGE_DTYPES))}")
    if mask.ndim != dims or not np.issubdtype(mask.dtype, np.integer):
        raise DataError(f"{at}: mask must be an integer {axes.replace(', ', 'x')} array, got {mask.dtype} {mask.shape}")
    if image.shape[1:] != mask.shape:
        raise DataError(f"{at}: image size {image.shape[1:]} differs from mask size {mask.shape}")
    ignored = mask == checks.ignore_index if checks.ignore_index >= 0 else None  # sparse annotation
    if checks.mask_kind in ("classes", AUTO):
        _check_class_ids(at, mask if ignored is None else np.where(ignored, 0, mask), checks.num_classes)
    instances = mask if checks.mask_kind == "instances" else None
    if instances is not None and ignored is not None:
        raise DataError(f"{at}: data.ignore_index={checks.ignore_index} needs class or binary masks, not instance ids")
    if instances is not None and checks.target == "boundary":
        from unetdist.instance_targets import boundary_classes

        mask = boundary_classes(instances, checks.boundary_width_px)
    elif checks.mask_kind in ("instances", "binary"):  # instance ids or any non-zero: foreground 1
        mask = (mask != 0).astype(np.uint8)
        if ignored is not None:
            mask[ignored] = checks.ignore_index
    if any(length < size for length, size in zip(mask.shape, checks.tile_shape, strict=True)):
        tile = f"data.tile_size={checks.tile_size}" if dims == 2 else (
            f"the tile {'x'.join(map(str, checks.tile_shape))} (data.tile_depth, data.tile_size)")
        raise DataError(f"{at}: tile {mask.shape} is smaller than {tile}")
    if checks.use_weight_map == "false":
        weight = None
    elif weight is not None:
        if weight.shape != mask.shape or not np.issubdtype(weight.dtype, np.floating):
            raise DataError(
                f"{at}: weight must be a float array of the mask's shape {mask.shape}, "
                f"got {weight.dtype} {weight.shape}"
            )
    elif instances is not None:
        weight = (weights_of or computed_weight_map)(instances)
        return Sample(key, where, image, mask, weight, weight_computed=True, instances=instances)
    elif checks.use_weight_map == "true":
        raise DataError(
            f"{at}: missing its weight map (loss.use_weight_map=true): store one (prepare with instance masks), "
            "set data.mask_kind=instances if the masks hold instance ids, or set loss.use_weight_map=auto"
        )
    return Sample(key, where, image, mask, weight, instances=instances)


def computed_weight_map(instances: np.ndarray) -> np.ndarray:
    """The paper's border weight map of an instance mask, as prepare stores it (float32)."""
    from unetdist.weight_map import border_weight_map

    # a volume's: each z slice's own map (the exact 3-D map costs ~3x: unetdist.weight_map)
    return border_weight_map(instances, w0=COMPUTED_W0, sigma=COMPUTED_SIGMA,
                             spatial_dims=instances.ndim).astype(np.float32)


def _check_class_ids(at: str, mask: np.ndarray, num_classes: int) -> None:
    low, high = 0 if mask.dtype.kind == "u" else int(mask.min()), int(mask.max())
    if 0 <= low and high < num_classes:
        return
    bad = high if high >= num_classes else low
    if high == 255 and set(np.unique(mask).tolist()) <= {0, 255}:  # more classes would be the wrong fix
        raise DataError(f"{at}: mask labels 0/255; binary masks are 0/1 here: set data.mask_kind=binary")
    raise DataError(
        f"{at}: mask label {bad} out of range for num_classes={num_classes} (model.num_classes); "
        "if the mask holds instance ids, set data.mask_kind=instances"
    )
