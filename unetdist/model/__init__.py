"""U-Net models for tile segmentation, 2-D or 3-D: presets, blocks and tile-size arithmetic."""

from unetdist.model.blocks import (
    NORMS,
    SPATIAL_DIMS,
    DoubleConv,
    Down,
    OutConv,
    Up,
    make_norm,
    up_convolution,
)
from unetdist.model.sizes import (
    PRESETS,
    check_input_shape,
    check_input_size,
    default_depth,
    nearest_valid_input_sizes,
    output_shape,
    output_size,
    valid_input_sizes,
)
from unetdist.model.unet import UNet, build_unet

__all__ = [
    "NORMS",
    "PRESETS",
    "SPATIAL_DIMS",
    "DoubleConv",
    "Down",
    "OutConv",
    "UNet",
    "Up",
    "build_unet",
    "check_input_shape",
    "check_input_size",
    "default_depth",
    "make_norm",
    "nearest_valid_input_sizes",
    "output_shape",
    "output_size",
    "up_convolution",
    "valid_input_sizes",
]
