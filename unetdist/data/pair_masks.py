"""One image/mask pair as prepare stores it: checked, its mask as stored, its border weight map.

:func:`check_pair` holds a pair read by :mod:`unetdist.data.inputs` to what prepare can tile
(one :class:`~unetdist.data.imageio.PrepareError` line naming the file otherwise);
:func:`stored_mask` turns the whole label image into the stored mask and weight map, before
:mod:`unetdist.data.prepare` crops and tiles them::

    image, labels = check_pair(pair, "instances", tile_size=96)
    mask, weight = stored_mask(labels, "instances", weight_map=(10.0, 5.0))   # uint16 ids, float32

Instance ids are stored as ids (uint16, or uint32 past 65,535 cells in an image), not as 0/1:
validation matches instances with them and the loader derives its targets from them.
"""

from __future__ import annotations

import numpy as np

from unetdist.data.imageio import PrepareError, image_to_chw
from unetdist.data.inputs import Pair
from unetdist.data.layout import IMAGE_DTYPES

UINT16_IDS = np.iinfo(np.uint16).max  # more cells in one image: renumbered, and uint32 past this


def check_labels(mask: np.ndarray, mask_kind: str, where: str) -> None:
    """:class:`PrepareError` naming ``where`` unless ``mask`` holds labels of ``mask_kind`` (an image's or a volume's)."""
    if not np.issubdtype(mask.dtype, np.integer):
        raise PrepareError(f"{where}: mask must hold integer labels, got dtype {mask.dtype}")
    if mask.size and mask.min() < 0:
        raise PrepareError(f"{where}: negative label {mask.min()}; labels are 0 (background) and up")
    if mask_kind == "classes" and mask.size and mask.max() > 255:
        raise PrepareError(f"{where}: class id {mask.max()} does not fit the uint8 class mask")
    if mask_kind == "classes" and mask.size and mask.max() == 255 and set(np.unique(mask).tolist()) <= {0, 255}:
        raise PrepareError(
            f"{where}: labels 0/255, a binary mask: as class ids they would make 256 classes; "
            "binary masks are 0/1, and --mask-kind binary maps 255 -> 1"
        )


def check_pair(pair: Pair, mask_kind: str, tile_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Check one image/mask pair; returns (image [C,H,W], mask [H,W])."""
    mask, mask_path, image_path = pair.mask, pair.mask_where, pair.image_where
    if mask.dtype == bool:  # a boolean .npy mask: 0/1
        mask = mask.astype(np.uint8)
    if mask.ndim != 2:
        raise PrepareError(
            f"{mask_path}: mask must be a single-channel HxW label image, got shape {mask.shape}"
        )
    check_labels(mask, mask_kind, str(mask_path))

    raw = pair.image
    if raw.ndim == 2 and raw.shape != mask.shape:
        raise PrepareError(
            f"{image_path}: image size {raw.shape} differs from mask {pair.mask_name} size {mask.shape}"
        )
    image = image_to_chw(raw, mask.shape, image_path, pair.image_axes)
    if image.dtype not in IMAGE_DTYPES:
        raise PrepareError(
            f"{image_path}: image dtype {image.dtype} not supported; convert to one of "
            f"{', '.join(str(d) for d in IMAGE_DTYPES)}"
        )
    if min(mask.shape) < tile_size:
        raise PrepareError(f"{image_path}: image size {mask.shape} is smaller than the tile size {tile_size}")
    return image, mask


def stored_instance_ids(labels: np.ndarray) -> np.ndarray:
    """Instance ids as stored: uint16 as given where they fit; else renumbered 1..K in their
    order (0 stays background), uint16 if K fits, uint32 if not (ids near 1e9, as some tools
    write them, are numbers, not cells)."""
    if labels.size == 0 or int(labels.max()) <= UINT16_IDS:
        return labels.astype(np.uint16, copy=False)
    ids, inverse = np.unique(labels, return_inverse=True)
    renumbered = inverse.reshape(labels.shape) + (0 if ids[0] == 0 else 1)
    return renumbered.astype(np.uint16 if renumbered.max() <= UINT16_IDS else np.uint32)


def stored_mask(
    labels: np.ndarray, mask_kind: str, weight_map: tuple[float, float] | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """The stored mask of a whole label image (uint8 classes or 0/1, or instance ids:
    :func:`stored_instance_ids`), and, for instance ids with ``weight_map`` (w0, sigma), its
    border weight map (else None)."""
    if mask_kind == "binary":
        return (labels > 0).astype(np.uint8), None
    if mask_kind == "classes":
        return labels.astype(np.uint8), None
    ids = stored_instance_ids(labels)
    weight = None
    if weight_map is not None:
        from unetdist.weight_map import border_weight_map

        w0, sigma = weight_map
        # On the whole image: a cell just outside a tile (or a region) still shapes its border weights.
        weight = border_weight_map(ids, w0=w0, sigma=sigma).astype(np.float32)
    return ids, weight
