"""The U-Net paper's border weight map, computed once per training image on the CPU.

Plain numpy/scipy: data preparation (``prepare``) calls it on whole images, so tiles
cut from an image carry the weights of their true neighbourhood; the losses only read
the stored map.

Usage::

    weight = border_weight_map(instances)                 # HxW float32, per image
    weight = border_weight_map(instances, w0=10, sigma=5, class_weights=np.array([1.0, 3.0]))
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

# The windowed border term may differ from the exact one by at most this fraction of w0.
BORDER_TERM_TOLERANCE = 1e-6


def class_balance_weights(class_mask: np.ndarray, num_classes: int) -> np.ndarray:
    """Inverse-frequency class weights, normalised to 1 for the most frequent class.

    ``w_c = max_count / count_c`` for every class present in ``class_mask``, so the
    dominant class (usually background) keeps weight 1 and ``w0`` of the border term
    stays in the paper's units. Classes absent from the mask get the neutral weight 1:
    no pixel carries them here, and a neutral value is harmless if the vector is reused.

    Returns a float64 vector of length ``num_classes``.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if class_mask.size == 0:
        raise ValueError("class_mask is empty")
    if not np.issubdtype(class_mask.dtype, np.integer) and class_mask.dtype != np.bool_:
        raise ValueError(f"class_mask must hold integer class ids, got dtype {class_mask.dtype}")
    flat = class_mask.reshape(-1).astype(np.int64)
    if flat.min() < 0 or flat.max() >= num_classes:
        raise ValueError(
            f"class_mask ids must lie in [0, {num_classes}), got range [{flat.min()}, {flat.max()}]"
        )
    counts = np.bincount(flat, minlength=num_classes).astype(np.float64)
    weights = np.ones(num_classes, dtype=np.float64)
    present = counts > 0
    weights[present] = counts.max() / counts[present]
    return weights


def _check_instances(instances: np.ndarray) -> None:
    if instances.ndim != 2:
        raise ValueError(f"instances must be a 2-D HxW label image, got shape {instances.shape}")
    if not np.issubdtype(instances.dtype, np.integer):
        raise ValueError(f"instances must hold integer instance ids, got dtype {instances.dtype}")
    if instances.size == 0:
        raise ValueError("instances is empty")
    if instances.min() < 0:
        raise ValueError("instances must be >= 0 (0 = background, 1..K = cells)")


def sequential_ids(instances: np.ndarray) -> np.ndarray:
    """``instances`` with its cell ids renumbered 1..K in their original order (0 stays 0).

    Some tools write uint32 instance masks with ids near 1e9 (hashes, running counters);
    anything sized by the largest id (``ndimage.find_objects``, a ``bincount``) would need
    billions of slots. Masks whose ids are at most the pixel count come back unchanged:
    sizing by them costs no more than the image, and the weight map never depends on the
    numbering, only on which pixels share an id.
    """
    if instances.size == 0 or int(instances.max()) <= instances.size:
        return instances
    ids, inverse = np.unique(instances, return_inverse=True)
    return inverse.reshape(instances.shape) + (0 if ids[0] == 0 else 1)


def _class_term(
    instances: np.ndarray, class_weights: np.ndarray | None, class_mask: np.ndarray | None
) -> np.ndarray:
    """w_c(x): the per-pixel class-balancing weight, float64 HxW."""
    if class_mask is None:
        class_mask = (instances > 0).astype(np.int64)
    elif class_mask.shape != instances.shape:
        raise ValueError(f"class_mask shape {class_mask.shape} != instances shape {instances.shape}")
    class_mask = class_mask.astype(np.int64)
    if class_weights is None:
        num_classes = max(int(class_mask.max()) + 1, 2)
        class_weights = class_balance_weights(class_mask, num_classes)
    else:
        class_weights = np.asarray(class_weights, dtype=np.float64).reshape(-1)
        if class_mask.min() < 0 or class_mask.max() >= class_weights.size:
            raise ValueError(
                f"class_mask ids span [{class_mask.min()}, {class_mask.max()}] but only "
                f"{class_weights.size} class_weights were given"
            )
    return class_weights[class_mask]


def _check_border_params(w0: float, sigma: float) -> None:
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if w0 < 0:
        raise ValueError(f"w0 must be >= 0, got {w0}")


def border_weight_map(
    instances: np.ndarray,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weights: np.ndarray | None = None,
    class_mask: np.ndarray | None = None,
) -> np.ndarray:
    """The U-Net paper's weight map ``w = w_c + w0 * exp(-(d1 + d2)^2 / (2 sigma^2))``.

    ``instances`` is an HxW integer label image (0 = background, 1..K = cells; ids may
    have gaps, and be as large as the dtype allows: :func:`sequential_ids`). ``d1``/``d2``
    are the Euclidean distances to the nearest and second nearest cell. As in the paper, the
    border term is added on background pixels only and is 0 when the image has fewer than
    two cells.

    ``w_c`` balances class frequencies over ``class_mask`` (default ``instances > 0``)
    with :func:`class_balance_weights` (``max_count / count_c``: 1 for the most
    frequent class); ``class_weights`` replaces that vector, indexed by class id.

    Distances are computed only in a window around each cell, widened by the margin
    beyond which the border term is below ``BORDER_TERM_TOLERANCE * w0``; the result
    matches :func:`border_weight_map_reference` within that tolerance.

    Returns float32 HxW.
    """
    _check_instances(instances)
    _check_border_params(w0, sigma)
    instances = sequential_ids(instances)
    weight = _class_term(instances, class_weights, class_mask)

    cell_slices = ndimage.find_objects(instances)
    cells = [(label, box) for label, box in enumerate(cell_slices, start=1) if box is not None]
    if len(cells) < 2 or w0 == 0:
        return weight.astype(np.float32)

    # A cell more than `margin` from a pixel can only be among its two nearest when
    # d1 + d2 > margin, where the term is already below the tolerance.
    margin = math.ceil(sigma * math.sqrt(2.0 * math.log(1.0 / BORDER_TERM_TOLERANCE))) + 1
    height, width = instances.shape
    nearest = np.full(instances.shape, np.inf)
    second = np.full(instances.shape, np.inf)
    for label, (rows, cols) in cells:
        window = (
            slice(max(rows.start - margin, 0), min(rows.stop + margin, height)),
            slice(max(cols.start - margin, 0), min(cols.stop + margin, width)),
        )
        # The whole cell lies inside its window, so the windowed EDT is exact there.
        distance = ndimage.distance_transform_edt(instances[window] != label)
        nearest_view = nearest[window]
        second_view = second[window]
        second_view[...] = np.where(distance < nearest_view, nearest_view, np.minimum(second_view, distance))
        np.minimum(nearest_view, distance, out=nearest_view)

    border = w0 * np.exp(-((nearest + second) ** 2) / (2.0 * sigma**2))
    weight += np.where(instances == 0, border, 0.0)
    return weight.astype(np.float32)


def border_weight_map_reference(
    instances: np.ndarray,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weights: np.ndarray | None = None,
    class_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Slow, brute-force :func:`border_weight_map` for tests: no EDT, no windows.

    For every pixel, the distance to each cell is the minimum over all that cell's
    pixel coordinates; the two smallest are taken by sorting. Memory and time grow
    with (pixels x cell pixels), so keep images small.
    """
    _check_instances(instances)
    _check_border_params(w0, sigma)
    weight = _class_term(instances, class_weights, class_mask)

    labels = [label for label in np.unique(instances) if label != 0]
    if len(labels) < 2:
        return weight.astype(np.float32)
    pixel_coords = np.indices(instances.shape).reshape(2, -1).T.astype(np.float64)
    per_cell = []
    for label in labels:
        cell_coords = np.argwhere(instances == label).astype(np.float64)
        offsets = pixel_coords[:, None, :] - cell_coords[None, :, :]
        per_cell.append(np.sqrt((offsets**2).sum(axis=-1)).min(axis=1))
    distances = np.sort(np.stack(per_cell), axis=0)
    d1_plus_d2 = (distances[0] + distances[1]).reshape(instances.shape)
    border = w0 * np.exp(-(d1_plus_d2**2) / (2.0 * sigma**2))
    weight += np.where(instances == 0, border, 0.0)
    return weight.astype(np.float32)
