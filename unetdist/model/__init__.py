"""U-Net models for tile segmentation: presets, blocks and tile-size arithmetic."""

from unetdist.model.blocks import NORMS, DoubleConv, Down, OutConv, Up, make_norm
from unetdist.model.sizes import (
    PRESETS,
    check_input_size,
    default_depth,
    nearest_valid_input_sizes,
    output_size,
    valid_input_sizes,
)
from unetdist.model.unet import UNet, build_unet

__all__ = [
    "NORMS",
    "PRESETS",
    "DoubleConv",
    "Down",
    "OutConv",
    "UNet",
    "Up",
    "build_unet",
    "check_input_size",
    "default_depth",
    "make_norm",
    "nearest_valid_input_sizes",
    "output_size",
    "valid_input_sizes",
]
