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
min-max) -> flips/rot90 -> elastic deformation (the U-Net paper's: Gaussian displacements
with ``elastic_sigma_px`` on a coarse 3x3 grid, bicubically interpolated; bicubic sampling
of the image, nearest of mask and weight) -> gamma -> scale/shift -> Gaussian noise ->
normalisation (``zscore`` per sample and channel; ``percentile``: clipped to the sample's
own 1st..99.8th percentile per channel, then z-scored, so a few hot pixels or debris do not
compress the contrast of everything else; or ``range``: the unit range as is). With
``zscore`` and ``percentile`` the intensity scale/shift are cancelled by the normalisation;
gamma and noise are not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from unetdist.data.sequence import SAMPLE_STREAM

NORMALISATION_EPSILON = 1e-6
ELASTIC_GRID = 3
GAMMA_LOG_RANGE = 0.25  # gamma = exp(U(-r, r)): ~0.78 .. 1.28
SCALE_RANGE = 0.1  # x * U(1 - r, 1 + r)
SHIFT_RANGE = 0.1  # x + U(-r, r), in unit-range intensity
NUM_PARAMS = 5 + 2 * ELASTIC_GRID * ELASTIC_GRID  # turns, flip, gamma, scale, shift, (dy, dx) grid
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

    @property
    def any(self) -> bool:
        return self.flips or self.intensity or self.noise_std > 0 or self.elastic


# Word numbers of a sample's random words (see sample_words).
_TOSS, _TOP, _LEFT, _PICK, _TURNS, _FLIP, _INTENSITY, _NOISE_SEED, _NORMALS = 0, 1, 2, 3, 4, 5, 6, 9, 10
NUM_WORDS = _NORMALS + 2 * ELASTIC_GRID * ELASTIC_GRID
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


def crop_windows(
    masks: list[np.ndarray], size: int, words: np.ndarray, foreground_fraction: float
) -> list[tuple[int, int]]:
    """(top, left) of each sample's ``size`` window: centred on a random foreground pixel with
    probability ``foreground_fraction`` (when the mask has any), else uniform."""
    def foreground(i: int) -> np.ndarray:  # (y, x) of every foreground pixel, in raster order
        return np.argwhere(masks[i])

    return point_windows([mask.shape for mask in masks], foreground, size, words, foreground_fraction)


def point_windows(
    shapes: list[tuple[int, int]], points, size: int, words: np.ndarray, foreground_fraction: float
) -> list[tuple[int, int]]:
    """:func:`crop_windows` for samples known by their image's (height, width) and foreground
    pixels ``points(i)`` int [K, 2] (y, x) (a sample of them, in whole-image stores), asked for
    only when sample i's toss falls under the fraction. An image with no points gets a uniform
    window."""
    toss = _unit_floats(words[:, _TOSS])
    windows = []
    for i, ((height, width), toss_i, (top_word, left_word, pick)) in enumerate(zip(
        shapes, toss.tolist(), words[:, _TOP : _PICK + 1].tolist(), strict=True
    )):
        top, left = top_word % (height - size + 1), left_word % (width - size + 1)
        if toss_i < foreground_fraction and (height > size or width > size):
            yx = points(i)
            if len(yx):
                y, x = (int(v) for v in yx[pick % len(yx)])
                top = min(max(y - size // 2, 0), height - size)
                left = min(max(x - size // 2, 0), width - size)
        windows.append((top, left))
    return windows


def draw_params(words: np.ndarray, spec: AugmentSpec) -> tuple[np.ndarray, np.ndarray]:
    """The parameter vectors (float32 [B, NUM_PARAMS]) and noise seeds (int64 [B]) of a batch."""
    batch = len(words)
    params = np.empty((batch, NUM_PARAMS), dtype=np.float32)
    params[:, 0] = words[:, _TURNS] % np.uint64(4)
    params[:, 1] = words[:, _FLIP] % np.uint64(2)
    params[:, 2:5] = _unit_floats(words[:, _INTENSITY : _INTENSITY + 3]) * 2.0 - 1.0  # log_gamma, scale, shift
    # Box-Muller: each pair of words gives two independent standard normals.
    first, second = words[:, _NORMALS::2], words[:, _NORMALS + 1 :: 2]
    radius = np.sqrt(-2.0 * np.log1p(-_unit_floats(first)))  # 1 - u lies in (0, 1]
    angle = 2.0 * np.pi * _unit_floats(second)
    normals = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    params[:, 5:] = spec.elastic_sigma_px * normals
    noise_seeds = (words[:, _NOISE_SEED] >> np.uint64(2)).astype(np.int64)
    return params, noise_seeds


# ---------------------------------------------------------------- applying (torch, any device)


def unit_range(image: torch.Tensor) -> torch.Tensor:
    """float32 [B,C,H,W] in [0, 1]: integers / their dtype's max, floats per sample+channel min-max."""
    if image.dtype == torch.uint8:
        return image.float() / 255.0
    if image.dtype in (torch.uint16, torch.int16, torch.int32):
        return image.float() / 65535.0
    image = image.float()
    low = image.amin(dim=(-2, -1), keepdim=True)
    high = image.amax(dim=(-2, -1), keepdim=True)
    return (image - low) / (high - low + NORMALISATION_EPSILON)


def _flip_rot90(array: torch.Tensor, turns: int, flip: bool) -> torch.Tensor:
    array = torch.rot90(array, turns, dims=(-2, -1))
    return array.flip(-1) if flip else array


_SYMMETRY_SOURCES: dict[tuple[int, str], torch.Tensor] = {}


def _symmetries(arrays: list[torch.Tensor | None], params: torch.Tensor) -> list[torch.Tensor | None]:
    """Each sample's flip/rot90 (params[:, 0] quarter turns, params[:, 1] flip) applied to every
    array [B, ..., S, S] with one gather: per sample, the source pixel of each output pixel, so
    the batch costs a few kernels whatever its size and the host never waits for the device."""
    size = arrays[0].shape[-1]
    key = (size, str(arrays[0].device))
    if key not in _SYMMETRY_SOURCES:  # [8, S*S] for code 2 * turns + flip
        pixels = torch.arange(size * size).view(size, size)
        _SYMMETRY_SOURCES[key] = torch.stack(
            [_flip_rot90(pixels, turns, bool(flip)).reshape(-1) for turns in range(4) for flip in (0, 1)]
        ).to(arrays[0].device)
    codes = (params[:, 0] * 2 + params[:, 1]).long()
    sources = _SYMMETRY_SOURCES[key][codes]  # [B, S*S]
    out: list[torch.Tensor | None] = []
    for array in arrays:
        if array is None:
            out.append(None)
            continue
        flat = array.reshape(array.shape[0], -1, size * size)
        index = sources[:, None, :].expand(-1, flat.shape[1], -1)
        out.append(torch.gather(flat, 2, index).view(array.shape))
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


def apply(
    image: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor | None,
    params: torch.Tensor,
    noise_seeds: torch.Tensor,
    spec: AugmentSpec,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Augment a batch: image float [B,C,H,W] in unit range, mask [B,H,W], weight [B,H,W] or None."""
    params = params.to(image.device, torch.float32)
    if spec.flips:
        if image.shape[-1] != image.shape[-2]:
            raise ValueError(f"flips/rot90 augmentation needs square tiles, got {tuple(image.shape[-2:])}")
        image, mask, weight = _symmetries([image, mask, weight], params)
    if spec.elastic:
        grid = elastic_grid(params[:, 5:], image.shape[-2], image.shape[-1])
        image = F.grid_sample(image, grid, mode="bicubic", padding_mode="reflection", align_corners=True)
        mask = F.grid_sample(
            mask[:, None].float(), grid, mode="nearest", padding_mode="reflection", align_corners=True
        )[:, 0].to(mask.dtype)
        if weight is not None:
            weight = F.grid_sample(
                weight[:, None].float(), grid, mode="nearest", padding_mode="reflection", align_corners=True
            )[:, 0]
    if spec.intensity:
        view = (-1, 1, 1, 1)
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
    """[B,C,H,W] clipped per sample and channel to its own pixels' percentiles (low, high).

    Each percentile is a pixel value, the lower nearest rank (numpy's ``method="lower"``): of the
    n pixels sorted, the one at 0-based rank ``floor(q / 100 * (n - 1))``. ``kthvalue`` finds it
    without a full sort (3x faster than ``torch.quantile`` on a CPU), on any device.
    """
    flat = image.reshape(*image.shape[:-2], -1)
    last = flat.shape[-1] - 1
    low, high = (
        flat.kthvalue(int(q / 100.0 * last) + 1, dim=-1, keepdim=True).values.unsqueeze(-1)
        for q in percentiles
    )
    return torch.clamp(image, min=low, max=high)


def normalise(image: torch.Tensor, how: str) -> torch.Tensor:
    """The model's input from a unit-range [B,C,H,W] batch: ``how`` is one of NORMALISATIONS."""
    if how == "range":
        return image
    if how == "percentile":
        image = percentile_clip(image)
    elif how != "zscore":
        raise ValueError(f"unknown normalisation {how!r}; expected one of {', '.join(NORMALISATIONS)}")
    mean = image.mean(dim=(-2, -1), keepdim=True)
    std = image.std(dim=(-2, -1), keepdim=True, unbiased=False)
    return (image - mean) / (std + NORMALISATION_EPSILON)


def to_model_input(batch: dict[str, Any], device: torch.device | str = "cpu") -> dict[str, Any]:
    """A loader batch as model input on ``device``: image float32 [B,C,H,W], mask int64, weight float32.

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
