"""Tile geometry for whole-image inference: plain integer/numpy arithmetic, no torch.

Two strategies, chosen by the model's convolution padding:

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

``sliding-window`` (``padded`` preset): input tile == output tile, neighbours overlap by
``overlap`` of the tile, and each tile's probabilities are weighted by a Gaussian that is
highest at the tile centre, so the zero-padded tile borders count least and no seams show.

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
class TilePlan:
    """Where the tiles of one HxW image go.

    ``input_tile``: model input side; ``output_tile``: logits side; ``margin``: context
    pixels on each side (0 for padded models); ``step``: distance between tile origins;
    ``origins_y``/``origins_x``: output-tile origins; ``blend``: True for the Gaussian
    sliding window (overlapping outputs are averaged), False for overlap-tile (each output
    pixel comes from exactly one tile).
    """

    height: int
    width: int
    input_tile: int
    output_tile: int
    margin: int
    step: int
    origins_y: tuple[int, ...]
    origins_x: tuple[int, ...]
    blend: bool

    @property
    def num_tiles(self) -> int:
        return len(self.origins_y) * len(self.origins_x)

    def _kept_span(self, origin: int, length: int) -> tuple[int, int]:
        if self.blend:
            return origin, min(origin + self.output_tile, length)
        return origin, min(origin + self.step, length)

    def tiles_for_block(self, top: int, bottom: int, left: int, right: int) -> list[Tile]:
        """Tiles whose kept output meets the block ``[top, bottom) x [left, right)``, row-major."""
        rows = [o for o in self.origins_y if _meets(self._kept_span(o, self.height), top, bottom)]
        cols = [o for o in self.origins_x if _meets(self._kept_span(o, self.width), left, right)]
        tiles = []
        for origin_y in rows:
            keep_top, keep_bottom = self._kept_span(origin_y, self.height)
            for origin_x in cols:
                keep_left, keep_right = self._kept_span(origin_x, self.width)
                tiles.append(
                    Tile(
                        input_top=origin_y - self.margin,
                        input_left=origin_x - self.margin,
                        keep_top=keep_top,
                        keep_bottom=keep_bottom,
                        keep_left=keep_left,
                        keep_right=keep_right,
                    )
                )
        return tiles


def _meets(span: tuple[int, int], low: int, high: int) -> bool:
    return span[0] < high and span[1] > low


def overlap_tile_plan(
    height: int, width: int, input_tile: int, output_tile: int, pool_period: int, trailing_context: int = 0
) -> TilePlan:
    """The overlap-tile plan of a valid-conv model (see the module docstring).

    ``pool_period`` is ``2**depth``; ``trailing_context``: output pixels at the bottom/right
    of a tile that are not exact (see the module docstring). ``output_tile -
    trailing_context`` must be at least ``pool_period``.
    """
    _check_image_size(height, width)
    if (input_tile - output_tile) % 2:
        raise ValueError(f"input tile {input_tile} and output tile {output_tile} differ by an odd amount")
    step = (output_tile - trailing_context) // pool_period * pool_period
    if step < 1:
        raise ValueError(
            f"tile {input_tile} gives {output_tile} output pixels, fewer than the pooling period "
            f"{pool_period}; use a larger tile"
        )
    return TilePlan(
        height=height,
        width=width,
        input_tile=input_tile,
        output_tile=output_tile,
        margin=(input_tile - output_tile) // 2,
        step=step,
        origins_y=tuple(range(0, height, step)),
        origins_x=tuple(range(0, width, step)),
        blend=False,
    )


def sliding_window_plan(height: int, width: int, tile: int, overlap: float, pool_period: int) -> TilePlan:
    """The Gaussian sliding-window plan of a padded model.

    The step is ``tile * (1 - overlap)`` rounded down to a multiple of ``pool_period``
    (at least one period), so overlapping tiles share their pooling grid; the last tile of
    a row/column is moved inwards to end at the image border. An image side shorter than
    the tile gets one tile, mirrored beyond the border.
    """
    _check_image_size(height, width)
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if tile < 1 or tile % pool_period:
        raise ValueError(f"tile {tile} must be a positive multiple of the pooling period {pool_period}")
    step = max(pool_period, int(tile * (1.0 - overlap)) // pool_period * pool_period)
    return TilePlan(
        height=height,
        width=width,
        input_tile=tile,
        output_tile=tile,
        margin=0,
        step=step,
        origins_y=tuple(sliding_origins(height, tile, step)),
        origins_x=tuple(sliding_origins(width, tile, step)),
        blend=True,
    )


def sliding_origins(length: int, tile: int, step: int) -> list[int]:
    """Origins ``0, step, ...`` of windows covering ``[0, length)``; the last one ends at the border."""
    if length <= tile:
        return [0]
    origins = list(range(0, length - tile + 1, step))
    if origins[-1] + tile < length:
        origins.append(length - tile)
    return origins


def gaussian_window(tile: int, sigma_fraction: float = GAUSSIAN_SIGMA_FRACTION) -> np.ndarray:
    """float32 [tile, tile] Gaussian weights, peak 1 at the centre, floored at GAUSSIAN_MIN_WEIGHT."""
    sigma = max(tile * sigma_fraction, 1e-6)
    coords = np.arange(tile, dtype=np.float64) - (tile - 1) / 2.0
    profile = np.exp(-0.5 * (coords / sigma) ** 2)
    window = np.outer(profile, profile)
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
