"""Tile geometry shared by the model, the losses, the metrics and the data path.

Spatial axes are always the trailing ones (2 in 2-D, 3 in 3-D), so one crop serves both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_LARGE_AXIS_NAMES = {2: "H, W", 3: "D, H, W"}  # per number of spatial axes


def center_crop(tensor: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Crop the trailing ``len(shape)`` dimensions of ``tensor`` to ``shape`` around the center.

    This is the paper's crop for the skip connections and for the targets of a
    valid-conv network, whose output is smaller than its input.
    """
    shape = tuple(int(size) for size in shape)
    full = tuple(tensor.shape[len(tensor.shape) - len(shape) :])
    if len(full) != len(shape) or any(want > have for want, have in zip(shape, full, strict=True)):
        raise ValueError(
            f"cannot center-crop {'x'.join(map(str, full))} to the larger {'x'.join(map(str, shape))}"
        )
    corners = [(have - want) // 2 for want, have in zip(shape, full, strict=True)]
    window = tuple(slice(corner, corner + want) for corner, want in zip(corners, shape, strict=True))
    return tensor[(..., *window)]


def crop_to_logits(logits: torch.Tensor, per_pixel: torch.Tensor, name: str = "target") -> torch.Tensor:
    """Center-crop an [N,H,W] (or [N,D,H,W]) per-pixel tensor to the [N,C,h,w] ([N,C,d,h,w])
    logits' spatial size.

    Valid-convolution models output less than their input, so targets and weight
    maps arrive larger and are cropped; anything smaller, or a different batch size,
    is a wiring error. Only shapes are inspected, so this never synchronises.
    """
    spatial = logits.ndim - 2
    if spatial not in _LARGE_AXIS_NAMES:
        raise ValueError(
            f"logits must be [N, C, h, w] or [N, C, d, h, w], got shape {tuple(logits.shape)}"
        )
    if per_pixel.ndim != spatial + 1:
        raise ValueError(
            f"{name} must be [N, {_LARGE_AXIS_NAMES[spatial]}], got shape {tuple(per_pixel.shape)}"
        )
    batch, sizes = logits.shape[0], tuple(logits.shape[2:])
    if per_pixel.shape[0] != batch or any(
        have < want for have, want in zip(per_pixel.shape[1:], sizes, strict=True)
    ):
        wanted = ", ".join(f"{axis}>={size}" for axis, size in zip(
            _LARGE_AXIS_NAMES[spatial].split(", "), sizes, strict=True
        ))
        raise ValueError(
            f"{name} shape {tuple(per_pixel.shape)} does not fit logits shape {tuple(logits.shape)}: "
            f"expected [{batch}, {wanted}]"
        )
    return center_crop(per_pixel, sizes)
