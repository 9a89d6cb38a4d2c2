"""The batched augmentation kernels equal their per-sample definitions, and the seeded noise is
normal, per-sample, and the same on every device."""

from __future__ import annotations

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


def test_seeded_noise_is_standard_normal_and_a_function_of_its_own_seed():
    seeds = torch.tensor([3, 17, 2**61 + 5, 0])
    noise = augment.seeded_normal(seeds, (2, 64, 64), torch.device("cpu"), torch.float32)
    assert noise.shape == (4, 2, 64, 64)
    assert abs(float(noise.mean())) < 0.02 and abs(float(noise.std()) - 1.0) < 0.02
    assert 0.002 < float((noise.abs() > 3).float().mean()) < 0.0035  # the normal's tails: 0.0027
    alone = augment.seeded_normal(seeds[2:3], (2, 64, 64), torch.device("cpu"), torch.float32)
    assert torch.equal(alone[0], noise[2])  # the same in any batch
    flat = noise.flatten(1)
    correlation = torch.corrcoef(flat)
    assert (correlation - torch.eye(4)).abs().max() < 0.05  # other seeds, independent noise


@pytest.mark.gpu
def test_seeded_noise_is_the_same_on_cuda():
    seeds = torch.tensor([1, 2**40 + 3])
    cpu = augment.seeded_normal(seeds, (1, 32, 32), torch.device("cpu"), torch.float32)
    cuda = augment.seeded_normal(seeds, (1, 32, 32), torch.device("cuda"), torch.float32)
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-5, atol=1e-5)
