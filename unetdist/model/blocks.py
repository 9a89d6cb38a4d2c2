"""The named building blocks of the U-Net: DoubleConv, Down, Up and OutConv.

Each block is one box of the paper's figure, parameterised just enough to
express the three presets: conv padding (valid or same), the normalisation
kind, and whether the norm comes after the ReLU (the article's order) or
before it (the usual modern order).

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

_MAX_GROUPS = 8


def make_norm(kind: str, channels: int) -> nn.Module:
    """A 2-D normalisation layer of ``kind`` (one of NORMS) over ``channels`` channels."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(_group_count(channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; allowed: {', '.join(NORMS)}")


def _group_count(channels: int) -> int:
    # GroupNorm needs the group count to divide the channels; take the largest
    # divisor up to 8 so tiny test widths (e.g. 4 channels) still work.
    return max(groups for groups in range(1, _MAX_GROUPS + 1) if channels % groups == 0)


class DoubleConv(nn.Sequential):
    """Two 3x3 convolutions, each followed by ReLU and an optional norm."""

    def __init__(self, in_channels: int, out_channels: int, padding: int, norm: str, norm_after_relu: bool):
        layers: list[nn.Module] = []
        for layer_in in (in_channels, out_channels):
            # A norm right after the conv cancels any bias; after the ReLU it does not.
            conv_bias = norm == "none" or norm_after_relu
            layers.append(nn.Conv2d(layer_in, out_channels, kernel_size=3, padding=padding, bias=conv_bias))
            relu = nn.ReLU(inplace=True)
            norm_layer = make_norm(norm, out_channels)
            layers += [relu, norm_layer] if norm_after_relu else [norm_layer, relu]
        # Identity norms add nothing but noise to printed models and state dicts.
        super().__init__(*(layer for layer in layers if not isinstance(layer, nn.Identity)))


class Down(nn.Sequential):
    """2x2 max-pool (stride 2), then a DoubleConv: one step down the contracting path."""

    def __init__(self, in_channels: int, out_channels: int, padding: int, norm: str, norm_after_relu: bool):
        super().__init__(
            nn.MaxPool2d(kernel_size=2, stride=2),
            DoubleConv(in_channels, out_channels, padding, norm, norm_after_relu),
        )


def up_convolution(in_channels: int, out_channels: int, kernel_size: int) -> nn.ConvTranspose2d:
    """A stride-2 transposed convolution that exactly doubles the spatial size.

    The output size is ``2*(n-1) - 2*padding + kernel_size + output_padding``, so
    doubling needs ``kernel_size - 2*padding + output_padding == 2``: k2 gives the
    paper's plain 2x2 up-conv, k3 the article's (padding 1, output_padding 1).
    """
    padding = (kernel_size - 1) // 2
    output_padding = 2 - kernel_size + 2 * padding
    return nn.ConvTranspose2d(
        in_channels,
        out_channels,
        kernel_size=kernel_size,
        stride=2,
        padding=padding,
        output_padding=output_padding,
    )


class Up(nn.Module):
    """Up-convolution halving the channels, crop-and-concat the skip, then a DoubleConv."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        padding: int,
        norm: str,
        norm_after_relu: bool,
        up_kernel_size: int = 2,
    ):
        super().__init__()
        self.up = up_convolution(in_channels, in_channels // 2, up_kernel_size)
        # The skip brings the other half of the channels back.
        self.conv = DoubleConv(in_channels, out_channels, padding, norm, norm_after_relu)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        # Valid convs make the skip larger than the upsampled map; same-padding
        # convs make them equal and the crop a no-op.
        skip = center_crop(skip, tuple(x.shape[-2:]))
        return self.conv(torch.cat([skip, x], dim=1))


class OutConv(nn.Conv2d):
    """1x1 convolution mapping features to per-class logits."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__(in_channels, num_classes, kernel_size=1)


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
