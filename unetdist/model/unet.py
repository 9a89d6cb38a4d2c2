"""The U-Net and its three presets: ``paper``, ``article`` and ``padded``.

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

Only ``padded`` uses the ``norm`` argument; the other two fix their own
(``paper``: none, ``article``: batch after ReLU) to stay faithful.

``UNet.activation_checkpointing = True`` keeps only each encoder/decoder level's
inputs during a training forward and recomputes the rest in backward: about a third
more compute for much less activation memory, so larger tiles fit (the paper prefers
large tiles over large batches). Same loss and gradients either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from unetdist.model import sizes
from unetdist.model.blocks import NORMS, DoubleConv, Down, OutConv, Up, run_checkpointed


@dataclass(frozen=True)
class _Preset:
    base_width: int
    norm: str | None  # None: the caller's norm argument
    norm_after_relu: bool
    up_kernel_size: int
    he_init: bool


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
}


class UNet(nn.Module):
    """Encoder levels, bottleneck, decoder levels fed by the skips, 1x1 out conv.

    Widths double each level: ``base_width * 2**level``, the bottleneck at
    ``level == depth``. Returns raw logits ``[N, num_classes, h, w]`` with
    ``h = output_size(H)``.
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
        spec = _PRESETS[preset]
        self.preset = preset
        self.depth = depth
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.base_width = base_width
        self.norm = spec.norm if spec.norm is not None else norm
        padding = sizes.conv_padding(preset)
        self.padded = padding > 0

        widths = [base_width * 2**level for level in range(depth + 1)]
        block = {"padding": padding, "norm": self.norm, "norm_after_relu": spec.norm_after_relu}
        self.encoder = nn.ModuleList(
            [DoubleConv(in_channels, widths[0], **block)]
            + [Down(widths[level - 1], widths[level], **block) for level in range(1, depth)]
        )
        self.bottleneck = Down(widths[depth - 1], widths[depth], **block)
        self.decoder = nn.ModuleList(
            Up(widths[level + 1], widths[level], up_kernel_size=spec.up_kernel_size, **block)
            for level in reversed(range(depth))
        )
        self.out_conv = OutConv(widths[0], num_classes)
        # Plain attribute: set it before or after wrapping (DDP, compile) alike.
        self.activation_checkpointing = activation_checkpointing
        if spec.he_init:
            self.apply(_he_normal_init)

    def output_size(self, input_size: int) -> int:
        """Side length of the logits for a square tile of side ``input_size``."""
        return sizes.output_size(self.preset, self.depth, input_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A wrong tile size would not fail in a valid-conv net, only misalign the
        # crops; say so early, with the nearest sizes that work.
        for side in x.shape[-2:]:
            sizes.check_input_size(self.preset, self.depth, int(side))
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
) -> UNet:
    """A U-Net of the named preset; ``base_width``/``depth`` default to the preset's own.

    Defaults: paper 64/4, article 64/3, padded 32/4. ``norm`` (one of
    "batch", "instance", "group", "none") is used by ``padded`` only.
    ``activation_checkpointing`` recomputes each level's activations in backward.
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
    )


def _he_normal_init(module: nn.Module) -> None:
    """He et al. normal init as in the U-Net paper: std sqrt(2/N), biases zero.

    N is the number of incoming nodes of one neuron. For a conv that is
    k*k*in_channels (the paper's example: 3x3 over 64 channels gives 576). For a
    stride-s up-conv each output pixel only meets (k/s)**2 taps per input
    channel (exactly one for 2x2 stride 2), not k*k; torch's own fan_in for a
    transposed conv (out_channels*k*k) would be wrong either way, so count here.
    """
    if isinstance(module, nn.Conv2d):
        incoming = module.weight[0].numel()  # in_channels/groups * kh * kw
    elif isinstance(module, nn.ConvTranspose2d):
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
