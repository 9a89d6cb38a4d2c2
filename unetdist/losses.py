"""Training losses for U-Net segmentation: weighted pixel-wise CE and soft Dice.

The per-pixel weights (the paper's border weight map, :mod:`unetdist.weight_map`) are
computed once per image when the data is prepared; the losses run on the device in the
hot path and never synchronise with the host.

Usage::

    criterion = SegmentationLoss(kind="dice_ce", num_classes=2)
    loss = criterion(logits, target, weight)              # target/weight may be larger than logits

Any number of spatial axes (the trailing ones: [N,C,h,w] or [N,C,d,h,w] logits). With
``ignore_index`` >= 0, pixels whose target is that value (sparse annotation, Cicek et al. 2016)
count in neither loss: no term, no share of the mean, no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unetdist.geometry import crop_to_logits

LOSS_KINDS = ("ce", "dice_ce")


def pixel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -1,
) -> torch.Tensor:
    """Pixel-wise softmax cross entropy, weighted per pixel, ``sum(w * ce) / num_pixels``.

    ``logits`` [N,C,*s]; ``target`` [N,*S] class ids; ``weight`` [N,*S] or None. With
    ``ignore_index`` >= 0 the pixels of that target are left out of both sums (the mean is
    over the counted pixels; an all-ignored batch gives 0).
    Larger targets/weights are center-cropped to the logits. The paper's energy is a
    weighted sum; dividing by the pixel count keeps the learning rate independent of
    tile and batch size. Computed in float32 so it is safe under bf16/fp16 autocast.
    Labels are not range-checked here (that would synchronise); the data loader does it.
    """
    target = crop_to_logits(logits, target, "target")
    if ignore_index < 0:
        per_pixel = F.cross_entropy(logits.float(), target.long(), reduction="none")
        if weight is not None:
            per_pixel = per_pixel * crop_to_logits(logits, weight, "weight").float()
        return per_pixel.mean()
    # torch's ignore_index gives ignored pixels a zero term and a zero gradient, even where the
    # value (255) is no class; the count stays a tensor so nothing waits for the device
    per_pixel = F.cross_entropy(logits.float(), target.long(), reduction="none", ignore_index=ignore_index)
    if weight is not None:
        per_pixel = per_pixel * crop_to_logits(logits, weight, "weight").float()
    counted = (target != ignore_index).sum().clamp(min=1)
    return per_pixel.sum() / counted


def soft_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    eps: float = 1e-5,
    ignore_background: bool = False,
    ignore_index: int = -1,
) -> torch.Tensor:
    """``1 - mean_c dice_c`` with softmax probabilities against one-hot targets.

    Each class's Dice is computed over the whole batch (all images and pixels pooled),
    then averaged over classes (over 1..C-1 with ``ignore_background``). ``eps``
    smooths both numerator and denominator, so a class absent from truth and
    prediction scores 1 rather than NaN. Pixels whose target is ``ignore_index`` (>= 0) are in
    neither the intersection nor the totals.
    """
    if logits.ndim >= 4 and logits.shape[1] != num_classes:
        raise ValueError(f"logits have {logits.shape[1]} channels, expected num_classes={num_classes}")
    if ignore_background and num_classes < 2:
        raise ValueError("ignore_background needs num_classes >= 2")
    target = crop_to_logits(logits, target, "target")
    probabilities = torch.softmax(logits.float(), dim=1)
    target = target.long()
    if ignore_index >= 0:
        kept = target != ignore_index
        target = torch.where(kept, target, 0)  # any class: its one-hot is zeroed below
        # multiplying by 0 also zeroes the gradient of the ignored probabilities
        probabilities = probabilities * kept.unsqueeze(1)
    one_hot = torch.zeros_like(probabilities).scatter_(1, target.unsqueeze(1), 1.0)
    if ignore_index >= 0:
        one_hot = one_hot * kept.unsqueeze(1)
    reduce_dims = (0, *range(2, logits.ndim))
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
    ``ignore_index`` (``data.ignore_index``; -1: none): a target value counted in neither loss.
    """

    def __init__(
        self, kind: str = "ce", num_classes: int = 2, dice_weight: float = 1.0, ignore_index: int = -1
    ) -> None:
        super().__init__()
        if kind not in LOSS_KINDS:
            raise ValueError(f"unknown loss kind {kind!r}; expected one of {', '.join(LOSS_KINDS)}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.kind = kind
        self.num_classes = num_classes
        self.dice_weight = dice_weight
        self.ignore_index = ignore_index

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        if logits.ndim >= 4 and logits.shape[1] != self.num_classes:
            raise ValueError(
                f"logits have {logits.shape[1]} channels, expected num_classes={self.num_classes}"
            )
        loss = pixel_cross_entropy(logits, target, weight, self.ignore_index)
        if self.kind == "dice_ce":
            loss = loss + self.dice_weight * soft_dice_loss(
                logits, target, self.num_classes, ignore_index=self.ignore_index
            )
        return loss

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, num_classes={self.num_classes}, dice_weight={self.dice_weight}, "
            f"ignore_index={self.ignore_index}"
        )
