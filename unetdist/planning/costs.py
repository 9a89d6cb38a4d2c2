"""What a padded U-Net costs, by arithmetic: FLOPs, parameters, activation memory, seconds per step.

The planner compares many tile sizes, so it needs these figures without building a model or
touching a device; each is checked against the real thing in tests/test_plan.py (the FLOP
count exactly against :func:`unetdist.flops.training_flops_per_sample`, the parameters against
the model, the activations against what autograd keeps). The machine figures that turn them
into seconds and bytes are constants, each saying where it was measured::

    net = Net(tile_px=256, depth=4, in_channels=1, num_classes=3)
    net.memory_bytes(batch=32, precision="bf16")    # ~3.1 GiB: the README's H200 row
    net.step_s(batch=8, Budget(minutes=30))         # on this CPU
    Net(128, 4, 1, 3, tile_depth=32, z_pools=2)     # a 3-D tile 32 x 128 x 128, z pooled at 2 levels

Volumes are the same arithmetic over voxels: a level's feature map has Z x Y x X elements, a
3x3x3 conv 27 taps (3x a 3x3's 9), an up-conv 2x2x2 (8 taps) or 1x2x2 (4) where the level does
not pool z. Approximated in 3-D: the bytes per element and the FLOP rates are the 2-D
calibrations below (cuDNN's 3-D kernels and workspaces differ; nnU-Net likewise scales one
reference measurement by the feature-map size), so a 3-D estimate is a guide, not a measurement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

BASE_WIDTH = 32  # nnU-Net's first-level features
MAX_FEATURES = 512  # nnU-Net's 2-D cap; our widths double every level, so it caps the depth
MAX_DEPTH = int(math.log2(MAX_FEATURES // BASE_WIDTH))
MIN_BOTTOM_EDGE_PX = 8
MIN_TILE_PX = 16

# Speed: achieved training FLOP/s (forward + backward, counted as unetdist.flops counts them).
# CPU: the 2-core development machine (torch 2.13, fp32, 2 threads), shared with other work
# (load ~4): `unetdist.train` on a plan (tile 120, depth 3, batch 2, instance norm, a data worker
# on the same cores) ran ~14 GFLOP/s (1.4-1.9 s a step); a bare step loop at width 16-32, tiles
# 64-128, 15.6-17.5. Alone on the cores the bare loop reaches 80-100: a free CPU finishes early.
CPU_TRAINING_FLOPS = 16e9
# GPU: the README's H200 row "padded 32, 256, 32, bf16, channels_last": 1537 tiles/s of 72.2 GFLOP.
GPU_TRAINING_FLOPS = 111e12
STEP_OVERHEAD_S = {"cpu": 0.02, "gpu": 0.01}  # optimizer, hand-over; GPU: ~330 kernel launches
# GPU memory: bytes per feature-map element of a sample (activation_elements) at the peak of a
# training step, from the README's H200 rows "padded 32, 256, 32": fp32 5925 MiB, bf16 3144 MiB,
# less 16 bytes per parameter, over 32 x 42.875 Mi elements.
BYTES_PER_ELEMENT = {"fp32": 4.23, "bf16": 2.21}
BYTES_PER_PARAMETER = 16  # fp32 weight, gradient and AdamW's two moments
USABLE_MEMORY_SHARE = 0.85  # the rest: the CUDA context, cuDNN workspaces, fragmentation


class PlanError(ValueError):
    """A fingerprint or budget no plan fits; the message says which number and why."""


@dataclass(frozen=True)
class Budget:
    """What the run may spend: ``steps`` or ``minutes`` (neither: a number of passes over the
    data), on a GPU of ``gpu_memory_gb`` GiB or else a CPU, at ``tflops`` achieved training
    TFLOP/s (None: the constants above)."""

    steps: int | None = None
    minutes: float | None = None
    gpu_memory_gb: float | None = None
    tflops: float | None = None

    def __post_init__(self) -> None:
        if self.steps is not None and self.minutes is not None:
            raise PlanError("give --steps or --minutes, not both")
        for name in ("steps", "minutes", "gpu_memory_gb", "tflops"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise PlanError(f"--{name.replace('_', '-')}={value}: expected a positive number")

    @property
    def device(self) -> str:
        return "gpu" if self.gpu_memory_gb else "cpu"

    @property
    def flops_per_s(self) -> float:
        if self.tflops:
            return self.tflops * 1e12
        return GPU_TRAINING_FLOPS if self.device == "gpu" else CPU_TRAINING_FLOPS

    @property
    def precision(self) -> str:
        return "bf16" if self.device == "gpu" else "fp32"

    @property
    def usable_memory_bytes(self) -> float:
        return USABLE_MEMORY_SHARE * (self.gpu_memory_gb or 0.0) * 2**30

    def speed_line(self) -> str:
        """The machine speed figure the step-time estimates use, and where it came from."""
        if self.tflops:
            where = "given (--tflops), or timed on this CPU for --minutes"
        elif self.device == "gpu":
            where = "an H200's bf16 channels_last rate (README)"
        else:
            where = "measured on a 2-core CPU, fp32"
        overhead = STEP_OVERHEAD_S[self.device]
        return f"{rate(self.flops_per_s)} achieved in training, {where}; + {overhead} s per step"


def rate(flops_per_s: float) -> str:
    """``16 GFLOP/s``, ``111 TFLOP/s``."""
    return f"{flops_per_s / 1e12:.3g} TFLOP/s" if flops_per_s >= 1e12 else f"{flops_per_s / 1e9:.3g} GFLOP/s"


def network_depth(tile_px: int) -> int:
    """Pooling levels: as many as keep the bottom edge >= 8 px, at most MAX_DEPTH (at least 1)."""
    depth = 1
    while depth < MAX_DEPTH and tile_px / 2 ** (depth + 1) >= MIN_BOTTOM_EDGE_PX:
        depth += 1
    return depth


def is_plannable_tile(tile_px: int) -> bool:
    """At least MIN_TILE_PX, and divisible by 2**depth for its own depth."""
    return tile_px >= MIN_TILE_PX and tile_px % 2 ** network_depth(tile_px) == 0


Tile = int | tuple[int, ...]  # a square tile's edge, or a shape (Y, X) / (Z, Y, X)


def _shape(tile: Tile) -> tuple[int, ...]:
    return (tile, tile) if isinstance(tile, int) else tuple(tile)


def _z_pooled(level: int, depth: int, z_pools: int | None) -> bool:
    """Whether the pool into ``level`` (1..depth) halves z: the deepest ``z_pools`` do (None: all)."""
    return z_pools is None or level > depth - z_pools


def _levels(tile: Tile, depth: int, width: int, z_pools: int | None = None) -> list[tuple[int, int]]:
    """(features, spatial elements) per level, 0 .. depth (the bottom); in-plane axes halve at
    every level, a 3-D tile's z at the deepest ``z_pools``."""
    shape = _shape(tile)
    levels = []
    for level in range(depth + 1):
        z_halvings = sum(_z_pooled(down, depth, z_pools) for down in range(1, level + 1))
        halvings = [z_halvings] * (len(shape) - 2) + [level, level]
        levels.append((width * 2**level, math.prod(n // 2**h for n, h in zip(shape, halvings, strict=True))))
    return levels


def _taps(tile: Tile, depth: int, z_pools: int | None) -> tuple[int, list[int]]:
    """Kernel taps of a 3x3 (3x3x3) conv, and of the up-conv into each level 0 .. depth - 1."""
    if len(_shape(tile)) == 2:
        return 9, [4] * depth
    return 27, [8 if _z_pooled(level + 1, depth, z_pools) else 4 for level in range(depth)]


def activation_elements(
    tile_px: Tile, depth: int, in_channels: int, num_classes: int, width: int = BASE_WIDTH,
    z_pools: int | None = None,
) -> int:  # fmt: skip
    """Feature-map elements of one sample's training forward (padded preset): per conv its output
    and its norm's (the ReLU is in place), each pool's and up-conv's output, each skip concat;
    the input and the logits. Autograd keeps ~95% of them. ``tile_px``: an edge or a shape."""
    levels = _levels(tile_px, depth, width, z_pools)
    features0, elements0 = levels[0]
    total = (in_channels + num_classes) * elements0 + 4 * features0 * elements0
    for level in range(1, depth + 1):
        (before, _), (features, elements) = levels[level - 1], levels[level]
        total += before * elements + 4 * features * elements  # pool output, then two convs + norms
    for features, elements in levels[:depth]:
        total += 7 * features * elements  # up-conv, concat (2x), two convs + norms
    return total


def training_flops(
    tile_px: Tile, depth: int, in_channels: int, num_classes: int, width: int = BASE_WIDTH,
    z_pools: int | None = None,
) -> int:  # fmt: skip
    """FLOPs of one sample's forward + backward, as :func:`unetdist.flops.training_flops_per_sample`
    counts them: 2 per multiply-add, backward twice the forward but for the input's gradient."""
    levels = _levels(tile_px, depth, width, z_pools)
    conv, up = _taps(tile_px, depth, z_pools)
    features0, elements0 = levels[0]
    first_conv = conv * in_channels * features0 * elements0
    macs = first_conv + conv * features0**2 * elements0 + features0 * num_classes * elements0
    for level in range(1, depth + 1):
        (before, _), (features, elements) = levels[level - 1], levels[level]
        macs += conv * before * features * elements + conv * features**2 * elements
    for level, (features, elements) in enumerate(levels[:depth]):
        below = levels[level + 1][1]  # a transposed conv costs its taps per input element
        macs += up[level] * 2 * features * features * below + 3 * conv * features**2 * elements  # convs 2f->f, f->f
    return 6 * macs - 2 * first_conv


def parameter_count(
    depth: int, in_channels: int, num_classes: int, width: int = BASE_WIDTH, spatial_dims: int = 2,
    z_pools: int | None = None,
) -> int:  # fmt: skip
    """Parameters of the padded U-Net with a norm (convs without bias, 2 per norm channel)."""
    widths = [width * 2**level for level in range(depth + 1)]
    conv, up_taps = _taps((1,) * spatial_dims, depth, z_pools)

    def double_conv(cin: int, cout: int) -> int:
        return conv * cin * cout + conv * cout * cout + 4 * cout

    total = double_conv(in_channels, widths[0]) + widths[0] * num_classes + num_classes
    total += sum(double_conv(widths[level - 1], widths[level]) for level in range(1, depth + 1))
    for level in range(depth):  # up-conv (2x2 or 2x2x2 / 1x2x2, bias), then a double conv of the concat
        up = up_taps[level] * widths[level + 1] * widths[level] + widths[level]
        total += up + double_conv(2 * widths[level], widths[level])
    return total


@dataclass(frozen=True)
class Net:
    """A padded U-Net of ``width`` first-level features at one tile size: what a training step costs.
    ``tile_depth`` > 0: a 3-D tile ``tile_depth`` x ``tile_px`` x ``tile_px`` whose z the deepest
    ``z_pools`` levels pool (None: all)."""

    tile_px: int
    depth: int
    in_channels: int
    num_classes: int
    width: int = BASE_WIDTH  # model.base_width
    tile_depth: int = 0  # data.tile_depth; 0: a 2-D tile
    z_pools: int | None = None  # model.z_pools

    @property
    def shape(self) -> tuple[int, ...]:
        """The tile per spatial axis: (Y, X) or (Z, Y, X)."""
        return (self.tile_depth, self.tile_px, self.tile_px) if self.tile_depth else (self.tile_px, self.tile_px)

    @property
    def tile_elements(self) -> int:
        """Pixels (voxels) of one tile."""
        return math.prod(self.shape)

    @property
    def flops(self) -> int:
        """Training FLOPs per sample."""
        return training_flops(self.shape, self.depth, self.in_channels, self.num_classes, self.width, self.z_pools)

    def memory_bytes(self, batch: int, precision: str) -> float:
        """Peak GPU memory of a training step of ``batch`` samples."""
        activations = activation_elements(
            self.shape, self.depth, self.in_channels, self.num_classes, self.width, self.z_pools
        )
        parameters = parameter_count(
            self.depth, self.in_channels, self.num_classes, self.width, len(self.shape), self.z_pools
        )
        return BYTES_PER_PARAMETER * parameters + batch * BYTES_PER_ELEMENT[precision] * activations

    def step_s(self, batch: int, budget: Budget) -> float:
        """Seconds of a training step of ``batch`` samples at the budget's machine speed."""
        return STEP_OVERHEAD_S[budget.device] + batch * self.flops / budget.flops_per_s
