"""Tile geometry shared by the model, the losses, the metrics and the data path."""

from __future__ import annotations

import torch


def center_crop(tensor: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """Crop the last two dimensions of ``tensor`` to ``size_hw`` around the center.

    This is the paper's crop for the skip connections and for the targets of a
    valid-conv network, whose output is smaller than its input.
    """
    height, width = tensor.shape[-2:]
    target_h, target_w = size_hw
    if target_h > height or target_w > width:
        raise ValueError(f"cannot center-crop {height}x{width} to the larger {target_h}x{target_w}")
    top = (height - target_h) // 2
    left = (width - target_w) // 2
    return tensor[..., top : top + target_h, left : left + target_w]


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
