"""Training losses for U-Net segmentation: border weight maps, weighted pixel-wise CE, soft Dice.

The weight map is computed once per training image on the CPU (data preparation or
the loader), so it is plain numpy; the losses run on the device in the hot path and
never synchronise with the host.

Usage::

    weight = border_weight_map(instances)                 # HxW float32, per image
    criterion = SegmentationLoss(kind="dice_ce", num_classes=2)
    loss = criterion(logits, target, weight)              # target/weight may be larger than logits
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from unetdist.geometry import center_crop

# The windowed border term may differ from the exact one by at most this fraction of w0.
BORDER_TERM_TOLERANCE = 1e-6

LOSS_KINDS = ("ce", "dice_ce")


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
    have gaps). ``d1``/``d2`` are the Euclidean distances to the nearest and second
    nearest cell. As in the paper, the border term is added on background pixels only
    and is 0 when the image has fewer than two cells.

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


def crop_to_logits(logits: torch.Tensor, per_pixel: torch.Tensor, name: str = "target") -> torch.Tensor:
    """Center-crop an [N,H,W] per-pixel tensor to the [N,C,h,w] logits' spatial size.

    Valid-convolution models output less than their input, so targets and weight
    maps arrive larger and are cropped; anything smaller, or a different batch size,
    is a wiring error. Only shapes are inspected, so this never synchronises.
    """
    if logits.ndim != 4:
        raise ValueError(f"logits must be [N, C, h, w], got shape {tuple(logits.shape)}")
    if per_pixel.ndim != 3:
        raise ValueError(f"{name} must be [N, H, W], got shape {tuple(per_pixel.shape)}")
    batch, _, height, width = logits.shape
    if per_pixel.shape[0] != batch or per_pixel.shape[1] < height or per_pixel.shape[2] < width:
        raise ValueError(
            f"{name} shape {tuple(per_pixel.shape)} does not fit logits shape {tuple(logits.shape)}: "
            f"expected [{batch}, H>={height}, W>={width}]"
        )
    return center_crop(per_pixel, (height, width))


def pixel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Pixel-wise softmax cross entropy, weighted per pixel, ``sum(w * ce) / num_pixels``.

    ``logits`` [N,C,h,w]; ``target`` [N,H,W] class ids; ``weight`` [N,H,W] or None.
    Larger targets/weights are center-cropped to the logits. The paper's energy is a
    weighted sum; dividing by the pixel count keeps the learning rate independent of
    tile and batch size. Computed in float32 so it is safe under bf16/fp16 autocast.
    Labels are not range-checked here (that would synchronise); the data loader does it.
    """
    target = crop_to_logits(logits, target, "target")
    per_pixel = F.cross_entropy(logits.float(), target.long(), reduction="none")
    if weight is not None:
        per_pixel = per_pixel * crop_to_logits(logits, weight, "weight").float()
    return per_pixel.mean()


def soft_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    eps: float = 1e-5,
    ignore_background: bool = False,
) -> torch.Tensor:
    """``1 - mean_c dice_c`` with softmax probabilities against one-hot targets.

    Each class's Dice is computed over the whole batch (all images and pixels pooled),
    then averaged over classes (over 1..C-1 with ``ignore_background``). ``eps``
    smooths both numerator and denominator, so a class absent from truth and
    prediction scores 1 rather than NaN.
    """
    if logits.ndim == 4 and logits.shape[1] != num_classes:
        raise ValueError(f"logits have {logits.shape[1]} channels, expected num_classes={num_classes}")
    if ignore_background and num_classes < 2:
        raise ValueError("ignore_background needs num_classes >= 2")
    target = crop_to_logits(logits, target, "target")
    probabilities = torch.softmax(logits.float(), dim=1)
    one_hot = torch.zeros_like(probabilities).scatter_(1, target.long().unsqueeze(1), 1.0)
    reduce_dims = (0, 2, 3)
    intersection = (probabilities * one_hot).sum(reduce_dims)
    total = probabilities.sum(reduce_dims) + one_hot.sum(reduce_dims)
    dice_per_class = (2.0 * intersection + eps) / (total + eps)
    if ignore_background:
        dice_per_class = dice_per_class[1:]
    return 1.0 - dice_per_class.mean()


class SegmentationLoss(nn.Module):
    """The training criterion: weighted pixel CE (``"ce"``), optionally plus soft Dice (``"dice_ce"``).

    ``forward(logits, target, weight=None)``; ``weight`` is the per-pixel map from
    :func:`border_weight_map` (or None for plain CE). Dice ignores the weight map.
    """

    def __init__(self, kind: str = "ce", num_classes: int = 2, dice_weight: float = 1.0) -> None:
        super().__init__()
        if kind not in LOSS_KINDS:
            raise ValueError(f"unknown loss kind {kind!r}; expected one of {', '.join(LOSS_KINDS)}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.kind = kind
        self.num_classes = num_classes
        self.dice_weight = dice_weight

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        if logits.ndim == 4 and logits.shape[1] != self.num_classes:
            raise ValueError(
                f"logits have {logits.shape[1]} channels, expected num_classes={self.num_classes}"
            )
        loss = pixel_cross_entropy(logits, target, weight)
        if self.kind == "dice_ce":
            loss = loss + self.dice_weight * soft_dice_loss(logits, target, self.num_classes)
        return loss

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, num_classes={self.num_classes}, dice_weight={self.dice_weight}"
