"""Which tiles an image is predicted in: the model's geometry, a memory budget, the tile plan.

Every forward costs time per input pixel, so the cheapest plan computes the fewest pixels
that the exact result needs: one pass over the whole image when the activations fit the
memory budget (``--memory-gb``; by default ``DEFAULT_CPU_MEMORY_GB`` on a CPU, a share of
the free memory on a GPU), else the largest tiles that fit, overlapping only by what the
seams need (:mod:`unetdist.inference.tiling`)::

    geometry = ModelGeometry.of(model)
    plan = plan_tiles(geometry, height, width, tile=None, overlap=None, memory_bytes=3 * 2**30)
    plan = plan_tiles(geometry, depth, height, width, ...)           # a 3-D model's volume
    batch = tiles_per_batch(geometry, plan, memory_bytes, requested=8)

A 3-D model (``spatial_dims == 3``) is planned by the same rules per axis: each axis has its own
pooling period, valid sizes, trailing context and receptive field (z differs when it pools at
fewer levels, ``z_pools``), and the budget counts voxels.

Padded models (the ``padded`` preset) use the context plan with the network's receptive-field
radius as the context: the result equals one pass over the whole image, however it is tiled.
A padded model of unknown receptive field, an explicit ``overlap``, or an explicit tile too
small for the context margins, gets today's Gaussian sliding window. Valid-conv models use
overlap-tile, exact by construction.

The memory estimate is measured, not derived: a U-Net's inference-mode forward peaks at about
``ACTIVATION_BYTES_PER_PIXEL_WIDTH`` bytes per input pixel per unit of ``base_width`` (float32,
CPU, the presets at depths 2-4: 32-48). A 3-D U-Net has as many channels per voxel and pools
more per level, so the same figure per voxel is an upper bound.
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
class AxisGeometry:
    """What tiling needs to know about one spatial axis of a model.

    ``pool_period``: ``2**pools`` (tiles start on its grid); ``output_size(n)``: the logits'
    length for an input of ``n`` (a ValueError naming the nearest valid sizes when ``n`` is not
    valid); ``trailing_context``: inexact output pixels at a tile's far end (valid convs);
    ``context``: a padded model's receptive-field radius along the axis rounded up to the
    period (None: unknown), 0 for valid-conv models.
    """

    pool_period: int
    output_size: Callable[[int], int]
    trailing_context: int = 0
    context: int | None = None

    def is_valid_tile(self, size: int) -> bool:
        try:
            self.output_size(size)
        except ValueError:
            return False
        return True

    def kept_step(self, tile: int) -> int:
        """Output pixels per tile that overlap-tile keeps (see tiling)."""
        return (self.output_size(tile) - self.trailing_context) // self.pool_period * self.pool_period


@dataclass(frozen=True)
class ModelGeometry:
    """What tiling needs to know about a model; read from a UNet's attributes.

    Any module with ``padded``, ``depth``, ``in_channels``, ``num_classes`` and
    ``output_size(n)`` works (``spatial_dims`` and ``z_pools`` for a 3-D one); missing attributes
    mean a 2-D size-preserving model without pooling constraints. ``axes``: one
    :class:`AxisGeometry` per spatial axis (z, y, x or y, x); the 2-D names ``pool_period``,
    ``output_size``, ``trailing_context``, ``context``, ``is_valid_tile`` and ``kept_step`` are
    the in-plane (x) axis's.
    """

    padded: bool
    in_channels: int | None
    num_classes: int | None
    axes: tuple[AxisGeometry, ...]
    base_width: int | None = None

    @classmethod
    def of(cls, model: nn.Module) -> ModelGeometry:
        depth = int(getattr(model, "depth", 0) or 0)
        spatial_dims = int(getattr(model, "spatial_dims", 2) or 2)
        padded = bool(getattr(model, "padded", True))
        pools = [depth] * spatial_dims
        if spatial_dims == 3:
            pools[0] = z_pools_of(model)
        periods = tuple(2**levels for levels in pools)
        trailing = (0,) * spatial_dims if padded else _trailing_context(model, spatial_dims)
        contexts = _padded_context(model, periods) if padded else (0,) * spatial_dims
        return cls(
            padded=padded,
            in_channels=getattr(model, "in_channels", None),
            num_classes=getattr(model, "num_classes", None),
            axes=tuple(
                AxisGeometry(
                    pool_period=periods[axis],
                    output_size=_axis_output_size(model, pools[axis], depth),
                    trailing_context=trailing[axis],
                    context=None if contexts is None else contexts[axis],
                )
                for axis in range(spatial_dims)
            ),
            base_width=getattr(model, "base_width", None),
        )

    @property
    def spatial_dims(self) -> int:
        return len(self.axes)

    @property
    def pool_period(self) -> int:
        return self.axes[-1].pool_period

    @property
    def output_size(self) -> Callable[[int], int]:
        return self.axes[-1].output_size

    @property
    def trailing_context(self) -> int:
        return self.axes[-1].trailing_context

    @property
    def context(self) -> int | None:
        return self.axes[-1].context

    @property
    def contexts(self) -> tuple[int, ...] | None:
        found = tuple(axis.context for axis in self.axes)
        return None if None in found else found  # type: ignore[return-value]

    def is_valid_tile(self, size: int) -> bool:
        return self.axes[-1].is_valid_tile(size)

    def kept_step(self, tile: int) -> int:
        """Output pixels per tile and in-plane axis that overlap-tile keeps (see tiling)."""
        return self.axes[-1].kept_step(tile)

    @property
    def bytes_per_pixel(self) -> int:
        """Estimated peak memory of a forward, per input pixel (see the module docstring)."""
        width = self.base_width or UNKNOWN_BASE_WIDTH
        buffers = 16 * ((self.in_channels or 1) + (self.num_classes or 2))  # input, output, stitching
        return ACTIVATION_BYTES_PER_PIXEL_WIDTH * width + buffers


def z_pools_of(model: nn.Module) -> int:
    """How many levels of a 3-D model pool z (the deepest ones): ``model.z_pools``, None or
    negative meaning every level."""
    depth = int(getattr(model, "depth", 0) or 0)
    z_pools = getattr(model, "z_pools", None)
    return depth if z_pools is None or z_pools < 0 else min(int(z_pools), depth)


def _axis_output_size(model: nn.Module, pools: int, depth: int) -> Callable[[int], int]:
    """The logits' length along an axis pooled at the deepest ``pools`` levels: the model's own
    ``output_size`` for a fully pooled axis, else the size arithmetic for that axis."""
    output_size = getattr(model, "output_size", None)
    if not callable(output_size):
        return lambda size: size
    if pools == depth:
        return output_size
    preset = model.preset
    return lambda size: sizes.output_size(preset, depth, size, pools=pools)


def _spatial(value: int | tuple[int, ...], axis: int, ndim: int) -> int:
    """A module attribute's value along ``axis`` (torch stores a square 2-D kernel as 2 or (2, 2))."""
    return value if isinstance(value, int) else value[axis - ndim]


def _trailing_context(model: nn.Module, ndim: int) -> tuple[int, ...]:
    """Per axis the output rows at the far end of a valid-conv tile that depend on pixels beyond it.

    An up-convolution with padding (the article's k3 s2 p1 output_padding 1) makes its
    last output row from an input row that is not there: one inexact row. Going up a
    level doubles the inexact rows and adds that one; each valid 3x3 conv after it adds
    one more. The paper's k2 s2 up-convolution is exact: 0. An axis a level does not pool
    (its up-convolution's stride 1 there) neither doubles nor sees past its end.
    """
    found = []
    for axis in range(ndim):
        inexact = 0
        for level in getattr(model, "decoder", []):
            up = getattr(level, "up", None)
            if isinstance(up, nn.modules.conv._ConvTransposeNd):
                stride = _spatial(up.stride, axis, ndim)
                sees_past_end = stride > 1 and _spatial(up.padding, axis, ndim) > 0
                inexact = stride * inexact + int(sees_past_end)
            if inexact:
                inexact += sum(_conv_reach(layer, axis, ndim) for layer in level.conv.modules())
        found.append(inexact)
    return tuple(found)


def _conv_reach(layer: nn.Module, axis: int, ndim: int) -> int:
    """How many pixels along ``axis`` a (non-transposed) convolution looks past its centre."""
    if not isinstance(layer, nn.modules.conv._ConvNd) or isinstance(layer, nn.modules.conv._ConvTransposeNd):
        return 0
    return (_spatial(layer.kernel_size, axis, ndim) - 1) // 2 * _spatial(layer.dilation, axis, ndim)


def _padded_context(model: nn.Module, periods: tuple[int, ...]) -> tuple[int, ...] | None:
    """How far the zero padding at a tile edge reaches into one of our padded U-Nets' output, per
    axis, rounded up to that axis's pooling period; None for another model.

    Followed level by level in that level's pixels: each 3x3 convolution reaches one pixel
    further, a 2x2 max-pool halves the reach (rounded up), an up-convolution doubles it, and a
    decoder level reaches as far as the larger of its input and its skip connection. Read from
    the modules, so an axis a level does not pool (stride 1 there) keeps its reach.
    """
    depth = getattr(model, "depth", None)
    encoder, bottleneck = getattr(model, "encoder", None), getattr(model, "bottleneck", None)
    if getattr(model, "preset", None) not in sizes.PRESETS or not isinstance(depth, int) or not encoder:
        return None
    if bottleneck is None:
        return None
    ndim = len(periods)
    contexts = []
    for axis, period in enumerate(periods):
        reach, skips = 0, []
        for level in [*encoder, bottleneck]:
            reach = _reach_through(level, reach, axis, ndim)
            skips.append(reach)
        for level, skip in zip(model.decoder, reversed(skips[:-1]), strict=True):
            reach = max(_spatial(level.up.stride, axis, ndim) * reach, skip)
            reach = _reach_through(level.conv, reach, axis, ndim)
        contexts.append(math.ceil(reach / period) * period)
    return tuple(contexts)


def _reach_through(block: nn.Module, reach: int, axis: int, ndim: int) -> int:
    for layer in block.modules():
        if isinstance(layer, nn.modules.pooling._MaxPoolNd):
            reach = math.ceil(reach / _spatial(layer.stride or layer.kernel_size, axis, ndim))
        else:  # a padded model's convolutions all pad: each reaches its radius further
            reach += _conv_reach(layer, axis, ndim)
    return reach


def default_memory_bytes(device: torch.device) -> int:
    """The activation budget of one forward: ``DEFAULT_CPU_MEMORY_GB``, or a share of a GPU's free memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * GPU_MEMORY_SHARE)
    return int(DEFAULT_CPU_MEMORY_GB * 2**30)


def plan_tiles(
    geometry: ModelGeometry,
    *shape: int,
    tile: int | tuple[int, ...] | None,
    overlap: float | None,
    memory_bytes: int,
    max_block: int | tuple[int, ...] | None = None,
) -> tiling.TilePlan:
    """The plan of an image of ``shape`` (height, width; a volume: depth, height, width; see the
    module docstring). ``tile``: an input tile to use, one side for all axes or one per axis (None:
    from the budget); ``overlap``: the Gaussian sliding window's, padded models only;
    ``max_block``: tiles keep at most about this many output pixels per axis (a Zarr image's
    blocks, which are split over the ranks, stay that small however much memory there is)."""
    ndim = geometry.spatial_dims
    if len(shape) != ndim:
        raise ValueError(f"a {ndim}-D model plans {ndim} spatial axes, got the shape {shape}")
    axes = geometry.axes
    tile_shape = None if tile is None else tiling.as_shape(tile, ndim)
    blocks = (None,) * ndim if max_block is None else tiling.as_shape(max_block, ndim)
    if tile_shape is not None:
        for name, axis, size in zip(_axis_names(ndim), axes, tile_shape, strict=True):
            _check_tile(name, axis, size, geometry.padded)
    periods = tuple(axis.pool_period for axis in axes)
    if not geometry.padded:
        if tile_shape is None:
            sides = [side if block is None else min(side, block)
                     for side, block in zip(shape, blocks, strict=True)]  # fmt: skip
            tile_shape = _valid_tile_shape(geometry, sides, memory_bytes)
        outputs = tuple(axis.output_size(size) for axis, size in zip(axes, tile_shape, strict=True))
        trailing = tuple(axis.trailing_context for axis in axes)
        return tiling.overlap_tile_plan(shape, tile_shape, outputs, periods, trailing)
    contexts = geometry.contexts
    if overlap is None and contexts is not None:
        if tile_shape is None:
            sides = [side if block is None else min(side, block + 2 * context)
                     for side, block, context in zip(shape, blocks, contexts, strict=True)]  # fmt: skip
            tile_shape = _padded_tile_shape(geometry, sides, memory_bytes)
            if ndim == 2 or math.prod(tile_shape) * geometry.bytes_per_pixel <= memory_bytes:
                return tiling.context_tile_plan(shape, tile_shape, contexts, periods)
            # A volume whose smallest exact tile (MIN_TILE_PER_CONTEXT contexts a side, a cube of
            # 64 contexts) outgrows the budget: the Gaussian window over what fits (nnU-Net's way).
            # An image's square of 16 contexts is a few hundred MB at most: 2-D keeps its exact plan.
            log.info("tiles of %s do not fit %.2f GB: a Gaussian sliding window", tile_shape,
                     memory_bytes / 2**30)  # fmt: skip
            tile_shape = _padded_tile_shape(geometry, sides, memory_bytes, context_free=True)
            return tiling.sliding_window_plan(shape, tile_shape, DEFAULT_OVERLAP, periods)
        whole = [math.ceil(side / period) * period for side, period in zip(shape, periods, strict=True)]
        # per axis as in 2-D: room for the context margins, or the whole side in one tile
        pairs = zip(tile_shape, contexts, strict=True)
        roomy = all(size >= MIN_TILE_PER_CONTEXT * context for size, context in pairs)
        if roomy or all(size >= side for size, side in zip(tile_shape, whole, strict=True)):
            return tiling.context_tile_plan(shape, tile_shape, contexts, periods)
        log.debug("tile %s is small for context margins of %s px: Gaussian sliding window", tile_shape,
                  contexts)  # fmt: skip
    if tile_shape is None:
        if ndim == 2:  # the 2-D default, as it always was
            period = periods[-1]
            tile_shape = (min(math.ceil(max(shape) / period) * period, DEFAULT_PADDED_TILE),) * 2
        else:  # a volume: as much as the budget holds
            tile_shape = _padded_tile_shape(geometry, list(shape), memory_bytes, context_free=True)
    overlap = DEFAULT_OVERLAP if overlap is None else overlap
    return tiling.sliding_window_plan(shape, tile_shape, overlap, periods)


def _axis_names(ndim: int) -> tuple[str, ...]:
    return ("tile", "tile") if ndim == 2 else ("tile depth (z)", "tile (y)", "tile (x)")


def _check_tile(name: str, axis: AxisGeometry, size: int, padded: bool) -> None:
    try:
        axis.output_size(size)  # raises a ValueError naming the nearest valid sizes
    except ValueError as err:
        raise ValueError(f"{name}: {err}" if name != "tile" else str(err)) from None
    if not padded and axis.kept_step(size) < 1:
        raise ValueError(
            f"{name} {size} gives fewer output pixels than the pooling period {axis.pool_period}"
        )


def tiles_per_batch(geometry: ModelGeometry, plan: tiling.TilePlan, memory_bytes: int, requested: int) -> int:
    """``requested`` tiles per forward, fewer where the budget holds fewer (at least one)."""
    tile_pixels = math.prod(plan.input_shape)
    return max(1, min(requested, memory_bytes // (tile_pixels * geometry.bytes_per_pixel)))


def _padded_tile_shape(
    geometry: ModelGeometry, sides: list[int], memory_bytes: int, context_free: bool = False
) -> tuple[int, ...]:
    """The whole image (rounded up to the pooling period) if it fits, else the largest tiles that
    do. ``context_free``: no context margins to leave room for (the Gaussian sliding window)."""
    pixels = memory_bytes // geometry.bytes_per_pixel
    periods = [axis.pool_period for axis in geometry.axes]
    contexts = [0 if context_free else axis.context or 0 for axis in geometry.axes]
    whole = tuple(math.ceil(side / period) * period for side, period in zip(sides, periods, strict=True))
    smallest = [max(math.ceil(MIN_TILE_PER_CONTEXT * context / period) * period, 2 * period)
                for context, period in zip(contexts, periods, strict=True)]  # fmt: skip
    def on_grid(axis: int, limit: int) -> int:
        return max(limit // periods[axis] * periods[axis], periods[axis])

    return _fit(whole, pixels, smallest, on_grid)


def _valid_tile_shape(geometry: ModelGeometry, sides: list[int], memory_bytes: int) -> tuple[int, ...]:
    """Per axis the smallest valid tile whose kept output covers the side, if all fit the budget
    (one pass), else the largest valid tiles that do."""
    pixels = memory_bytes // geometry.bytes_per_pixel
    axes = geometry.axes
    whole = tuple(_covering_tile(axis, side) for axis, side in zip(axes, sides, strict=True))
    smallest = [_covering_tile(axis, axis.pool_period) for axis in axes]

    def valid_at_most(axis: int, limit: int) -> int:
        valid = axes[axis].is_valid_tile
        return next((size for size in range(limit, smallest[axis], -1) if valid(size)), smallest[axis])

    return _fit(whole, pixels, smallest, valid_at_most)


def _covering_tile(axis: AxisGeometry, length: int) -> int:
    """The smallest valid input tile that keeps at least ``length`` output pixels along ``axis``."""
    size = max(length, 1)
    while not (axis.is_valid_tile(size) and axis.kept_step(size) >= length):
        size += 1
    return size


def _fit(
    whole: tuple[int, ...], pixels: int, smallest: list[int], round_down: Callable[[int, int], int]
) -> tuple[int, ...]:
    """The tile shape: ``whole`` if it has at most ``pixels``; else a cube (square) as large as fits,
    except that an axis no longer than that side is taken whole (shortest first) and the others
    share what it leaves. ``round_down(axis, n)``: the largest usable size up to n along ``axis``;
    no size below ``smallest[axis]``."""
    if math.prod(whole) <= pixels:
        return whole
    ndim = len(whole)
    limit = _integer_root(pixels, ndim)
    side = [max(round_down(axis, limit), smallest[axis]) for axis in range(ndim)]
    taken: dict[int, int] = {}
    while True:
        rest = [axis for axis in range(ndim) if axis not in taken]
        short = [axis for axis in rest if whole[axis] <= side[axis]]
        if not short or len(short) == len(rest):
            break
        shortest = min(short, key=lambda axis: whole[axis])  # ties: the first axis
        taken[shortest] = whole[shortest]
        limit = _integer_root(pixels // math.prod(taken.values()), len(rest) - 1)
        side = [max(round_down(axis, limit), side[axis]) for axis in range(ndim)]
    return tuple(taken.get(axis, min(side[axis], whole[axis])) for axis in range(ndim))


def _integer_root(value: int, degree: int) -> int:
    """The largest n with n**degree <= value."""
    if degree == 1:
        return value
    if degree == 2:
        return math.isqrt(value)
    root = int(round(value ** (1.0 / degree)))
    while root**degree > value:
        root -= 1
    while (root + 1) ** degree <= value:
        root += 1
    return root
