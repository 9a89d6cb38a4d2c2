"""Deterministic per-sample augmentation, drawn on the CPU and applied on the CPU or the GPU.

Each sample's random numbers are a pure function of (seed, global position): counter-based
words (:func:`sample_words`, SplitMix64 hashing of seed, position and word number), drawn for
a whole micro-batch at once with numpy, so they do not depend on which other samples share
the batch, nor on ranks or workers. They give the crop (:func:`crop_windows`) and the fixed
parameter vector of :func:`draw_params` (all parameters are always drawn, from fixed words,
so switching one augmentation on or off leaves the others' values unchanged). The vector
travels with the batch; :func:`apply` turns it into pixels with torch, batched, on
whatever device the tensors are on:

* ``data.augment_on=worker``: the worker calls :func:`to_model_input` on the CPU and hands
  over model-ready float32 tensors (the trainer only moves them);
* ``data.augment_on=device``: the worker hands over the stored dtype (uint8/uint16) plus
  the parameters, and the trainer calls ``to_model_input(batch, device)``, so the CPU
  workers only read and decode.

Order: stored image -> unit range (integer images / dtype max; float images per-sample
min-max) -> flips/rot90 (in-plane: the last two axes; volumes also flip z, or with ``rotate_3d``
take any of the cube's 48 symmetries: :mod:`unetdist.data.symmetries`) -> elastic
deformation (the U-Net paper's: Gaussian displacements with ``elastic_sigma_px`` on a coarse
3x3 grid, bicubically interpolated; bicubic sampling of the image, nearest of mask and weight;
volumes: a 3x3x3 grid of (dz, dy, dx), all trilinear for the image, as bicubic does not exist
in 3-D) -> gamma -> scale/shift -> Gaussian noise -> normalisation (``zscore`` per sample and
channel; ``percentile``: clipped to the sample's own 1st..99.8th percentile per channel, then
z-scored, so a few hot pixels or debris do not compress the contrast of everything else; or
``range``: the unit range as is). With
``zscore`` and ``percentile`` the intensity scale/shift are cancelled by the normalisation;
gamma and noise are not.

Images (tiles) are ``[B, C, Y, X]`` or volumes ``[B, C, Z, Y, X]``, masks and weights
``[B, *spatial]``: the number of spatial axes is read from the tensors' rank, so nothing is
configured. The words and parameter columns of volumes come after the 2-D ones, which keep
their numbers: a 2-D run draws, crops and augments exactly as before volumes existed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from unetdist.data.sequence import SAMPLE_STREAM
from unetdist.data.symmetries import CUBE_SYMMETRIES, cube_symmetries, square_symmetries
from unetdist.data.symmetries import flip_rot90 as _flip_rot90  # noqa: F401  (its old home; tests use it)

NORMALISATION_EPSILON = 1e-6
ELASTIC_GRID = 3
GAMMA_LOG_RANGE = 0.25  # gamma = exp(U(-r, r)): ~0.78 .. 1.28
SCALE_RANGE = 0.1  # x * U(1 - r, 1 + r)
SHIFT_RANGE = 0.1  # x + U(-r, r), in unit-range intensity
ELASTIC_NODES_3D = 3 * ELASTIC_GRID**3  # (dz, dy, dx) per node of the 3x3x3 grid
# Parameter columns: 2-D ones first, where they always were; the volume-only ones after them.
_ELASTIC_2D = 5  # turns, flip, gamma, scale, shift, then the (dy, dx) grid
_Z_FLIP = _ELASTIC_2D + 2 * ELASTIC_GRID * ELASTIC_GRID
_ELASTIC_3D = _Z_FLIP + 1
_CUBE = _ELASTIC_3D + ELASTIC_NODES_3D  # the cube symmetry's code (rotate_3d), after every older column
NUM_PARAMS = _CUBE + 1
NORMALISATIONS = ("zscore", "percentile", "range")
# data.normalize=percentile clips each sample and channel to these percentiles of its own pixels
# (nnU-Net clips CT to 0.5..99.5 of the foreground; per image, 1..99.8 keeps the bright cells)
CLIP_PERCENTILES = (1.0, 99.8)


@dataclass(frozen=True)
class AugmentSpec:
    """Which augmentations run (picklable; travels inside each batch)."""

    flips: bool = True
    intensity: bool = False
    noise_std: float = 0.0  # in unit-range intensity; 0: off
    elastic: bool = False
    elastic_sigma_px: float = 10.0
    normalize: str = "zscore"
    rotate_3d: bool = False  # with flips, on cubic volumes: any cube symmetry, not turns + a z flip

    @property
    def any(self) -> bool:
        return self.flips or self.intensity or self.noise_std > 0 or self.elastic


# Word numbers of a sample's random words (see sample_words).
_TOSS, _TOP, _LEFT, _PICK, _TURNS, _FLIP, _INTENSITY, _NOISE_SEED, _NORMALS = 0, 1, 2, 3, 4, 5, 6, 9, 10
# Volumes' words come after: words are counter-based, so adding some moves none of the above.
_DEPTH = _NORMALS + 2 * ELASTIC_GRID * ELASTIC_GRID  # the z corner
_Z_FLIP_WORD = _DEPTH + 1
_NORMALS_3D = _Z_FLIP_WORD + 1  # Box-Muller pairs: one word per normal, rounded up to a pair
_CUBE_WORD = _NORMALS_3D + ELASTIC_NODES_3D + ELASTIC_NODES_3D % 2  # appended: none above moves
NUM_WORDS = _CUBE_WORD + 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(words: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijective, well-mixing hash of uint64 words (wrapping arithmetic)."""
    words = (words ^ (words >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    words = (words ^ (words >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return words ^ (words >> np.uint64(31))


def sample_words(seed: int, positions: np.ndarray, count: int = NUM_WORDS) -> np.ndarray:
    """uint64 [len(positions), count]: the random words of each global position (counter-based)."""
    key = _mix64(np.asarray([seed % (1 << 64)], dtype=np.uint64) ^ np.uint64(SAMPLE_STREAM))
    stream = _mix64(key + np.asarray(positions, dtype=np.int64).astype(np.uint64) * _GOLDEN)
    counters = np.arange(1, count + 1, dtype=np.uint64) * _GOLDEN
    return _mix64(stream[:, None] + counters[None, :])


def _unit_floats(words: np.ndarray) -> np.ndarray:
    """Floats in [0, 1) from the top 53 bits of each word."""
    return (words >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _tile_shape(tile: int | tuple[int, ...], ndim: int) -> tuple[int, ...]:
    """Per-axis tile sizes: an int is a square (2-D) or cube (3-D)."""
    if isinstance(tile, int | np.integer):
        return (int(tile),) * ndim
    tile = tuple(int(size) for size in tile)
    if len(tile) != ndim:
        raise ValueError(f"tile {tile} has {len(tile)} axes, the image {ndim} spatial axes")
    return tile


def crop_windows(
    masks: list[np.ndarray], size: int | tuple[int, ...], words: np.ndarray, foreground_fraction: float
) -> list[tuple[int, ...]]:
    """Corner ((top, left) or (z, top, left)) of each sample's ``size`` window (an int: square or
    cube; or a tile shape): centred on a random foreground pixel with probability
    ``foreground_fraction`` (when the mask has any), else uniform."""
    def foreground(i: int) -> np.ndarray:  # (y, x) or (z, y, x) of every foreground pixel, in raster order
        return np.argwhere(masks[i])

    return point_windows([mask.shape for mask in masks], foreground, size, words, foreground_fraction)


def point_windows(
    shapes: list[tuple[int, ...]],
    points,
    tile: int | tuple[int, ...],
    words: np.ndarray,
    foreground_fraction: float,
) -> list[tuple[int, ...]]:
    """:func:`crop_windows` for samples known by their image's shape ((height, width) or
    (depth, height, width)) and foreground pixels ``points(i)`` int [K, len(shape)] (a sample of
    them, in whole-image stores), asked for only when sample i's toss falls under the fraction.
    An image with no points gets a uniform window. y and x use the 2-D words, z one of its own."""
    toss = _unit_floats(words[:, _TOSS])
    windows = []
    for i, (shape, toss_i, (top_word, left_word, pick), depth_word) in enumerate(zip(
        shapes, toss.tolist(), words[:, _TOP : _PICK + 1].tolist(), words[:, _DEPTH].tolist(), strict=True
    )):
        shape = tuple(int(axis) for axis in shape)
        sizes = _tile_shape(tile, len(shape))
        axis_words = (depth_word, top_word, left_word)[3 - len(shape) :]
        corner = [word % (axis - size + 1) for word, axis, size in zip(axis_words, shape, sizes, strict=True)]
        if toss_i < foreground_fraction and any(axis > size for axis, size in zip(shape, sizes, strict=True)):
            found = points(i)
            if len(found):
                centre = (int(v) for v in found[pick % len(found)])
                corner = [
                    min(max(at - size // 2, 0), axis - size)
                    for at, axis, size in zip(centre, shape, sizes, strict=True)
                ]
        windows.append(tuple(corner))
    return windows


def _normals(words: np.ndarray) -> np.ndarray:
    """Box-Muller: each pair of words (column j, column j + 1 for even j) gives two independent
    standard normals; cosines first, then sines."""
    first, second = words[:, 0::2], words[:, 1::2]
    radius = np.sqrt(-2.0 * np.log1p(-_unit_floats(first)))  # 1 - u lies in (0, 1]
    angle = 2.0 * np.pi * _unit_floats(second)
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)], axis=1)


def draw_params(words: np.ndarray, spec: AugmentSpec) -> tuple[np.ndarray, np.ndarray]:
    """The parameter vectors (float32 [B, NUM_PARAMS]) and noise seeds (int64 [B]) of a batch."""
    batch = len(words)
    params = np.empty((batch, NUM_PARAMS), dtype=np.float32)
    params[:, 0] = words[:, _TURNS] % np.uint64(4)
    params[:, 1] = words[:, _FLIP] % np.uint64(2)
    params[:, 2:5] = _unit_floats(words[:, _INTENSITY : _INTENSITY + 3]) * 2.0 - 1.0  # log_gamma, scale, shift
    normals = _normals(words[:, _NORMALS:_DEPTH])
    params[:, _ELASTIC_2D:_Z_FLIP] = spec.elastic_sigma_px * normals
    # volume columns: always drawn (the vector's length is fixed), from their own words
    params[:, _Z_FLIP] = words[:, _Z_FLIP_WORD] % np.uint64(2)
    normals_3d = _normals(words[:, _NORMALS_3D:_CUBE_WORD])[:, :ELASTIC_NODES_3D]
    params[:, _ELASTIC_3D:_CUBE] = spec.elastic_sigma_px * normals_3d
    params[:, _CUBE] = words[:, _CUBE_WORD] % np.uint64(CUBE_SYMMETRIES)  # modulo bias (2**64 % 48) / 2**64: none to speak of
    noise_seeds = (words[:, _NOISE_SEED] >> np.uint64(2)).astype(np.int64)
    return params, noise_seeds


# ---------------------------------------------------------------- applying (torch, any device)


def _spatial_axes(ndim: int) -> tuple[int, ...]:
    """The spatial axes of a [B, C, *spatial] batch: the last two, or three for a 5-D volume batch.

    At least two, so a 3-D [C, H, W] tensor keeps the 2-D meaning it always had."""
    return tuple(range(-max(ndim - 2, 2), 0))


def unit_range(image: torch.Tensor) -> torch.Tensor:
    """float32 [B,C,*spatial] in [0, 1]: integers / their dtype's max, floats per sample+channel
    min-max over all spatial axes."""
    if image.dtype == torch.uint8:
        return image.float() / 255.0
    if image.dtype in (torch.uint16, torch.int16, torch.int32):
        return image.float() / 65535.0
    image = image.float()
    low = image.amin(dim=_spatial_axes(image.ndim), keepdim=True)
    high = image.amax(dim=_spatial_axes(image.ndim), keepdim=True)
    return (image - low) / (high - low + NORMALISATION_EPSILON)


def _symmetries(arrays: list[torch.Tensor | None], params: torch.Tensor) -> list[torch.Tensor | None]:
    """Each sample's flip/rot90 (params[:, 0] quarter turns, params[:, 1] flip) applied to every
    array [B, ..., S, S] with one gather (:mod:`unetdist.data.symmetries`). A volume's z slices
    are only more leading axes: each turns in its plane."""
    return square_symmetries(arrays, (params[:, 0] * 2 + params[:, 1]).long())


def _z_flips(arrays: list[torch.Tensor | None], params: torch.Tensor) -> list[torch.Tensor | None]:
    """Each volume [B, ..., Z, Y, X] flipped along z where its params[:, _Z_FLIP] is 1."""
    flipped = params[:, _Z_FLIP] > 0.5
    out: list[torch.Tensor | None] = []
    for array in arrays:
        if array is None:
            out.append(None)
            continue
        chosen = flipped.view(-1, *([1] * (array.ndim - 1)))
        out.append(torch.where(chosen, array.flip(-3), array))
    return out


def elastic_grid(displacement: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``grid_sample`` grid [B,H,W,2] for coarse (dy, dx) pixel displacements [B, 2*G*G]."""
    batch = displacement.shape[0]
    coarse = displacement.view(batch, 2, ELASTIC_GRID, ELASTIC_GRID).float()
    dense = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True)
    ys = torch.arange(height, device=dense.device, dtype=torch.float32).view(1, height, 1)
    xs = torch.arange(width, device=dense.device, dtype=torch.float32).view(1, 1, width)
    y = (ys + dense[:, 0]) * (2.0 / max(height - 1, 1)) - 1.0
    x = (xs + dense[:, 1]) * (2.0 / max(width - 1, 1)) - 1.0
    return torch.stack([x, y], dim=-1)


def elastic_grid_3d(displacement: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """``grid_sample`` grid [B,Z,Y,X,3] for coarse (dz, dy, dx) voxel displacements [B, 3*G*G*G],
    trilinearly interpolated from the 3x3x3 grid (bicubic does not exist in 3-D)."""
    batch = displacement.shape[0]
    coarse = displacement.reshape(batch, 3, ELASTIC_GRID, ELASTIC_GRID, ELASTIC_GRID).float()
    dense = F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)
    axes = []
    for axis, size in enumerate(shape):
        view = [1, 1, 1, 1]
        view[axis + 1] = size
        position = torch.arange(size, device=dense.device, dtype=torch.float32).view(view)
        axes.append((position + dense[:, axis]) * (2.0 / max(size - 1, 1)) - 1.0)
    depth, rows, cols = axes
    return torch.stack([cols, rows, depth], dim=-1)  # grid_sample wants (x, y, z)


def _deform(array: torch.Tensor, grid: torch.Tensor, mode: str) -> torch.Tensor:
    """``array`` [B, C, *spatial] resampled at ``grid`` (edges reflected)."""
    return F.grid_sample(array, grid, mode=mode, padding_mode="reflection", align_corners=True)


def apply(
    image: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor | None,
    params: torch.Tensor,
    noise_seeds: torch.Tensor,
    spec: AugmentSpec,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Augment a batch: image float [B,C,*spatial] in unit range, mask [B,*spatial], weight
    [B,*spatial] or None; spatial (Y, X) or (Z, Y, X), read from the image's rank."""
    params = params.to(image.device, torch.float32)
    volume = image.ndim == 5
    if spec.flips and volume and spec.rotate_3d:  # the 48 include the turns and both flips below
        image, mask, weight = cube_symmetries([image, mask, weight], params[:, _CUBE].long())
    elif spec.flips:
        if image.shape[-1] != image.shape[-2]:
            raise ValueError(f"flips/rot90 augmentation needs square tiles, got {tuple(image.shape[-2:])}")
        image, mask, weight = _symmetries([image, mask, weight], params)
        if volume:
            image, mask, weight = _z_flips([image, mask, weight], params)
    if spec.elastic:
        if volume:
            grid = elastic_grid_3d(params[:, _ELASTIC_3D:_CUBE], tuple(image.shape[-3:]))
            smooth = "bilinear"  # on 5-D input: trilinear
        else:
            grid = elastic_grid(params[:, _ELASTIC_2D:_Z_FLIP], image.shape[-2], image.shape[-1])
            smooth = "bicubic"
        image = _deform(image, grid, smooth)
        mask = _deform(mask[:, None].float(), grid, "nearest")[:, 0].to(mask.dtype)
        if weight is not None:
            weight = _deform(weight[:, None].float(), grid, "nearest")[:, 0]
    if spec.intensity:
        view = (-1, *([1] * (image.ndim - 1)))
        gamma = torch.exp(params[:, 2] * GAMMA_LOG_RANGE).view(view)
        image = image.clamp(0.0, 1.0).pow(gamma)
        image = image * (1.0 + SCALE_RANGE * params[:, 3]).view(view) + (SHIFT_RANGE * params[:, 4]).view(view)
    if spec.noise_std > 0:
        # one generator per sample, not one hashed draw for the batch: Box-Muller's log/cos on
        # CPU round the last bit differently with the batch's size, and a sample's noise must
        # not depend on the samples beside it
        noise = torch.empty_like(image)
        for index, seed in enumerate(noise_seeds.tolist()):
            generator = torch.Generator(device=image.device).manual_seed(int(seed))
            noise[index] = torch.randn(image.shape[1:], generator=generator, device=image.device, dtype=image.dtype)
        image = image + spec.noise_std * noise
    return image, mask, weight


def percentile_clip(image: torch.Tensor, percentiles: tuple[float, float] = CLIP_PERCENTILES) -> torch.Tensor:
    """[B,C,*spatial] clipped per sample and channel to its own pixels' percentiles (low, high).

    Each percentile is a pixel value, the lower nearest rank (numpy's ``method="lower"``): of the
    n pixels sorted, the one at 0-based rank ``floor(q / 100 * (n - 1))``. ``kthvalue`` finds it
    without a full sort (3x faster than ``torch.quantile`` on a CPU), on any device.
    """
    spatial = len(_spatial_axes(image.ndim))
    flat = image.reshape(*image.shape[:-spatial], -1)
    last = flat.shape[-1] - 1
    low, high = (
        flat.kthvalue(int(q / 100.0 * last) + 1, dim=-1, keepdim=True).values.view(
            *flat.shape[:-1], *([1] * spatial)
        )
        for q in percentiles
    )
    return torch.clamp(image, min=low, max=high)


def normalise(image: torch.Tensor, how: str) -> torch.Tensor:
    """The model's input from a unit-range [B,C,*spatial] batch: ``how`` is one of NORMALISATIONS."""
    if how == "range":
        return image
    if how == "percentile":
        image = percentile_clip(image)
    elif how != "zscore":
        raise ValueError(f"unknown normalisation {how!r}; expected one of {', '.join(NORMALISATIONS)}")
    axes = _spatial_axes(image.ndim)
    mean = image.mean(dim=axes, keepdim=True)
    std = image.std(dim=axes, keepdim=True, unbiased=False)
    return (image - mean) / (std + NORMALISATION_EPSILON)


def to_model_input(batch: dict[str, Any], device: torch.device | str = "cpu") -> dict[str, Any]:
    """A loader batch as model input on ``device``: image float32 [B,C,*spatial], mask int64, weight float32.

    Batches from the loader carry ``"augment"`` (spec, parameters [B, NUM_PARAMS], noise seeds [B];
    numpy arrays or tensors) and
    ``"normalize"`` until this has run; a batch without them (already converted in a
    worker) is only moved. Call it once per micro-batch, e.g. in ``Trainer._to_device``.
    """
    device = torch.device(device)
    non_blocking = device.type == "cuda"
    out = {key: value for key, value in batch.items() if key not in ("augment", "normalize")}
    image = batch["image"].to(device, non_blocking=non_blocking)
    mask = batch["mask"].to(device, non_blocking=non_blocking)
    weight = batch.get("weight")
    weight = None if weight is None else weight.to(device, non_blocking=non_blocking)
    how = batch.get("normalize")
    if how is not None:
        image = unit_range(image)
        augment = batch.get("augment")
        if augment is not None:
            spec, params, seeds = augment
            image, mask, weight = apply(image, mask, weight, torch.as_tensor(params), torch.as_tensor(seeds), spec)
        image = normalise(image, how)
    out["image"] = image.float()
    out["mask"] = mask.long()
    if weight is not None:
        out["weight"] = weight.float()
    return out
