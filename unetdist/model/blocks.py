"""The named building blocks of the U-Net: DoubleConv, Down, Up and OutConv, in 2-D or 3-D.

Each block is one box of the paper's figure, parameterised just enough to
express the presets: conv padding (valid or same), the normalisation kind,
and whether the norm comes after the ReLU (the article's order) or before it
(the usual modern order).

Every block takes ``spatial_dims`` (2 or 3) and picks its torch layers from one
table, so a 3-D U-Net is the same code as the 2-D one (Cicek et al. 2016) and
a 2-D model builds exactly the modules it always did. ``pool_z=False`` makes a
3-D pooling step leave z alone (a (1, 2, 2) pool and up-convolution): volumes
whose z spacing is coarser than their in-plane one pool z at the deepest levels
only (nnU-Net's rule). Convolutions stay 3x3x3 either way.

``run_checkpointed`` runs one block under activation checkpointing: its
activations are recomputed in the backward pass instead of being kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils.checkpoint import checkpoint

from unetdist.geometry import center_crop

NORMS: tuple[str, ...] = ("batch", "instance", "group", "none")
SPATIAL_DIMS: tuple[int, ...] = (2, 3)

_MAX_GROUPS = 8

# The torch layer of each kind per number of spatial axes; GroupNorm is the same for both.
_LAYERS: dict[int, dict[str, type[nn.Module]]] = {
    2: {
        "conv": nn.Conv2d,
        "up": nn.ConvTranspose2d,
        "pool": nn.MaxPool2d,
        "batch": nn.BatchNorm2d,
        "instance": nn.InstanceNorm2d,
    },
    3: {
        "conv": nn.Conv3d,
        "up": nn.ConvTranspose3d,
        "pool": nn.MaxPool3d,
        "batch": nn.BatchNorm3d,
        "instance": nn.InstanceNorm3d,
    },
}


def layer_class(kind: str, spatial_dims: int) -> type[nn.Module]:
    """The torch layer class of ``kind`` ("conv", "up", "pool", "batch", "instance") in 2-D or 3-D."""
    if spatial_dims not in _LAYERS:
        raise ValueError(f"spatial_dims must be one of {SPATIAL_DIMS}, got {spatial_dims!r}")
    return _LAYERS[spatial_dims][kind]


def make_norm(kind: str, channels: int, spatial_dims: int = 2) -> nn.Module:
    """A normalisation layer of ``kind`` (one of NORMS) over ``channels`` channels."""
    if kind in ("batch", "instance"):
        norm_class = layer_class(kind, spatial_dims)
        return norm_class(channels) if kind == "batch" else norm_class(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(_group_count(channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; allowed: {', '.join(NORMS)}")


def _group_count(channels: int) -> int:
    # GroupNorm needs the group count to divide the channels; take the largest
    # divisor up to 8 so tiny test widths (e.g. 4 channels) still work.
    return max(groups for groups in range(1, _MAX_GROUPS + 1) if channels % groups == 0)


def _halving(spatial_dims: int, pool_z: bool) -> int | tuple[int, ...]:
    """Kernel and stride of a step that halves every in-plane axis (and z when ``pool_z``)."""
    if spatial_dims == 3 and not pool_z:
        return (1, 2, 2)
    return 2  # an int, as the 2-D model always had it (the module reprs stay the same)


class DoubleConv(nn.Sequential):
    """Two 3x3 (3x3x3) convolutions, each followed by ReLU and an optional norm.

    ``mid_channels`` (default ``out_channels``) is the first conv's width: Cicek et al.
    widen inside the block (32 -> 64 before the pool) instead of after it.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        padding: int,
        norm: str,
        norm_after_relu: bool,
        spatial_dims: int = 2,
        mid_channels: int | None = None,
    ):
        conv_class = layer_class("conv", spatial_dims)
        mid_channels = out_channels if mid_channels is None else mid_channels
        layers: list[nn.Module] = []
        for layer_in, layer_out in ((in_channels, mid_channels), (mid_channels, out_channels)):
            # A norm right after the conv cancels any bias; after the ReLU it does not.
            conv_bias = norm == "none" or norm_after_relu
            layers.append(conv_class(layer_in, layer_out, kernel_size=3, padding=padding, bias=conv_bias))
            relu = nn.ReLU(inplace=True)
            norm_layer = make_norm(norm, layer_out, spatial_dims)
            layers += [relu, norm_layer] if norm_after_relu else [norm_layer, relu]
        # Identity norms add nothing but noise to printed models and state dicts.
        super().__init__(*(layer for layer in layers if not isinstance(layer, nn.Identity)))


class Down(nn.Sequential):
    """Max-pool halving the size (stride 2), then a DoubleConv: one step down the contracting path.

    In 3-D the pool is 2x2x2, or 1x2x2 with ``pool_z=False``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        padding: int,
        norm: str,
        norm_after_relu: bool,
        spatial_dims: int = 2,
        pool_z: bool = True,
        mid_channels: int | None = None,
    ):
        window = _halving(spatial_dims, pool_z)
        super().__init__(
            layer_class("pool", spatial_dims)(kernel_size=window, stride=window),
            DoubleConv(in_channels, out_channels, padding, norm, norm_after_relu, spatial_dims, mid_channels),
        )


def up_convolution(
    in_channels: int, out_channels: int, kernel_size: int, spatial_dims: int = 2, pool_z: bool = True
) -> nn.Module:
    """A stride-2 transposed convolution that exactly doubles the spatial size.

    The output size is ``2*(n-1) - 2*padding + kernel_size + output_padding``, so
    doubling needs ``kernel_size - 2*padding + output_padding == 2``: k2 gives the
    paper's plain 2x2 up-conv, k3 the article's (padding 1, output_padding 1).
    With ``pool_z=False`` (3-D) z is left as it is: kernel 1, stride 1 along z.
    """
    padding = (kernel_size - 1) // 2
    output_padding = 2 - kernel_size + 2 * padding
    up_class = layer_class("up", spatial_dims)
    if spatial_dims == 3 and not pool_z:
        return up_class(
            in_channels,
            out_channels,
            kernel_size=(1, kernel_size, kernel_size),
            stride=(1, 2, 2),
            padding=(0, padding, padding),
            output_padding=(0, output_padding, output_padding),
        )
    return up_class(
        in_channels,
        out_channels,
        kernel_size=kernel_size,
        stride=2,
        padding=padding,
        output_padding=output_padding,
    )


class Up(nn.Module):
    """Up-convolution, crop-and-concat the skip, then a DoubleConv.

    The up-convolution halves the channels (Ronneberger et al.), unless ``up_channels``
    says otherwise (Cicek et al. keep them). The skip comes from the contracting level
    of the same depth, which has this block's ``out_channels``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        padding: int,
        norm: str,
        norm_after_relu: bool,
        up_kernel_size: int = 2,
        spatial_dims: int = 2,
        pool_z: bool = True,
        up_channels: int | None = None,
    ):
        super().__init__()
        up_channels = in_channels // 2 if up_channels is None else up_channels
        self.up = up_convolution(in_channels, up_channels, up_kernel_size, spatial_dims, pool_z)
        concat_channels = up_channels + out_channels
        self.conv = DoubleConv(concat_channels, out_channels, padding, norm, norm_after_relu, spatial_dims)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        # Valid convs make the skip larger than the upsampled map; same-padding
        # convs make them equal and the crop a no-op.
        skip = center_crop(skip, x.shape[2:])
        return self.conv(torch.cat([skip, x], dim=1))


def OutConv(in_channels: int, num_classes: int, spatial_dims: int = 2) -> nn.Module:  # named as the other boxes
    """1x1 (1x1x1) convolution mapping features to per-class logits.

    A plain Conv2d/Conv3d rather than a subclass, so that one name builds either and
    the 2-D model keeps its module (``isinstance(model.out_conv, nn.Conv2d)``) and keys.
    """
    return layer_class("conv", spatial_dims)(in_channels, num_classes, kernel_size=1)


def run_checkpointed(block: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    """``block(*inputs)`` keeping only its inputs; the backward pass recomputes the rest.

    The recomputation is a second training-mode forward, which would move BatchNorm
    running statistics twice per step; they are put back after it, so loss, gradients
    and running statistics all equal the plain forward's. Under ``torch.compile`` the
    recomputation is part of the compiled backward graph, which applies no buffer
    mutation twice, so no such guard is needed (nor allowed) there.
    """
    if torch.compiler.is_compiling():
        return checkpoint(block, *inputs, use_reentrant=False)
    stats_modules = [m for m in block.modules() if isinstance(m, _NormBase) and m.track_running_stats]
    if not stats_modules:
        return checkpoint(block, *inputs, use_reentrant=False)

    def contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        return contextlib.nullcontext(), _running_stats_kept(stats_modules)

    return checkpoint(block, *inputs, use_reentrant=False, context_fn=contexts)


@contextlib.contextmanager
def _running_stats_kept(modules: list[nn.Module]) -> Iterator[None]:
    saved = [[buffer.clone() for buffer in module.buffers(recurse=False)] for module in modules]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, buffers in zip(modules, saved, strict=True):
                for buffer, value in zip(module.buffers(recurse=False), buffers, strict=True):
                    buffer.copy_(value)
