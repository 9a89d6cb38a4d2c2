"""Tile geometry for whole-image inference: plain integer/numpy arithmetic, no torch.

A plan places model inputs along each image axis on its own (:class:`AxisTiles`; tiles may be
rectangular, so a 700 x 1100 image can be one 704 x 1104 pass). An image has 2 spatial axes
(y, x) or, a volume, 3 (z, y, x); every function here takes shapes of either, the spatial axes
trailing, and a block or window is the flat tuple of its ``(begin, end)`` per axis:
``(top, bottom, left, right)`` or ``(z0, z1, top, bottom, left, right)``. Each axis has its own
pooling period (``2**pools``: a volume whose z pools at fewer levels has a shorter one along z),
so every rule below holds per axis. Three strategies:

``overlap-tile`` (valid-conv presets ``paper``/``article``, Ronneberger et al. 2015, Fig. 2):
output tiles laid edge to edge; each input tile is the output tile grown by the model's
context margin on every side; outside the image the input is the image mirrored at its
border. The step between tiles is the output tile size rounded down to a multiple of
``2**depth`` (the max-pool period): only then does every tile see the same pooling grid
as a single pass over the whole mirrored image, so the stitched result *equals* that
pass. (The paper's 572 tile gives 388 output pixels; 384 of them are kept.) The
``article`` preset's up-convolution (k3 s2 p1, output_padding 1) sees past the end of its
input, so the last few output rows/columns of a tile depend on what lies beyond it; those
``trailing_context`` pixels are dropped too and come from the next tile.

``context`` (``padded`` preset, the default): the same idea for a same-padding network. A
tile's outputs within ``context`` pixels of a tile edge that is not an image edge feel the
zero padding there, so they are dropped and come from the neighbour, whose input reaches
``context`` pixels past them; tiles start on the pooling grid, and the first and last tile
of a row start and end at the image border (the last one moved inwards), as one pass over
the image does. With ``context`` the receptive-field radius of the network (see
:mod:`unetdist.inference.planning`) the stitched result *equals* one pass over the whole image
(mirrored up to a multiple of the pooling period), and the overlap is only where tiles meet.

``sliding-window`` (``padded`` preset with an explicit ``overlap``, or a model whose receptive
field is unknown): input tile == output tile, neighbours overlap by ``overlap`` of the tile,
and each tile's probabilities are weighted by a Gaussian that is highest at the tile centre,
so the zero-padded tile borders count least and no seams show.

A plan covers the whole image; ``tiles_for_block`` returns the tiles a box-shaped output
block needs, so a large image can be predicted block by block with the same result.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np

# The Gaussian's sigma as a fraction of the tile side (nnU-Net's choice): the centre
# dominates, the border still gets a weight > 0 so the image corners are covered.
GAUSSIAN_SIGMA_FRACTION = 1.0 / 8.0
# Floor of the window weight relative to its peak: keeps the weighted average defined
# (and finite in fp16) where only a tile's far border covers a pixel.
GAUSSIAN_MIN_WEIGHT = 1e-3

Shape = tuple[int, ...]
TileSize = int | Shape  # a square (2-D) side, or a size per spatial axis
Bounds = tuple[int, ...]  # (begin, end) per spatial axis, flat: (top, bottom, left, right)


@dataclass(frozen=True)
class Tile:
    """One model input: ``input_start`` per axis in image coordinates (may reach outside:
    mirrored); ``keep``: per axis the ``[begin, end)`` output pixels this tile contributes
    (inside the image). The 2-D names (``input_top``, ``keep_left``, ...) read the last two axes."""

    input_start: Shape
    keep: tuple[tuple[int, int], ...]

    @property
    def input_top(self) -> int:
        return self.input_start[-2]

    @property
    def input_left(self) -> int:
        return self.input_start[-1]

    @property
    def keep_top(self) -> int:
        return self.keep[-2][0]

    @property
    def keep_bottom(self) -> int:
        return self.keep[-2][1]

    @property
    def keep_left(self) -> int:
        return self.keep[-1][0]

    @property
    def keep_right(self) -> int:
        return self.keep[-1][1]


@dataclass(frozen=True)
class AxisTiles:
    """The tiles along one image axis of ``length`` pixels.

    ``input_size``/``output_size``: the model's input and logits length along the axis;
    ``starts``: where each tile's input starts (image coordinates; mirrored outside);
    ``kept``: the ``[begin, end)`` output pixels each tile contributes (inside the image);
    ``step``: the distance between regular tiles (block alignment, see ``aligned_block_size``).
    """

    length: int
    input_size: int
    output_size: int
    starts: tuple[int, ...]
    kept: tuple[tuple[int, int], ...]
    step: int

    @property
    def margin(self) -> int:
        """Output pixel 0 of a tile sits at image position ``start + margin``."""
        return (self.input_size - self.output_size) // 2

    def meeting(self, low: int, high: int) -> list[int]:
        """The tiles whose kept span meets ``[low, high)``."""
        return [index for index, (begin, end) in enumerate(self.kept) if begin < high and end > low]


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of one image go: one :class:`AxisTiles` per spatial axis, the tiles their
    product (``rows`` and ``cols``: the last two, y and x).

    ``blend``: True for the Gaussian sliding window (overlapping outputs are averaged), False
    for overlap-tile and context plans (each output pixel comes from exactly one tile).
    """

    axes: tuple[AxisTiles, ...]
    blend: bool

    @property
    def shape(self) -> Shape:
        return tuple(axis.length for axis in self.axes)

    @property
    def height(self) -> int:
        return self.axes[-2].length

    @property
    def width(self) -> int:
        return self.axes[-1].length

    @property
    def rows(self) -> AxisTiles:
        return self.axes[-2]

    @property
    def cols(self) -> AxisTiles:
        return self.axes[-1]

    @property
    def num_tiles(self) -> int:
        return math.prod(len(axis.starts) for axis in self.axes)

    @property
    def input_shape(self) -> Shape:
        return tuple(axis.input_size for axis in self.axes)

    @property
    def step(self) -> int:
        """The larger in-plane step: output blocks of a multiple of it cut through few tiles."""
        return max(self.rows.step, self.cols.step)

    def tiles_for_block(self, *bounds: int) -> list[Tile]:
        """Tiles whose kept output meets the block ``bounds`` (``top, bottom, left, right``, a
        ``z0, z1`` in front for a volume), the last axis varying fastest."""
        spans = _pairs(bounds, len(self.axes))
        meeting = [axis.meeting(low, high) for axis, (low, high) in zip(self.axes, spans, strict=True)]
        return [
            Tile(
                input_start=tuple(axis.starts[i] for axis, i in zip(self.axes, indices, strict=True)),
                keep=tuple(axis.kept[i] for axis, i in zip(self.axes, indices, strict=True)),
            )
            for indices in itertools.product(*meeting)
        ]


def as_pair(size: TileSize) -> tuple[int, int]:
    """``(height, width)`` of a tile size given as one side or a pair."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def as_shape(size: TileSize, ndim: int) -> Shape:
    """A size per axis of ``ndim`` axes: one side for all, or a tuple of ``ndim``."""
    if isinstance(size, int):
        return (size,) * ndim
    if len(size) != ndim:
        raise ValueError(f"expected {ndim} sizes (one per spatial axis), got {tuple(size)}")
    return tuple(int(side) for side in size)


def _pairs(bounds: Bounds, ndim: int) -> list[tuple[int, int]]:
    if len(bounds) != 2 * ndim:
        raise ValueError(f"expected (begin, end) for each of {ndim} axes, got {tuple(bounds)}")
    return [(int(bounds[2 * axis]), int(bounds[2 * axis + 1])) for axis in range(ndim)]


def overlap_tile_plan(
    shape: Shape,
    input_tile: TileSize,
    output_tile: TileSize,
    pool_period: TileSize,
    trailing_context: TileSize = 0,
) -> TilePlan:
    """The overlap-tile plan of a valid-conv model (see the module docstring).

    ``pool_period`` is ``2**pools`` (per axis, or one for all); ``trailing_context``: output
    pixels at the end of a tile that are not exact (see the module docstring).
    ``output_tile - trailing_context`` must be at least ``pool_period``.
    """
    _check_image_size(shape)
    ndim = len(shape)
    per_axis = (as_shape(value, ndim) for value in (input_tile, output_tile, pool_period, trailing_context))
    axes = [_overlap_tile_axis(length, *values) for length, *values in zip(shape, *per_axis, strict=True)]
    return TilePlan(tuple(axes), blend=False)


def _overlap_tile_axis(
    length: int, input_size: int, output_size: int, pool_period: int, trailing_context: int
) -> AxisTiles:
    if (input_size - output_size) % 2:
        raise ValueError(f"input tile {input_size} and output tile {output_size} differ by an odd amount")
    step = (output_size - trailing_context) // pool_period * pool_period
    if step < 1:
        raise ValueError(
            f"tile {input_size} gives {output_size} output pixels, fewer than the pooling period "
            f"{pool_period}; use a larger tile"
        )
    margin = (input_size - output_size) // 2
    origins = range(0, length, step)
    return AxisTiles(
        length=length,
        input_size=input_size,
        output_size=output_size,
        starts=tuple(origin - margin for origin in origins),
        kept=tuple((origin, min(origin + step, length)) for origin in origins),
        step=step,
    )


def context_tile_plan(shape: Shape, tile: TileSize, context: TileSize, pool_period: TileSize) -> TilePlan:
    """The context plan of a same-padding model (see the module docstring).

    ``tile``: the input tile (multiples of ``pool_period``), cut down along an axis to the image
    side rounded up to the pooling period; ``context``: output pixels dropped at an inner tile
    edge, a multiple of ``pool_period`` and less than half the tile less one period. Each may
    be one value for all axes or one per axis.
    """
    _check_image_size(shape)
    ndim = len(shape)
    axes = []
    for length, size, margin, period in zip(
        shape, as_shape(tile, ndim), as_shape(context, ndim), as_shape(pool_period, ndim), strict=True
    ):
        if margin < 0 or margin % period:
            raise ValueError(f"context {margin} must be a multiple of the pooling period {period}")
        axes.append(_context_axis(length, size, margin, period))
    return TilePlan(tuple(axes), blend=False)


def _context_axis(length: int, size: int, context: int, pool_period: int) -> AxisTiles:
    if size < 1 or size % pool_period:
        raise ValueError(f"tile {size} must be a positive multiple of the pooling period {pool_period}")
    rounded = math.ceil(length / pool_period) * pool_period  # one pass reads this much, mirrored past the end
    size = min(size, rounded)
    if size == rounded:
        return AxisTiles(length, size, size, (0,), ((0, length),), step=size)
    step = size - 2 * context
    if step < pool_period:
        raise ValueError(
            f"tile {size} keeps nothing between its context margins of {context} px: use a tile of at least "
            f"{2 * context + pool_period}"
        )
    starts = [0]
    while starts[-1] + size < rounded:
        starts.append(min(starts[-1] + step, rounded - size))
    ends = [start + size - context for start in starts[:-1]] + [length]
    kept = tuple(zip([0, *ends[:-1]], ends, strict=True))
    return AxisTiles(length, size, size, tuple(starts), kept, step=step)


def sliding_window_plan(shape: Shape, tile: TileSize, overlap: float, pool_period: TileSize) -> TilePlan:
    """The Gaussian sliding-window plan of a padded model.

    The step along an axis is ``tile * (1 - overlap)`` rounded down to a multiple of that axis's
    pooling period (at least one period), so overlapping tiles share their pooling grid; the
    last tile along an axis is moved inwards to end at the image border. An image side shorter
    than the tile gets one tile, mirrored beyond the border.
    """
    _check_image_size(shape)
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    ndim = len(shape)
    axes = []
    for length, size, period in zip(shape, as_shape(tile, ndim), as_shape(pool_period, ndim), strict=True):
        if size < 1 or size % period:
            raise ValueError(f"tile {size} must be a positive multiple of the pooling period {period}")
        step = max(period, int(size * (1.0 - overlap)) // period * period)
        starts = sliding_origins(length, size, step)
        kept = tuple((start, min(start + size, length)) for start in starts)
        axes.append(AxisTiles(length, size, size, tuple(starts), kept, step=step))
    return TilePlan(tuple(axes), blend=True)


def sliding_origins(length: int, tile: int, step: int) -> list[int]:
    """Origins ``0, step, ...`` of windows covering ``[0, length)``; the last one ends at the border."""
    if length <= tile:
        return [0]
    origins = list(range(0, length - tile + 1, step))
    if origins[-1] + tile < length:
        origins.append(length - tile)
    return origins


def gaussian_window(tile: TileSize, sigma_fraction: float = GAUSSIAN_SIGMA_FRACTION) -> np.ndarray:
    """float32 Gaussian weights of the tile's shape (an int: a square), peak 1 at the centre,
    floored at GAUSSIAN_MIN_WEIGHT."""
    profiles = []
    for size in as_pair(tile) if isinstance(tile, int) else tile:
        sigma = max(size * sigma_fraction, 1e-6)
        coords = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
        profiles.append(np.exp(-0.5 * (coords / sigma) ** 2))
    window = functools.reduce(np.multiply.outer, profiles)  # in 2-D: np.outer
    return np.maximum(window / window.max(), GAUSSIAN_MIN_WEIGHT).astype(np.float32)


def mirror_indices(start: int, stop: int, length: int) -> np.ndarray:
    """Indices into ``[0, length)`` for positions ``start..stop-1``, mirrored at both borders.

    Mirroring without repeating the edge pixel (numpy's ``np.pad(mode="reflect")``),
    repeated as often as needed, so any window can be read however far it reaches out.
    """
    positions = np.arange(start, stop)
    if length == 1:
        return np.zeros_like(positions)
    period = 2 * (length - 1)
    folded = np.mod(positions, period)
    return np.where(folded < length, folded, period - folded)


def read_mirrored(array, *bounds: int) -> np.ndarray:  # noqa: ANN001
    """The ``[C, *sizes]`` window ``bounds`` (``top, bottom, left, right``, a ``z0, z1`` in front
    for a volume) of a ``[C, *spatial]`` array (numpy, Zarr, ...).

    Only the bounding box of the pixels needed is read (one slice, so a Zarr array decodes
    just the chunks it touches); the mirrored parts are then gathered from it in memory.
    """
    spans = _pairs(bounds, len(array.shape) - 1)
    indices = [mirror_indices(low, high, length)
               for (low, high), length in zip(spans, array.shape[1:], strict=True)]  # fmt: skip
    lows = [int(index.min()) for index in indices]
    box_slices = (slice(low, int(index.max()) + 1) for low, index in zip(lows, indices, strict=True))
    box = np.asarray(array[(slice(None), *box_slices)])
    inside = lows == [low for low, _ in spans] and box.shape[1:] == tuple(high - low for low, high in spans)
    if inside:
        return box
    gather = np.ix_(*(index - low for index, low in zip(indices, lows, strict=True)))
    return box[(slice(None), *gather)]


def block_grid(height: int, width: int, block: int) -> list[tuple[int, int, int, int]]:
    """``(top, bottom, left, right)`` of ``block``-sized output blocks covering the image, row-major."""
    return grid_blocks((height, width), (block, block))  # type: ignore[return-value]


def grid_blocks(shape: Shape, block: Shape) -> list[Bounds]:
    """The flat bounds of ``block``-shaped output blocks covering an image of ``shape``, the last
    axis varying fastest."""
    _check_image_size(shape)
    if min(block) < 1:
        raise ValueError(f"block size must be positive, got {block}")
    starts = [range(0, length, side) for length, side in zip(shape, block, strict=True)]
    return [
        tuple(value for begin, length, side in zip(corner, shape, block, strict=True)
              for value in (begin, min(begin + side, length)))
        for corner in itertools.product(*starts)
    ]  # fmt: skip


def aligned_block_size(requested: int, step: int) -> int:
    """``requested`` rounded to a multiple of the tile step (at least one step).

    Blocks on the step grid make overlap-tile blocks share no tile at all, and sliding
    window blocks share only the tiles straddling their borders.
    """
    return max(step, int(math.floor(requested / step + 0.5)) * step)


def aligned_block_shape(requested: Shape, plan: TilePlan) -> Shape:
    """Blocks of ``requested`` (one side per axis) on the plan's step grid: the in-plane axes share
    one side (2-D blocks are square), z, in a volume, rounds to its own step."""
    in_plane = aligned_block_size(requested[-1], plan.step)
    leading = [aligned_block_size(side, axis.step)
               for side, axis in zip(requested[:-2], plan.axes[:-2], strict=True)]  # fmt: skip
    return (*leading, in_plane, in_plane)


def _check_image_size(shape: Shape) -> None:
    if min(shape) < 1:
        raise ValueError(f"image size must be positive, got {'x'.join(map(str, shape))}")
