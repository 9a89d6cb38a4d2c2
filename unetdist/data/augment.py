"""Deterministic per-sample augmentation, drawn on the CPU and applied on the CPU or the GPU.

Each sample's random numbers come from ``numpy.random.default_rng([SAMPLE_STREAM, seed,
position])`` in the loader worker: first the crop (:func:`crop_window`), then the fixed
parameter vector of :func:`draw_params` (all parameters are always drawn, in one order, so
switching one augmentation on or off leaves the others' values unchanged). The vector
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
normalisation (``zscore`` per sample and channel, or ``range``: the unit range as is).
With ``zscore`` the intensity scale/shift are cancelled by the normalisation; gamma and
noise are not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

NORMALISATION_EPSILON = 1e-6
ELASTIC_GRID = 3
GAMMA_LOG_RANGE = 0.25  # gamma = exp(U(-r, r)): ~0.78 .. 1.28
SCALE_RANGE = 0.1  # x * U(1 - r, 1 + r)
SHIFT_RANGE = 0.1  # x + U(-r, r), in unit-range intensity
NUM_PARAMS = 5 + 2 * ELASTIC_GRID * ELASTIC_GRID  # turns, flip, gamma, scale, shift, (dy, dx) grid
NORMALISATIONS = ("zscore", "range")


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


def crop_window(
    mask: np.ndarray, size: int, rng: np.random.Generator, foreground_fraction: float
) -> tuple[int, int]:
    """(top, left) of a ``size`` window: centred on a random foreground pixel with probability
    ``foreground_fraction`` (when the mask has any), else uniform. Draws the same numbers either way."""
    height, width = mask.shape
    toss = rng.random()
    uniform_top, uniform_left, pick = (int(value) for value in rng.integers(0, 1 << 62, size=3))
    top, left = int(uniform_top % (height - size + 1)), int(uniform_left % (width - size + 1))
    if toss < foreground_fraction and (height > size or width > size):
        foreground = np.flatnonzero(mask)
        if foreground.size:
            y, x = divmod(int(foreground[pick % foreground.size]), width)
            top = min(max(y - size // 2, 0), height - size)
            left = min(max(x - size // 2, 0), width - size)
    return top, left


def draw_params(rng: np.random.Generator, spec: AugmentSpec) -> tuple[np.ndarray, int]:
    """The parameter vector (float32 [NUM_PARAMS]) and noise seed of one sample."""
    turns, flip = rng.integers(0, 4), rng.integers(0, 2)
    log_gamma, scale, shift = rng.uniform(-1.0, 1.0, size=3)
    displacement = rng.normal(0.0, spec.elastic_sigma_px, size=2 * ELASTIC_GRID * ELASTIC_GRID)
    noise_seed = int(rng.integers(0, 1 << 62))
    params = np.concatenate([[turns, flip, log_gamma, scale, shift], displacement]).astype(np.float32)
    return params, noise_seed


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
        host = params[:, :2].cpu().tolist()  # a few numbers; decides shapes, so needed on the host
        image = torch.stack([_flip_rot90(x, int(t), bool(f)) for x, (t, f) in zip(image, host, strict=False)])
        mask = torch.stack([_flip_rot90(x, int(t), bool(f)) for x, (t, f) in zip(mask, host, strict=False)])
        if weight is not None:
            weight = torch.stack([_flip_rot90(x, int(t), bool(f)) for x, (t, f) in zip(weight, host, strict=False)])
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
        noise = torch.empty_like(image)
        for index, seed in enumerate(noise_seeds.tolist()):
            generator = torch.Generator(device=image.device).manual_seed(int(seed))
            noise[index] = torch.randn(image.shape[1:], generator=generator, device=image.device, dtype=image.dtype)
        image = image + spec.noise_std * noise
    return image, mask, weight


def normalise(image: torch.Tensor, how: str) -> torch.Tensor:
    if how == "range":
        return image
    mean = image.mean(dim=(-2, -1), keepdim=True)
    std = image.std(dim=(-2, -1), keepdim=True, unbiased=False)
    return (image - mean) / (std + NORMALISATION_EPSILON)


def to_model_input(batch: dict[str, Any], device: torch.device | str = "cpu") -> dict[str, Any]:
    """A loader batch as model input on ``device``: image float32 [B,C,H,W], mask int64, weight float32.

    Batches from the loader carry ``"augment"`` (spec, parameters, noise seeds) and
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
            image, mask, weight = apply(image, mask, weight, params, seeds, spec)
        image = normalise(image, how)
    out["image"] = image.float()
    out["mask"] = mask.long()
    if weight is not None:
        out["weight"] = weight.float()
    return out
