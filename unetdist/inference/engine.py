"""Whole-image prediction: normalise, cut tiles, run the model in batches, stitch.

``predict_array`` is the in-memory entry (any image size, one call); ``TilePredictor``
predicts one output block of an image at a time and is what the Zarr path and the
benchmark drive. Both give the same numbers: a block gathers exactly the tiles of the
whole-image plan that touch it. Which tiles: :mod:`unetdist.inference.planning` (one pass
over the whole image when it fits the memory budget); where they go: :mod:`unetdist.inference.tiling`.

Normalisation: the per-channel z-score of training (``transforms.zscore_per_channel``),
but with the statistics of the *whole image*, not of each tile. Training tiles are small
crops normalised on their own; at inference a per-tile z-score would change with the tile
size and position (an almost empty tile would be stretched to unit variance) and break the
seamless stitching, while whole-image statistics make every tile of an image share one
mapping, so the result does not depend on the tiling at all.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from unetdist.data.augment import CLIP_PERCENTILES, NORMALISATION_EPSILON
from unetdist.data.imageio import is_channels_last
from unetdist.inference import tiling
from unetdist.inference.planning import ModelGeometry, default_memory_bytes, plan_tiles, tiles_per_batch
from unetdist.precision import autocast, check_precision


class InputError(ValueError):
    """An image the model cannot take (channels, dims, dtype); the message names it."""


# ---------------------------------------------------------------- normalisation


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel pixel count, mean and sum of squared deviations (float64 [C] each).

    Partial statistics of image blocks combine exactly in a fixed order (Chan et al.), so
    a block-wise pass over a Zarr image, split over any number of ranks, gives one answer.
    """

    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray
    clip: tuple[np.ndarray, np.ndarray] | None = None  # per-channel (low, high): applied before the z-score

    @classmethod
    def of(cls, chw: np.ndarray, normalize: str = "zscore") -> ChannelStats:
        """The statistics ``normalise`` needs for the model's ``data.normalize``: ``percentile``
        clips each channel to its 1st..99.8th percentile first, as training does per tile."""
        values = np.asarray(chw, dtype=np.float64).reshape(chw.shape[0], -1)
        clip = None
        if normalize == "percentile":
            low, high = np.percentile(values, CLIP_PERCENTILES, axis=1, method="lower")  # as training's
            values, clip = np.clip(values, low[:, None], high[:, None]), (low, high)
        mean = values.mean(axis=1)
        return cls(
            count=np.full(chw.shape[0], values.shape[1], dtype=np.float64),
            mean=mean,
            m2=((values - mean[:, None]) ** 2).sum(axis=1),
            clip=clip,
        )

    def combine(self, other: ChannelStats) -> ChannelStats:
        count = self.count + other.count
        delta = other.mean - self.mean
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(count > 0, self.mean + delta * other.count / count, 0.0)
            m2 = self.m2 + other.m2 + np.where(count > 0, delta**2 * self.count * other.count / count, 0.0)
        return ChannelStats(count, mean, m2)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / np.maximum(self.count, 1.0))

    def to_array(self) -> np.ndarray:
        return np.stack([self.count, self.mean, self.m2], axis=1)

    @classmethod
    def from_array(cls, array: np.ndarray) -> ChannelStats:
        return cls(array[:, 0].copy(), array[:, 1].copy(), array[:, 2].copy())


def normalise(region: np.ndarray, stats: ChannelStats) -> np.ndarray:
    """float32 ``(x - mean) / (std + eps)`` per channel of a ``[C, *spatial]`` region, as
    ``zscore_per_channel`` does per tile."""
    per_channel = (slice(None), *(None,) * (region.ndim - 1))
    mean = stats.mean.astype(np.float32)[per_channel]
    scale = (stats.std + NORMALISATION_EPSILON).astype(np.float32)[per_channel]
    region = region.astype(np.float32)
    if stats.clip is not None:
        low, high = (bound.astype(np.float32)[per_channel] for bound in stats.clip)
        region = np.clip(region, low, high)
    return (region - mean) / scale


def _channel_advice(channels: int, in_channels: int) -> str:
    if in_channels == 1:
        return f"train with model.in_channels={channels}, or convert to grey"
    if (channels, in_channels) == (4, 3):
        return "drop the alpha channel, or train with model.in_channels=4"
    return f"train with model.in_channels={channels}"


def _real_array(array: np.ndarray, name: str) -> np.ndarray:
    """``array`` as numbers: booleans as uint8; any other non-numeric dtype is an input error."""
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise InputError(f"{name}: dtype {array.dtype} is not a real number type")
    return array


def as_chw(image: np.ndarray, in_channels: int | None, name: str = "image") -> np.ndarray:
    """``[H, W]`` -> ``[1, H, W]``; ``[C, H, W]`` checked against the model's channel count;
    a channels-last picture ``[H, W, 3|4]`` (an RGB PNG) is transposed when the model takes
    its channels, and named as a colour image when it does not."""
    image = _real_array(image, name)
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3:
        raise InputError(f"{name}: expected HxW or CxHxW, got shape {image.shape}")
    if in_channels is not None and image.shape[0] != in_channels:
        if not is_channels_last(image.shape):
            raise InputError(
                f"{name}: has {image.shape[0]} channel(s) (shape {image.shape}), "
                f"the model expects {in_channels}"
            )
        channels = image.shape[-1]
        if channels != in_channels:
            raise InputError(
                f"{name}: {channels} colour channels (shape {image.shape}), the model expects {in_channels} "
                f"({_channel_advice(channels, in_channels)})"
            )
        image = np.ascontiguousarray(np.moveaxis(image, -1, 0))
    if image.shape[1] < 1 or image.shape[2] < 1:
        raise InputError(f"{name}: empty image of shape {image.shape}")
    return image


def as_czyx(volume: np.ndarray, in_channels: int | None, name: str = "volume") -> np.ndarray:
    """``[Z, Y, X]`` -> ``[1, Z, Y, X]``; ``[C, Z, Y, X]`` checked against the model's channel count
    (a 3-D model's input; :func:`as_chw` is a 2-D model's)."""
    volume = _real_array(volume, name)
    if volume.ndim == 3:
        volume = volume[None]
    if volume.ndim != 4:
        raise InputError(
            f"{name}: a 3-D model takes ZxYxX or CxZxYxX volumes, got shape {volume.shape}"
            + (" (a 2-D image: predict it with a 2-D model)" if volume.ndim == 2 else "")
        )
    if in_channels is not None and volume.shape[0] != in_channels:
        raise InputError(
            f"{name}: has {volume.shape[0]} channel(s) (shape {volume.shape}), "
            f"the model expects {in_channels}"
        )
    if min(volume.shape[1:]) < 1:
        raise InputError(f"{name}: empty volume of shape {volume.shape}")
    return volume


def as_model_input(image: np.ndarray, model: nn.Module, name: str = "image") -> np.ndarray:
    """``[C, *spatial]`` for the model: :func:`as_czyx` for a 3-D model, :func:`as_chw` for a 2-D one."""
    geometry = ModelGeometry.of(model)
    if geometry.spatial_dims == 3:
        return as_czyx(image, geometry.in_channels, name)
    return as_chw(image, geometry.in_channels, name)


# ---------------------------------------------------------------- the predictor


def resolve_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """``device`` (moving the model there), or the model's own device when None."""
    if device is None or device == "auto":
        parameter = next(model.parameters(), None)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            return parameter.device if parameter is not None else torch.device("cpu")
    device = torch.device(device)
    model.to(device)
    return device


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (BatchNorm running stats, no dropout) for the call; the previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class TilePredictor:
    """Class probabilities of an HxW image (a 3-D model: a DxHxW volume), one output block at a time.

    ``predict_block(source, stats, block)`` reads what the block's tiles need from
    ``source`` (a ``[C, H, W]`` or ``[C, D, H, W]`` numpy or Zarr array; mirrored beyond the
    border), normalises it with ``stats``, runs the model in batches and returns float32
    ``[K, bottom-top, right-left]`` (``[K, z1-z0, bottom-top, right-left]``) probabilities;
    ``block`` is ``(top, bottom, left, right)``, ``(z0, z1, top, bottom, left, right)`` in 3-D.

    The tiles (``plan``) come from :func:`unetdist.inference.planning.plan_tiles`: one pass
    over the whole image when it fits ``memory_gb`` (default: sized for the device), else the
    largest tiles that do; ``batch_size`` tiles per forward at most, fewer where the budget
    holds fewer. ``max_block``: see ``plan_tiles`` (the Zarr path's block size). ``tile_depth``
    (3-D): the tile along z, ``tile`` its in-plane side (default: ``tile``, a cube).
    """

    def __init__(
        self,
        model: nn.Module,
        *shape: int,
        tile: int | None = None,
        tile_depth: int | None = None,
        overlap: float | None = None,
        batch_size: int = 8,
        precision: str = "fp32",
        device: str | torch.device | None = None,
        flips: bool = False,
        memory_gb: float | None = None,
        max_block: int | tuple[int, ...] | None = None,
        normalize: str = "zscore",
    ) -> None:
        check_precision(precision)
        self.normalize = normalize  # the model's data.normalize: see stats_of
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        if memory_gb is not None and memory_gb <= 0:
            raise ValueError(f"memory budget must be positive, got {memory_gb} GB")
        self.model = model
        self.geometry = ModelGeometry.of(model)
        if len(shape) != self.geometry.spatial_dims:
            raise InputError(_dims_message(self.geometry.spatial_dims, shape))
        self.device = resolve_device(model, device)
        memory_bytes = default_memory_bytes(self.device) if memory_gb is None else int(memory_gb * 2**30)
        if tile_depth is not None:
            if len(shape) != 3 or tile is None:
                raise ValueError("a tile depth needs a 3-D model and a tile (the in-plane side) beside it")
            tile = (tile_depth, tile, tile)
        self.plan = plan_tiles(
            self.geometry,
            *shape,
            tile=tile,
            overlap=overlap,
            memory_bytes=memory_bytes,
            max_block=max_block,
        )
        self.batch_size = tiles_per_batch(self.geometry, self.plan, memory_bytes, batch_size)
        self.precision = precision
        self.flips = flips
        window = tiling.gaussian_window(self.tile_shape) if self.plan.blend else None
        self._window = None if window is None else torch.from_numpy(window).to(self.device)

    @property
    def tile_shape(self) -> tuple[int, ...]:
        """The model input's (height, width), (depth, height, width) in 3-D."""
        return self.plan.input_shape

    @property
    def num_classes(self) -> int | None:
        return self.geometry.num_classes

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """float32 softmax probabilities of a normalised batch, averaged over flips if enabled."""
        with torch.inference_mode(), autocast(self.device.type, self.precision):
            probabilities = torch.softmax(self.model(batch).float(), dim=1)
            if self.flips:
                flips = _flip_sets(batch.ndim - 2)
                for dims in flips:
                    flipped = self.model(torch.flip(batch, dims)).float()
                    probabilities += torch.flip(torch.softmax(flipped, dim=1), dims)
                probabilities /= len(flips) + 1.0
        return probabilities

    def stats_of(self, chw: np.ndarray) -> ChannelStats:
        """The whole image's statistics for ``predict_block``, normalised as the model was trained."""
        return ChannelStats.of(chw, self.normalize)

    def predict_block(
        self,
        source,  # noqa: ANN001
        stats: ChannelStats,
        block: tuple[int, ...],
    ) -> np.ndarray:
        tiles = self.plan.tiles_for_block(*block)
        sizes = self.tile_shape
        region_low = [min(t.input_start[axis] for t in tiles) for axis in range(len(sizes))]
        region_high = [max(t.input_start[axis] for t in tiles) + size for axis, size in enumerate(sizes)]
        bounds = [value for pair in zip(region_low, region_high, strict=True) for value in pair]
        region = tiling.read_mirrored(source, *bounds)
        region = torch.from_numpy(normalise(region, stats))
        block_shape = tuple(block[2 * axis + 1] - block[2 * axis] for axis in range(len(sizes)))

        with eval_mode(self.model):
            probabilities = weights = None
            for start in range(0, len(tiles), self.batch_size):
                batch_tiles = tiles[start : start + self.batch_size]
                batch = torch.stack(
                    [
                        region[
                            (
                                slice(None),
                                *(slice(first - low, first - low + size)
                                  for first, low, size in zip(t.input_start, region_low, sizes, strict=True)),
                            )
                        ]
                        for t in batch_tiles
                    ]
                ).to(self.device, non_blocking=True)  # fmt: skip
                output = self.forward(batch)
                if probabilities is None:
                    probabilities = torch.zeros(
                        (output.shape[1], *block_shape), dtype=torch.float32, device=self.device
                    )
                    if self.plan.blend:
                        weights = torch.zeros_like(probabilities[0])
                for t, tile_output in zip(batch_tiles, output, strict=True):
                    self._place(probabilities, weights, t, tile_output, block)
        if self.plan.blend:
            probabilities /= weights
        return probabilities.cpu().numpy()

    def _place(
        self,
        probabilities: torch.Tensor,
        weights: torch.Tensor | None,
        tile: tiling.Tile,
        tile_output: torch.Tensor,
        block: tuple[int, ...],
    ) -> None:
        """Add (blend) or copy (overlap-tile, context) the part of one tile's output inside the block."""
        source_index, target_index = [], []
        for axis, (keep_begin, keep_end) in enumerate(tile.keep):
            begin, end = max(keep_begin, block[2 * axis]), min(keep_end, block[2 * axis + 1])
            if begin >= end:
                return
            # output pixel 0 of a tile sits at image position input + margin
            origin = tile.input_start[axis] + self.plan.axes[axis].margin
            source_index.append(slice(begin - origin, end - origin))
            target_index.append(slice(begin - block[2 * axis], end - block[2 * axis]))
        source = tile_output[(slice(None), *source_index)]
        target = (slice(None), *target_index)
        if self.plan.blend:
            window = self._window[tuple(source_index)]
            probabilities[target] += source * window
            weights[target[1:]] += window
        else:
            probabilities[target] = source


def _flip_sets(spatial_dims: int) -> list[tuple[int, ...]]:
    """The flips test-time augmentation averages over besides none: every set of flipped axes,
    in-plane ones first (the 2-D order: x, y, both)."""
    axes = [-1 - axis for axis in range(spatial_dims)]
    return [dims for count in range(1, spatial_dims + 1) for dims in _subsets(axes, count)]


def _subsets(axes: list[int], count: int) -> list[tuple[int, ...]]:
    return [tuple(sorted(chosen)) for chosen in itertools.combinations(axes, count)]


def _dims_message(spatial_dims: int, shape: tuple[int, ...]) -> str:
    if spatial_dims == 3:
        return (f"a 3-D model (model.spatial_dims 3) predicts volumes, got a {len(shape)}-D image of "
                f"shape {shape}: give a ZxYxX or CxZxYxX volume, or use a 2-D model")  # fmt: skip
    return (f"a 2-D model predicts images, got {len(shape)} spatial axes {shape}: a volume needs a model "
            "trained with model.spatial_dims 3")  # fmt: skip


def labels_from_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """HxW class ids of ``[K, H, W]`` probabilities: uint8 (uint16 beyond 256 classes)."""
    dtype = np.uint8 if probabilities.shape[0] <= 256 else np.uint16
    return probabilities.argmax(axis=0).astype(dtype)


def predict_array(
    model: nn.Module,
    image: np.ndarray,
    *,
    tile: int | None = None,
    overlap: float | None = None,
    batch_size: int = 8,
    precision: str = "fp32",
    device: str | torch.device | None = None,
    flips: bool = False,
    memory_gb: float | None = None,
    return_probabilities: bool = False,
    tile_depth: int | None = None,
) -> np.ndarray:
    """Segment one in-memory image of any size.

    ``image``: ``[H, W]`` or ``[C, H, W]`` (a 3-D model: ``[Z, Y, X]`` or ``[C, Z, Y, X]``, and
    ``tile_depth`` its tiles' z side), any real dtype, raw intensities (normalised
    here with the whole image's per-channel mean/std). The tiles: one pass over the whole
    image when it fits ``memory_gb`` (default: sized for the device), else the largest tiles
    that do (see :mod:`unetdist.inference.planning`). Valid-conv models use the paper's
    overlap-tile strategy with mirrored borders, padded models tiles that overlap by their
    receptive field: both equal one pass over the whole image, however tiled. ``overlap``
    (padded models) asks for a Gaussian-weighted sliding window whose neighbours overlap by
    that fraction of a tile instead. ``tile`` None picks a size; ``device`` None uses the
    model's device, else moves the model. ``flips`` averages the probabilities over the
    horizontal/vertical flips (3-D: every combination of z, y and x flips).

    Returns HxW uint8 class labels, or float32 ``[K, H, W]`` softmax probabilities (3-D:
    ``[Z, Y, X]`` and ``[K, Z, Y, X]``).
    The model runs in eval mode and is left in the mode it came in.
    """
    chw = as_model_input(image, model)
    predictor = TilePredictor(
        model,
        *chw.shape[1:],
        tile=tile,
        tile_depth=tile_depth,
        overlap=overlap,
        batch_size=batch_size,
        precision=precision,
        device=device,
        flips=flips,
        memory_gb=memory_gb,
    )
    whole = tuple(value for side in chw.shape[1:] for value in (0, side))
    probabilities = predictor.predict_block(chw, ChannelStats.of(chw), whole)
    return probabilities if return_probabilities else labels_from_probabilities(probabilities)
