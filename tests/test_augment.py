"""The batched augmentation kernels equal their per-sample definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unetdist.data import augment


def _symmetry_params(turns: list[int], flips: list[int]) -> torch.Tensor:
    params = torch.zeros(len(turns), augment.NUM_PARAMS)
    params[:, 0] = torch.tensor(turns, dtype=torch.float32)
    params[:, 1] = torch.tensor(flips, dtype=torch.float32)
    return params


def test_batched_symmetries_equal_the_per_sample_flips_and_rotations():
    turns, flips = [0, 0, 1, 1, 2, 2, 3, 3, 1], [0, 1, 0, 1, 0, 1, 0, 1, 1]  # all eight, one twice
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(9, 2, 12, 12, generator=generator)  # as apply() gets them: unit-range floats, uint8 masks
    mask = torch.randint(0, 3, (9, 12, 12), generator=generator, dtype=torch.uint8)
    out_image, out_mask, out_weight = augment._symmetries([image, mask, None], _symmetry_params(turns, flips))
    assert out_weight is None and out_mask.dtype == torch.uint8
    for index, (turn, flip) in enumerate(zip(turns, flips, strict=True)):
        assert torch.equal(out_image[index], augment._flip_rot90(image[index], turn, bool(flip)))
        assert torch.equal(out_mask[index], augment._flip_rot90(mask[index], turn, bool(flip)))


def test_flips_refuse_non_square_tiles():
    spec = augment.AugmentSpec(flips=True, intensity=False, noise_std=0.0, elastic=False, elastic_sigma_px=10.0,
                               normalize="zscore")
    with pytest.raises(ValueError, match=r"square tiles, got \(8, 12\)"):
        augment.apply(torch.zeros(1, 1, 8, 12), torch.zeros(1, 8, 12), None, _symmetry_params([1], [0]),
                      torch.zeros(1, dtype=torch.int64), spec)


def test_percentile_normalisation_clips_each_sample_and_channel_to_its_own_percentiles_then_zscores():
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(3, 2, 20, 20, generator=generator) * 0.2
    image[0, 0, 3, 4] = 1.0  # a hot pixel in one sample and channel only
    image[2, 1, :2, :] = 0.0  # dark debris in another
    out = augment.normalise(image, "percentile")
    for b in range(3):
        for c in range(2):
            pixels = image[b, c].numpy().ravel()
            low, high = (np.quantile(pixels, q / 100.0, method="lower") for q in augment.CLIP_PERCENTILES)
            clipped = np.clip(pixels, low, high)
            expected = (clipped - clipped.mean()) / (clipped.std() + augment.NORMALISATION_EPSILON)
            np.testing.assert_allclose(out[b, c].numpy().ravel(), expected, rtol=1e-4, atol=1e-4)
    # the hot pixel no longer dominates its sample: z-scoring alone leaves it far out and the rest squeezed
    assert out[0, 0].max() < 3.0 < augment.normalise(image, "zscore")[0, 0].max()
    assert torch.equal(augment.normalise(image[1:2], "percentile"), out[1:2])  # per sample: not the batch's


def test_an_unknown_normalisation_is_named():
    with pytest.raises(ValueError, match="unknown normalisation 'robust'"):
        augment.normalise(torch.zeros(1, 1, 4, 4), "robust")
