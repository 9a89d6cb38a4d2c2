"""Which tiles an image is predicted in: the model's geometry, a memory budget, the tile plan.

Every forward costs time per input pixel, so the cheapest plan computes the fewest pixels
that the exact result needs: one pass over the whole image when the activations fit the
memory budget (``--memory-gb``; by default ``DEFAULT_CPU_MEMORY_GB`` on a CPU, a share of
the free memory on a GPU), else the largest tiles that fit, overlapping only by what the
seams need (:mod:`unetdist.inference.tiling`)::

    geometry = ModelGeometry.of(model)
    plan = plan_tiles(geometry, height, width, tile=None, overlap=None, memory_bytes=3 * 2**30)
    batch = tiles_per_batch(geometry, plan, memory_bytes, requested=8)

Padded models (the ``padded`` preset) use the context plan with the network's receptive-field
radius as the context: the result equals one pass over the whole image, however it is tiled.
A padded model of unknown receptive field, an explicit ``overlap``, or an explicit tile too
small for the context margins, gets today's Gaussian sliding window. Valid-conv models use
overlap-tile, exact by construction.

The memory estimate is measured, not derived: a U-Net's inference-mode forward peaks at about
``ACTIVATION_BYTES_PER_PIXEL_WIDTH`` bytes per input pixel per unit of ``base_width`` (float32,
CPU, the presets at depths 2-4: 32-48).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from unetdist.inference import tiling
from unetdist.model import sizes

log = logging.getLogger(__name__)

DEFAULT_OVERLAP = 0.25  # the Gaussian sliding window's, where it is used
DEFAULT_PADDED_TILE = 512  # the Gaussian sliding window's tile when none is given
DEFAULT_CPU_MEMORY_GB = 3.0
GPU_MEMORY_SHARE = 0.5  # of the device's free memory when the predictor is made
ACTIVATION_BYTES_PER_PIXEL_WIDTH = 48
UNKNOWN_BASE_WIDTH = 32  # a model without base_width: the padded preset's default
# A context tile at least this many times its context keeps at least half of itself per axis.
MIN_TILE_PER_CONTEXT = 4


@dataclass(frozen=True)
class ModelGeometry:
    """What tiling needs to know about a model; read from a UNet's attributes.

    Any module with ``padded``, ``depth``, ``in_channels``, ``num_classes`` and
    ``output_size(n)`` works; missing attributes mean a size-preserving model without
    pooling constraints. ``context``: a padded model's receptive-field radius rounded up to
    the pooling period (None: unknown, not one of our presets); 0 for valid-conv models.
    """

    padded: bool
    pool_period: int
    in_channels: int | None
    num_classes: int | None
    output_size: Callable[[int], int]
    trailing_context: int = 0
    context: int | None = None
    base_width: int | None = None

    @classmethod
    def of(cls, model: nn.Module) -> ModelGeometry:
        depth = int(getattr(model, "depth", 0) or 0)
        output_size = getattr(model, "output_size", None)
        padded = bool(getattr(model, "padded", True))
        return cls(
            padded=padded,
            pool_period=2**depth,
            in_channels=getattr(model, "in_channels", None),
            num_classes=getattr(model, "num_classes", None),
            output_size=output_size if callable(output_size) else (lambda size: size),
            trailing_context=0 if padded else _trailing_context(model),
            context=_padded_context(model, 2**depth) if padded else 0,
            base_width=getattr(model, "base_width", None),
        )

    def is_valid_tile(self, size: int) -> bool:
        try:
            self.output_size(size)
        except ValueError:
            return False
        return True

    def kept_step(self, tile: int) -> int:
        """Output pixels per tile and axis that overlap-tile keeps (see tiling)."""
        return (self.output_size(tile) - self.trailing_context) // self.pool_period * self.pool_period

    @property
    def bytes_per_pixel(self) -> int:
        """Estimated peak memory of a forward, per input pixel (see the module docstring)."""
        width = self.base_width or UNKNOWN_BASE_WIDTH
        buffers = 16 * ((self.in_channels or 1) + (self.num_classes or 2))  # input, output, stitching
        return ACTIVATION_BYTES_PER_PIXEL_WIDTH * width + buffers


def _trailing_context(model: nn.Module) -> int:
    """Bottom/right output rows of a valid-conv tile that depend on pixels beyond the tile.

    An up-convolution with padding (the article's k3 s2 p1 output_padding 1) makes its
    last output row from an input row that is not there: one inexact row. Going up a
    level doubles the inexact rows and adds that one; each valid 3x3 conv after it adds
    one more. The paper's k2 s2 up-convolution is exact: 0.
    """
    inexact = 0
    for level in getattr(model, "decoder", []):
        up = getattr(level, "up", None)
        sees_past_end = isinstance(up, nn.ConvTranspose2d) and up.padding[0] > 0
        inexact = 2 * inexact + int(sees_past_end)
        if inexact:
            inexact += sum(isinstance(layer, nn.Conv2d) for layer in level.conv.modules())
    return inexact


def _padded_context(model: nn.Module, pool_period: int) -> int | None:
    """How far the zero padding at a tile edge reaches into one of our padded U-Nets' output,
    rounded up to the pooling period; None for another model.

    Followed level by level in that level's pixels: each 3x3 convolution reaches one pixel
    further, a 2x2 max-pool halves the reach (rounded up), an up-convolution doubles it, and a
    decoder level reaches as far as the larger of its input and its skip connection.
    """
    depth = getattr(model, "depth", None)
    encoder = getattr(model, "encoder", None)
    if getattr(model, "preset", None) not in sizes.PRESETS or not isinstance(depth, int) or not encoder:
        return None
    convs = sum(
        isinstance(layer, nn.Conv2d) and layer.kernel_size == (3, 3) for layer in encoder[0].modules()
    )
    reach, skips = 0, []
    for level in range(depth + 1):  # the last one: the bottleneck
        reach = (math.ceil(reach / 2) if level else 0) + convs
        skips.append(reach)
    for level in reversed(range(depth)):
        reach = max(2 * reach, skips[level]) + convs
    return math.ceil(reach / pool_period) * pool_period


def default_memory_bytes(device: torch.device) -> int:
    """The activation budget of one forward: ``DEFAULT_CPU_MEMORY_GB``, or a share of a GPU's free memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * GPU_MEMORY_SHARE)
    return int(DEFAULT_CPU_MEMORY_GB * 2**30)


def plan_tiles(
    geometry: ModelGeometry,
    height: int,
    width: int,
    *,
    tile: int | None,
    overlap: float | None,
    memory_bytes: int,
    max_block: int | None = None,
) -> tiling.TilePlan:
    """The plan of an HxW image (see the module docstring). ``tile``: a square input tile to use
    (None: from the budget); ``overlap``: the Gaussian sliding window's, padded models only;
    ``max_block``: tiles keep at most about this many output pixels per axis (a Zarr image's
    blocks, which are split over the ranks, stay that small however much memory there is)."""
    if tile is not None:
        # output_size raises a ValueError naming the nearest valid sizes
        geometry.output_size(tile)
        if not geometry.padded and geometry.kept_step(tile) < 1:
            raise ValueError(
                f"tile {tile} gives fewer output pixels than the pooling period {geometry.pool_period}"
            )
    if not geometry.padded:
        if tile is None:
            sides = [side if max_block is None else min(side, max_block) for side in (height, width)]
            shape = _valid_tile_shape(geometry, *sides, memory_bytes)
        else:
            shape = (tile, tile)
        outputs = tuple(geometry.output_size(size) for size in shape)
        return tiling.overlap_tile_plan(
            height, width, shape, outputs, geometry.pool_period, geometry.trailing_context
        )
    period, context = geometry.pool_period, geometry.context
    if overlap is None and context is not None:
        if tile is None:
            reach = None if max_block is None else max_block + 2 * context
            sides = [side if reach is None else min(side, reach) for side in (height, width)]
            shape = _padded_tile_shape(geometry, *sides, memory_bytes)
            return tiling.context_tile_plan(height, width, shape, context, period)
        whole = [math.ceil(side / period) * period for side in (height, width)]
        if tile >= MIN_TILE_PER_CONTEXT * context or all(tile >= side for side in whole):
            return tiling.context_tile_plan(height, width, tile, context, period)
        log.debug("tile %d is small for context margins of %d px: Gaussian sliding window", tile, context)
    if tile is None:
        tile = min(math.ceil(max(height, width) / period) * period, DEFAULT_PADDED_TILE)
    overlap = DEFAULT_OVERLAP if overlap is None else overlap
    return tiling.sliding_window_plan(height, width, tile, overlap, period)


def tiles_per_batch(geometry: ModelGeometry, plan: tiling.TilePlan, memory_bytes: int, requested: int) -> int:
    """``requested`` tiles per forward, fewer where the budget holds fewer (at least one)."""
    tile_pixels = plan.input_shape[0] * plan.input_shape[1]
    return max(1, min(requested, memory_bytes // (tile_pixels * geometry.bytes_per_pixel)))


def _padded_tile_shape(
    geometry: ModelGeometry, height: int, width: int, memory_bytes: int
) -> tuple[int, int]:
    """The whole image (rounded up to the pooling period) if it fits, else the largest tiles that do."""
    period, context = geometry.pool_period, geometry.context or 0
    pixels = memory_bytes // geometry.bytes_per_pixel
    whole = tuple(math.ceil(side / period) * period for side in (height, width))
    smallest = max(math.ceil(MIN_TILE_PER_CONTEXT * context / period) * period, 2 * period)
    return _fit(whole, pixels, smallest, lambda limit: max(limit // period * period, period))


def _valid_tile_shape(
    geometry: ModelGeometry, height: int, width: int, memory_bytes: int
) -> tuple[int, int]:
    """Per axis the smallest valid tile whose kept output covers the side, if both fit the budget
    (one pass), else the largest valid tiles that do."""
    pixels = memory_bytes // geometry.bytes_per_pixel
    whole = tuple(_covering_tile(geometry, side) for side in (height, width))
    smallest = _covering_tile(geometry, geometry.pool_period)

    def valid_at_most(limit: int) -> int:
        return next((size for size in range(limit, smallest, -1) if geometry.is_valid_tile(size)), smallest)

    return _fit(whole, pixels, smallest, valid_at_most)


def _covering_tile(geometry: ModelGeometry, length: int) -> int:
    """The smallest valid input tile that keeps at least ``length`` output pixels."""
    size = max(length, 1)
    while not (geometry.is_valid_tile(size) and geometry.kept_step(size) >= length):
        size += 1
    return size


def _fit(
    whole: tuple[int, int], pixels: int, smallest: int, round_down: Callable[[int], int]
) -> tuple[int, int]:
    """The tile shape: ``whole`` if it has at most ``pixels``; else the short side whole when a
    square would not be smaller, with as long a tile as fits; else the largest square.
    ``round_down(n)``: the largest usable side up to n; no side below ``smallest``."""
    if whole[0] * whole[1] <= pixels:
        return whole
    side = max(round_down(math.isqrt(pixels)), smallest)
    short_axis = 0 if whole[0] <= whole[1] else 1
    if whole[short_axis] <= side:
        long_side = min(max(round_down(pixels // whole[short_axis]), side), whole[1 - short_axis])
        return (whole[0], long_side) if short_axis == 0 else (long_side, whole[1])
    return side, side
