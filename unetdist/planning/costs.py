"""What a padded U-Net costs, by arithmetic: FLOPs, parameters, activation memory, seconds per step.

The planner compares many tile sizes, so it needs these figures without building a model or
touching a device; each is checked against the real thing in tests/test_plan.py (the FLOP
count exactly against :func:`unetdist.flops.training_flops_per_sample`, the parameters against
the model, the activations against what autograd keeps). The machine figures that turn them
into seconds and bytes are constants, each saying where it was measured::

    net = Net(tile_px=256, depth=4, in_channels=1, num_classes=3)
    net.memory_bytes(batch=32, precision="bf16")    # ~3.1 GiB: the README's H200 row
    net.step_s(batch=8, Budget(minutes=30))         # on this CPU
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


def _levels(tile_px: int, depth: int, width: int) -> list[tuple[int, int]]:
    """(features, edge px) per level, 0 .. depth (the bottom)."""
    return [(width * 2**level, tile_px // 2**level) for level in range(depth + 1)]


def activation_elements(
    tile_px: int, depth: int, in_channels: int, num_classes: int, width: int = BASE_WIDTH
) -> int:
    """Feature-map elements of one sample's training forward (padded preset): per conv its output
    and its norm's (the ReLU is in place), each pool's and up-conv's output, each skip concat;
    the input and the logits. Autograd keeps ~95% of them."""
    levels = _levels(tile_px, depth, width)
    features0, edge0 = levels[0]
    total = (in_channels + num_classes) * edge0**2 + 4 * features0 * edge0**2
    for level in range(1, depth + 1):
        (before, _), (features, edge) = levels[level - 1], levels[level]
        total += before * edge**2 + 4 * features * edge**2  # pool output, then two convs + norms
    for features, edge in levels[:depth]:
        total += 7 * features * edge**2  # up-conv, concat (2x), two convs + norms
    return total


def training_flops(
    tile_px: int, depth: int, in_channels: int, num_classes: int, width: int = BASE_WIDTH
) -> int:
    """FLOPs of one sample's forward + backward, as :func:`unetdist.flops.training_flops_per_sample`
    counts them: 2 per multiply-add, backward twice the forward but for the input's gradient."""
    levels = _levels(tile_px, depth, width)
    features0, edge0 = levels[0]
    first_conv = 9 * in_channels * features0 * edge0**2
    macs = first_conv + 9 * features0**2 * edge0**2 + features0 * num_classes * edge0**2
    for level in range(1, depth + 1):
        (before, _), (features, edge) = levels[level - 1], levels[level]
        macs += 9 * before * features * edge**2 + 9 * features**2 * edge**2
    for features, edge in levels[:depth]:
        macs += 2 * features**2 * edge**2 + 27 * features**2 * edge**2  # up-conv; convs 2f -> f, f -> f
    return 6 * macs - 2 * first_conv


def parameter_count(depth: int, in_channels: int, num_classes: int, width: int = BASE_WIDTH) -> int:
    """Parameters of the padded U-Net with a norm (convs without bias, 2 per norm channel)."""
    widths = [width * 2**level for level in range(depth + 1)]

    def double_conv(cin: int, cout: int) -> int:
        return 9 * cin * cout + 9 * cout * cout + 4 * cout

    total = double_conv(in_channels, widths[0]) + widths[0] * num_classes + num_classes
    total += sum(double_conv(widths[level - 1], widths[level]) for level in range(1, depth + 1))
    for level in range(depth):  # up-conv (2x2, bias), then a double conv of the concat
        up = 4 * widths[level + 1] * widths[level] + widths[level]
        total += up + double_conv(2 * widths[level], widths[level])
    return total


@dataclass(frozen=True)
class Net:
    """A padded U-Net of ``width`` first-level features at one tile size: what a training step costs."""

    tile_px: int
    depth: int
    in_channels: int
    num_classes: int
    width: int = BASE_WIDTH  # model.base_width

    @property
    def flops(self) -> int:
        """Training FLOPs per sample."""
        return training_flops(self.tile_px, self.depth, self.in_channels, self.num_classes, self.width)

    def memory_bytes(self, batch: int, precision: str) -> float:
        """Peak GPU memory of a training step of ``batch`` samples."""
        activations = activation_elements(self.tile_px, self.depth, self.in_channels, self.num_classes, self.width)
        fixed = BYTES_PER_PARAMETER * parameter_count(self.depth, self.in_channels, self.num_classes, self.width)
        return fixed + batch * BYTES_PER_ELEMENT[precision] * activations

    def step_s(self, batch: int, budget: Budget) -> float:
        """Seconds of a training step of ``batch`` samples at the budget's machine speed."""
        return STEP_OVERHEAD_S[budget.device] + batch * self.flops / budget.flops_per_s
