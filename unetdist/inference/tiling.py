"""Tile geometry for whole-image inference: plain integer/numpy arithmetic, no torch.

A plan places model inputs along each image axis on its own (:class:`AxisTiles`; tiles may be
rectangular, so a 700 x 1100 image can be one 704 x 1104 pass). Three strategies:

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

A plan covers the whole image; ``tiles_for_block`` returns the tiles a rectangular output
block needs, so a large image can be predicted block by block with the same result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# The Gaussian's sigma as a fraction of the tile side (nnU-Net's choice): the centre
# dominates, the border still gets a weight > 0 so the image corners are covered.
GAUSSIAN_SIGMA_FRACTION = 1.0 / 8.0
# Floor of the window weight relative to its peak: keeps the weighted average defined
# (and finite in fp16) where only a tile's far border covers a pixel.
GAUSSIAN_MIN_WEIGHT = 1e-3

TileSize = int | tuple[int, int]  # a square side, or (height, width)


@dataclass(frozen=True)
class Tile:
    """One model input: ``input_*`` in image coordinates (may reach outside: mirrored);
    ``keep_*``: the output pixels this tile contributes, in image coordinates (inside)."""

    input_top: int
    input_left: int
    keep_top: int
    keep_bottom: int
    keep_left: int
    keep_right: int


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
    """Where the tiles of one HxW image go: ``rows`` (along y) times ``cols`` (along x).

    ``blend``: True for the Gaussian sliding window (overlapping outputs are averaged), False
    for overlap-tile and context plans (each output pixel comes from exactly one tile).
    """

    height: int
    width: int
    rows: AxisTiles
    cols: AxisTiles
    blend: bool

    @property
    def num_tiles(self) -> int:
        return len(self.rows.starts) * len(self.cols.starts)

    @property
    def input_shape(self) -> tuple[int, int]:
        return self.rows.input_size, self.cols.input_size

    @property
    def step(self) -> int:
        """The larger axis step: output blocks of a multiple of it cut through few tiles."""
        return max(self.rows.step, self.cols.step)

    def tiles_for_block(self, top: int, bottom: int, left: int, right: int) -> list[Tile]:
        """Tiles whose kept output meets the block ``[top, bottom) x [left, right)``, row-major."""
        tiles = []
        for row in self.rows.meeting(top, bottom):
            keep_top, keep_bottom = self.rows.kept[row]
            for col in self.cols.meeting(left, right):
                keep_left, keep_right = self.cols.kept[col]
                tiles.append(
                    Tile(
                        input_top=self.rows.starts[row],
                        input_left=self.cols.starts[col],
                        keep_top=keep_top,
                        keep_bottom=keep_bottom,
                        keep_left=keep_left,
                        keep_right=keep_right,
                    )
                )
        return tiles


def as_pair(size: TileSize) -> tuple[int, int]:
    """``(height, width)`` of a tile size given as one side or a pair."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def overlap_tile_plan(
    height: int,
    width: int,
    input_tile: TileSize,
    output_tile: TileSize,
    pool_period: int,
    trailing_context: int = 0,
) -> TilePlan:
    """The overlap-tile plan of a valid-conv model (see the module docstring).

    ``pool_period`` is ``2**depth``; ``trailing_context``: output pixels at the bottom/right
    of a tile that are not exact (see the module docstring). ``output_tile -
    trailing_context`` must be at least ``pool_period``.
    """
    _check_image_size(height, width)
    inputs, outputs = as_pair(input_tile), as_pair(output_tile)
    axes = [
        _overlap_tile_axis(length, size, out, pool_period, trailing_context)
        for length, size, out in zip((height, width), inputs, outputs, strict=True)
    ]
    return TilePlan(height, width, axes[0], axes[1], blend=False)


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


def context_tile_plan(height: int, width: int, tile: TileSize, context: int, pool_period: int) -> TilePlan:
    """The context plan of a same-padding model (see the module docstring).

    ``tile``: the input tile (multiples of ``pool_period``), cut down along an axis to the image
    side rounded up to the pooling period; ``context``: output pixels dropped at an inner tile
    edge, a multiple of ``pool_period`` and less than half the tile less one period.
    """
    _check_image_size(height, width)
    if context < 0 or context % pool_period:
        raise ValueError(f"context {context} must be a multiple of the pooling period {pool_period}")
    axes = [
        _context_axis(length, size, context, pool_period)
        for length, size in zip((height, width), as_pair(tile), strict=True)
    ]
    return TilePlan(height, width, axes[0], axes[1], blend=False)


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


def sliding_window_plan(
    height: int, width: int, tile: TileSize, overlap: float, pool_period: int
) -> TilePlan:
    """The Gaussian sliding-window plan of a padded model.

    The step is ``tile * (1 - overlap)`` rounded down to a multiple of ``pool_period``
    (at least one period), so overlapping tiles share their pooling grid; the last tile of
    a row/column is moved inwards to end at the image border. An image side shorter than
    the tile gets one tile, mirrored beyond the border.
    """
    _check_image_size(height, width)
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    axes = []
    for length, size in zip((height, width), as_pair(tile), strict=True):
        if size < 1 or size % pool_period:
            raise ValueError(f"tile {size} must be a positive multiple of the pooling period {pool_period}")
        step = max(pool_period, int(size * (1.0 - overlap)) // pool_period * pool_period)
        starts = sliding_origins(length, size, step)
        kept = tuple((start, min(start + size, length)) for start in starts)
        axes.append(AxisTiles(length, size, size, tuple(starts), kept, step=step))
    return TilePlan(height, width, axes[0], axes[1], blend=True)


def sliding_origins(length: int, tile: int, step: int) -> list[int]:
    """Origins ``0, step, ...`` of windows covering ``[0, length)``; the last one ends at the border."""
    if length <= tile:
        return [0]
    origins = list(range(0, length - tile + 1, step))
    if origins[-1] + tile < length:
        origins.append(length - tile)
    return origins


def gaussian_window(tile: TileSize, sigma_fraction: float = GAUSSIAN_SIGMA_FRACTION) -> np.ndarray:
    """float32 [height, width] Gaussian weights, peak 1 at the centre, floored at GAUSSIAN_MIN_WEIGHT."""
    profiles = []
    for size in as_pair(tile):
        sigma = max(size * sigma_fraction, 1e-6)
        coords = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
        profiles.append(np.exp(-0.5 * (coords / sigma) ** 2))
    window = np.outer(*profiles)
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


def read_mirrored(array, top: int, bottom: int, left: int, right: int) -> np.ndarray:  # noqa: ANN001
    """``[C, bottom-top, right-left]`` window of a ``[C, H, W]`` array (numpy, Zarr, ...).

    Only the bounding box of the pixels needed is read (one slice, so a Zarr array decodes
    just the chunks it touches); the mirrored parts are then gathered from it in memory.
    """
    _, height, width = array.shape
    rows = mirror_indices(top, bottom, height)
    cols = mirror_indices(left, right, width)
    row_low, col_low = int(rows.min()), int(cols.min())
    box = np.asarray(array[:, row_low : int(rows.max()) + 1, col_low : int(cols.max()) + 1])
    inside = (row_low == top) and (col_low == left) and box.shape[1:] == (bottom - top, right - left)
    if inside:
        return box
    return box[:, (rows - row_low)[:, None], (cols - col_low)[None, :]]


def block_grid(height: int, width: int, block: int) -> list[tuple[int, int, int, int]]:
    """``(top, bottom, left, right)`` of ``block``-sized output blocks covering the image, row-major."""
    _check_image_size(height, width)
    if block < 1:
        raise ValueError(f"block size must be positive, got {block}")
    return [
        (top, min(top + block, height), left, min(left + block, width))
        for top in range(0, height, block)
        for left in range(0, width, block)
    ]


def aligned_block_size(requested: int, step: int) -> int:
    """``requested`` rounded to a multiple of the tile step (at least one step).

    Blocks on the step grid make overlap-tile blocks share no tile at all, and sliding
    window blocks share only the tiles straddling their borders.
    """
    return max(step, int(math.floor(requested / step + 0.5)) * step)


def _check_image_size(height: int, width: int) -> None:
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
