"""The U-Net and its presets: ``paper``, ``article``, ``padded`` and ``cicek``, in 2-D or 3-D.

``paper`` is Ronneberger et al. 2015 (arXiv:1505.04597): valid 3x3 convs with
ReLU and no norm, 2x2 up-convolutions, center-cropped skips, He-normal init;
a 572x572 tile gives 388x388 logits.

``article`` is the architecture of a popular "U-Net from scratch" article:
three contracting blocks and valid 3x3 convs like the paper, but every conv is
followed by ReLU and then BatchNorm (in that order), and the up-convolutions
are ConvTranspose2d(kernel_size=3, stride=2, padding=1, output_padding=1).
One bug of the article is fixed here: its final block ended with ReLU and
BatchNorm on top of the last conv, so the "logits" could never be negative
and were renormalised per batch; ours ends with a plain 1x1 conv.

``padded`` is the common modern variant: same-padding convs (no crop needed,
output size == input size), a choice of norm before the ReLU, 2x2 up-convs.

``cicek`` is the 3-D U-Net of Cicek et al. 2016 (arXiv:1606.06650): valid 3x3x3 convs,
BatchNorm before ReLU, 2x2x2 max-pools and up-convolutions, crop-and-concat, depth 3,
base width 32. As in the paper each block widens inside itself (32 -> 64 before the
first pool, the bottom 256 -> 512) and the up-convolutions keep the width. With three
input channels and three classes that is the paper's 19,069,955 parameters once counted
its way (conv biases, no BatchNorm affine, no up-conv biases; ours drop the conv biases a
BatchNorm right after cancels and keep the others: 19,073,187). A 132x132x116 tile (x, y,
z) gives 44x44x28 logits. Like every preset it also builds in 2-D.

Only ``padded`` uses the ``norm`` argument; the others fix their own
(``paper``: none, ``article``: batch after ReLU, ``cicek``: batch before ReLU) to stay faithful.

``UNet.activation_checkpointing = True`` keeps only each encoder/decoder level's
inputs during a training forward and recomputes the rest in backward: about a third
more compute for much less activation memory, so larger tiles fit (the paper prefers
large tiles over large batches). Same loss and gradients either way.

``spatial_dims=3`` builds any preset from the same blocks in 3-D (input
``[N, C, Z, Y, X]``); ``z_pools`` levels, the deepest ones, pool z as well (None: all),
the others pool and up-convolve y and x only, for volumes whose z is coarser.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from unetdist.model import sizes
from unetdist.model.blocks import NORMS, SPATIAL_DIMS, DoubleConv, Down, OutConv, Up, run_checkpointed


@dataclass(frozen=True)
class _Preset:
    base_width: int
    norm: str | None  # None: the caller's norm argument
    norm_after_relu: bool
    up_kernel_size: int
    he_init: bool
    # Cicek et al.: the first conv of a block has the block's width, the second doubles it
    # (so a level hands twice its width down and across), and up-convs keep the width.
    widen_in_block: bool = False


_PRESETS = {
    "paper": _Preset(
        base_width=64, norm="none", norm_after_relu=False, up_kernel_size=2, he_init=True
    ),
    "article": _Preset(
        base_width=64, norm="batch", norm_after_relu=True, up_kernel_size=3, he_init=False
    ),
    "padded": _Preset(
        base_width=32, norm=None, norm_after_relu=False, up_kernel_size=2, he_init=True
    ),
    "cicek": _Preset(
        base_width=32, norm="batch", norm_after_relu=False, up_kernel_size=2, he_init=True,
        widen_in_block=True,
    ),
}


class UNet(nn.Module):
    """Encoder levels, bottleneck, decoder levels fed by the skips, 1x1 out conv.

    Widths double each level: ``base_width * 2**level``, the bottleneck at
    ``level == depth`` (``cicek``: twice that at each block's output). Returns raw
    logits ``[N, num_classes, *output_shape(spatial)]`` for an input ``[N, C, *spatial]``
    of ``spatial_dims`` axes (``(Y, X)`` or ``(Z, Y, X)``).
    """

    def __init__(
        self,
        preset: str,
        in_channels: int,
        num_classes: int,
        base_width: int,
        depth: int,
        norm: str = "batch",
        activation_checkpointing: bool = False,
        spatial_dims: int = 2,
        z_pools: int | None = None,
    ):
        super().__init__()
        _check_choice("preset", preset, sizes.PRESETS)
        _check_choice("norm", norm, NORMS)
        for name, value in (
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("base_width", base_width),
            ("depth", depth),
        ):
            _check_positive_int(name, value)
        _check_spatial(spatial_dims, z_pools, depth)
        spec = _PRESETS[preset]
        self.preset = preset
        self.depth = depth
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.base_width = base_width
        self.spatial_dims = spatial_dims
        # resolved: the levels that pool z in a 3-D model; None for a 2-D one (it has no z)
        self.z_pools = (depth if z_pools is None else z_pools) if spatial_dims == 3 else None
        self.norm = spec.norm if spec.norm is not None else norm
        padding = sizes.conv_padding(preset)
        self.padded = padding > 0

        widths = [base_width * 2**level for level in range(depth + 1)]
        outputs = [2 * width for width in widths] if spec.widen_in_block else widths
        block = {
            "padding": padding,
            "norm": self.norm,
            "norm_after_relu": spec.norm_after_relu,
            "spatial_dims": spatial_dims,
        }
        # the pool after level l (and the up-conv undoing it) halves z too when this holds
        pools_z = [self._pools_z(level) for level in range(depth)]
        self.encoder = nn.ModuleList(
            [DoubleConv(in_channels, outputs[0], mid_channels=widths[0], **block)]
            + [
                Down(
                    outputs[level - 1], outputs[level], pool_z=pools_z[level - 1], mid_channels=widths[level], **block
                )
                for level in range(1, depth)
            ]
        )
        self.bottleneck = Down(
            outputs[depth - 1], outputs[depth], pool_z=pools_z[depth - 1], mid_channels=widths[depth], **block
        )
        self.decoder = nn.ModuleList(
            Up(
                outputs[level + 1],
                outputs[level],
                up_kernel_size=spec.up_kernel_size,
                pool_z=pools_z[level],
                up_channels=outputs[level + 1] if spec.widen_in_block else None,  # None: halve
                **block,
            )
            for level in reversed(range(depth))
        )
        self.out_conv = OutConv(outputs[0], num_classes, spatial_dims)
        # Plain attribute: set it before or after wrapping (DDP, compile) alike.
        self.activation_checkpointing = activation_checkpointing
        if spec.he_init:
            self.apply(_he_normal_init)

    def _pools_z(self, level: int) -> bool:
        """Whether the pool after ``level`` halves z: only the deepest ``z_pools`` do."""
        return self.z_pools is None or level >= self.depth - self.z_pools

    def output_size(self, input_size: int) -> int:
        """Side length of the logits along an in-plane axis (y or x) of ``input_size``."""
        return sizes.output_size(self.preset, self.depth, input_size)

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The logits' spatial shape for an input tile of spatial ``shape`` ((Y, X) or (Z, Y, X))."""
        self._check_axes(shape)
        return sizes.output_shape(self.preset, self.depth, tuple(shape), self.z_pools)

    def _check_axes(self, shape: tuple[int, ...]) -> None:
        if len(shape) != self.spatial_dims:
            raise ValueError(
                f"a {self.spatial_dims}-D U-Net takes tiles of {self.spatial_dims} spatial axes "
                f"(input [N, C, {', '.join('ZYX'[-self.spatial_dims:])}]), got spatial shape {tuple(shape)}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A wrong tile size would not fail in a valid-conv net, only misalign the
        # crops; say so early, with the nearest sizes that work.
        if self.spatial_dims == 2:
            for side in x.shape[-2:]:  # the 2-D message, as it always read
                sizes.check_input_size(self.preset, self.depth, int(side))
        else:
            # a 4-D tensor would pass a Conv3d as one unbatched volume: refuse it here
            self._check_axes(tuple(x.shape[2:]))
            sizes.check_input_shape(self.preset, self.depth, tuple(int(n) for n in x.shape[2:]), self.z_pools)
        # Only a training forward that builds a graph has activations worth dropping.
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        run = run_checkpointed if recompute else _run
        skips = []
        for level in self.encoder:
            x = run(level, x)
            skips.append(x)
        x = run(self.bottleneck, x)
        for level, skip in zip(self.decoder, reversed(skips), strict=True):
            x = run(level, x, skip)
        return self.out_conv(x)


def _run(block: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    return block(*inputs)


def build_unet(
    preset: str,
    in_channels: int,
    num_classes: int,
    base_width: int | None = None,
    depth: int | None = None,
    norm: str = "batch",
    activation_checkpointing: bool = False,
    spatial_dims: int = 2,
    z_pools: int | None = None,
) -> UNet:
    """A U-Net of the named preset; ``base_width``/``depth`` default to the preset's own.

    Defaults: paper 64/4, article 64/3, padded 32/4, cicek 32/3. ``norm`` (one of
    "batch", "instance", "group", "none") is used by ``padded`` only.
    ``activation_checkpointing`` recomputes each level's activations in backward.
    ``spatial_dims=3`` builds the 3-D model; ``z_pools`` (3-D only; None: every level)
    is how many of the deepest levels pool z.
    """
    _check_choice("preset", preset, sizes.PRESETS)
    spec = _PRESETS[preset]
    return UNet(
        preset,
        in_channels,
        num_classes,
        base_width=spec.base_width if base_width is None else base_width,
        depth=sizes.default_depth(preset) if depth is None else depth,
        norm=norm,
        activation_checkpointing=activation_checkpointing,
        spatial_dims=spatial_dims,
        z_pools=z_pools,
    )


def _he_normal_init(module: nn.Module) -> None:
    """He et al. normal init as in the U-Net paper: std sqrt(2/N), biases zero.

    N is the number of incoming nodes of one neuron. For a conv that is
    in_channels times its kernel taps (the paper's example: 3x3 over 64 channels
    gives 576; 3x3x3 over 64, 1728). For a stride-s up-conv each output pixel
    only meets prod(k/s) taps per input channel (exactly one for 2x2 stride 2,
    2x2x2 stride 2 and 1x2x2 stride (1, 2, 2)), not prod(k); torch's own fan_in
    for a transposed conv (out_channels*prod(k)) would be wrong either way, so count here.
    """
    if isinstance(module, (nn.Conv2d, nn.Conv3d)):
        incoming = module.weight[0].numel()  # in_channels/groups * prod(kernel)
    elif isinstance(module, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
        kernel_taps = math.prod(module.kernel_size) / math.prod(module.stride)
        incoming = module.in_channels // module.groups * kernel_taps
    else:
        return
    nn.init.normal_(module.weight, mean=0.0, std=math.sqrt(2.0 / incoming))
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _check_spatial(spatial_dims: int, z_pools: int | None, depth: int) -> None:
    if spatial_dims not in SPATIAL_DIMS:
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if z_pools is None:
        return
    if spatial_dims != 3:
        raise ValueError(f"z_pools is for 3-D models (spatial_dims=3): a 2-D one has no z; got {z_pools}")
    if isinstance(z_pools, bool) or not isinstance(z_pools, int) or not 0 <= z_pools <= depth:
        raise ValueError(f"z_pools must be an int from 0 to the depth ({depth}) or None (all); got {z_pools!r}")
