"""Full 3-D rotations of isotropic volumes (issue 19, ``data.augment_rotate_3d``): the cube's 48
symmetries drawn per sample from a word of their own and applied with one gather; with the
option off every 2-D and 3-D result is bitwise as before; the config refuses non-cubic tiles;
the plan turns it on for isotropic spacing and a cubic tile."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from test_plan_volumes import ANISOTROPIC, GPU, ISOTROPIC, _hand_made

from unetdist.config import ConfigError, DataConfig, load_config
from unetdist.data import augment, symmetries
from unetdist.data.loader import _options
from unetdist.plan import render_plan
from unetdist.planning import plan_config

ROOT = Path(__file__).resolve().parents[1]
ROTATE = augment.AugmentSpec(flips=True, rotate_3d=True)


def _codes_applied(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A labelled cube (voxel i holds i) under each of the 48 codes: image, mask, weight, and the input."""
    cube = torch.arange(size**3, dtype=torch.float32).view(1, 1, size, size, size).repeat(48, 1, 1, 1, 1)
    params = torch.zeros(48, augment.NUM_PARAMS)
    params[:, augment._CUBE] = torch.arange(48)
    params[:, :2], params[:, augment._Z_FLIP] = 1, 1  # turns, flip, z flip: rotate_3d replaces them
    image, mask, weight = augment.apply(cube, cube[:, 0].long(), cube[:, 0] * 2, params, torch.zeros(48), ROTATE)
    return image, mask, weight, cube


def test_every_one_of_the_48_symmetries_is_drawn_from_a_new_word():
    words = augment.sample_words(7, np.arange(4000))
    params, _ = augment.draw_params(words, ROTATE)
    codes = params[:, augment._CUBE]
    assert set(codes.astype(int).tolist()) == set(range(48))
    counts = np.bincount(codes.astype(int), minlength=48)
    assert counts.min() > 40 and counts.max() < 130  # about 4000 / 48 = 83 each
    assert augment._CUBE_WORD == augment.NUM_WORDS - 1 and augment._CUBE == augment.NUM_PARAMS - 1


@pytest.mark.parametrize("size", [4, 5])
def test_each_code_is_a_distinct_signed_permutation_of_the_axes_and_keeps_alignment(size):
    image, mask, weight, cube = _codes_applied(size)
    assert torch.equal(mask, image[:, 0].long()) and torch.equal(weight, image[:, 0] * 2)  # aligned
    grid = torch.stack(torch.meshgrid(*[torch.arange(size)] * 3, indexing="ij"), -1).view(-1, 3)  # output (z, y, x)
    matrices = set()
    for code in range(48):
        values = image[code, 0].reshape(-1).long()
        assert torch.equal(values.sort().values, torch.arange(size**3))  # a permutation of the voxels
        source = torch.stack([values // size**2, values // size % size, values % size], -1)  # input (z, y, x)
        # affine in the output voxel, with a signed permutation matrix: a symmetry of the cube
        origin = source[0]
        matrix = torch.stack([source[size ** (2 - axis)] - origin for axis in range(3)], 1)  # column per output axis
        assert torch.equal(matrix.abs().sum(0), torch.ones(3, dtype=torch.long))
        assert torch.equal(matrix.abs().sum(1), torch.ones(3, dtype=torch.long))
        assert torch.equal(source, grid @ matrix.T + origin)
        matrices.add(tuple(matrix.reshape(-1).tolist()))
        assert torch.equal(image[code], symmetries.cube_symmetry(cube[code], code))  # the permute/flip reference
    assert len(matrices) == 48  # all of the cube's symmetries (the group has exactly 48)
    assert torch.equal(image[0], cube[0])  # code 0: the identity


def test_non_cubic_tensors_and_configs_are_refused(tmp_path):
    volume = torch.zeros(2, 1, 4, 6, 6)
    params = torch.zeros(2, augment.NUM_PARAMS)
    with pytest.raises(ValueError, match="cubic"):
        augment.apply(volume, volume[:, 0].long(), None, params, torch.zeros(2), ROTATE)
    base = ["model.spatial_dims=3", "data.format=zarr", f"data.root={tmp_path}", "data.tile_size=32",
            "data.augment_rotate_3d=true"]  # fmt: skip
    for extra in (["data.tile_depth=16"], ["model.spatial_dims=2"], ["data.augment=false"]):
        with pytest.raises(ConfigError, match=r"data\.augment_rotate_3d=true.*data\.tile_depth"):
            load_config([], base + extra)
    for cubic in (["data.tile_depth=0"], ["data.tile_depth=32"]):
        assert load_config([], base + cubic).data.augment_rotate_3d
    assert _options(DataConfig(augment_rotate_3d=True), train=True, spatial_dims=3).spec.rotate_3d


# the commit before the cube's symmetries: the option off must give exactly what it gave
BEFORE_VOLUMES = "5eebf84fc435d06f900dcce73c8ebaedcea4a1f6"  # and before volumes: 2-D batches are what they were
BEFORE_ROTATIONS = "507ec9a8478677f6015c1b24131adae4e681fa62"


def _head_augment(commit: str = BEFORE_ROTATIONS) -> types.ModuleType:
    """unetdist/data/augment.py as it was before the cube's symmetries, loaded as a module of its own."""
    try:
        source = subprocess.run(["git", "show", f"{commit}:unetdist/data/augment.py"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("no git checkout to compare with")
    module = types.ModuleType("augment_at_head")
    sys.modules[module.__name__] = module  # dataclasses look their module up while defining a class
    try:
        exec(compile(source, "augment_at_head.py", "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]
    return module


@pytest.mark.parametrize(("shape", "commit"), [((16, 16), BEFORE_VOLUMES), ((16, 16), BEFORE_ROTATIONS),
                                              ((8, 8, 8), BEFORE_ROTATIONS), ((6, 8, 8), BEFORE_ROTATIONS)])
def test_with_the_option_off_words_params_and_batches_are_bitwise_as_before(shape, commit):
    old = _head_augment(commit)
    positions = np.arange(100, 106)
    words = augment.sample_words(3, positions)
    assert np.array_equal(words[:, : old.NUM_WORDS], old.sample_words(3, positions))
    kwargs = dict(flips=True, intensity=True, noise_std=0.05, elastic=True, elastic_sigma_px=2.0)
    spec, old_spec = augment.AugmentSpec(**kwargs), old.AugmentSpec(**kwargs)
    params, seeds = augment.draw_params(words, spec)
    old_params, old_seeds = old.draw_params(old.sample_words(3, positions), old_spec)
    assert np.array_equal(params[:, : old.NUM_PARAMS], old_params) and np.array_equal(seeds, old_seeds)
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.integers(0, 255, (6, 1, *shape), dtype=np.uint8))
    mask = torch.from_numpy(rng.integers(0, 3, (6, *shape), dtype=np.uint8))
    weight = torch.from_numpy(rng.random((6, *shape), dtype=np.float32))
    batch = {"image": image, "mask": mask, "weight": weight, "normalize": "zscore"}
    new = augment.to_model_input({**batch, "augment": (spec, params, seeds)})
    before = old.to_model_input({**batch, "augment": (old_spec, old_params, old_seeds)})
    for key in ("image", "mask", "weight"):
        assert torch.equal(new[key], before[key]), key


def test_the_plan_rotates_isotropic_cubic_tiles_only(tmp_path):
    fp = _hand_made(ISOTROPIC, (64, 64, 64))
    values, reasons = plan_config(fp, GPU)
    assert values["data"]["tile_depth"] == values["data"]["tile_size"]
    assert values["data"]["augment_rotate_3d"] is True and "48 symmetries" in reasons["data.augment"]
    assert "cubic tile" in reasons["data.augment_rotate_3d"]
    text = render_plan(fp, GPU)
    assert "augment_rotate_3d: true" in text
    out = tmp_path / "plan.yaml"
    out.write_text(text)
    assert load_config([out]).data.augment_rotate_3d
    # within 1.2x is isotropic; 4:1:1 is not, nor is an isotropic spacing whose tile is not a cube
    assert plan_config(_hand_made((1.15, 1.0, 1.0), (64, 64, 64)), GPU)[0]["data"]["augment_rotate_3d"] is True
    aniso_values, aniso_reasons = plan_config(_hand_made(ANISOTROPIC, (64, 128, 128)), GPU)
    assert aniso_values["data"]["augment_rotate_3d"] is False and "z flips" in aniso_reasons["data.augment_rotate_3d"]
    flat = plan_config(_hand_made(ISOTROPIC, (32, 128, 128)), GPU)[0]["data"]
    assert flat["tile_depth"] != flat["tile_size"] and flat["augment_rotate_3d"] is False
