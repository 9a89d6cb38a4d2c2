"""Tile geometry shared by the model, the losses and the data path."""

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
