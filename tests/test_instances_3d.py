"""Instances of volumes (issue 19): 3-D boundary targets decoded back to the exact objects, the
distance watershed splitting touching balls, 3-D matching counted by hand, the 3-D defaults and
tuning grid, validation of 3-D tiles, and ``predict --instances`` with a 3-D model (Zarr, TIFF)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from unetdist.decoding import decoding_grid, tuning_counts
from unetdist.instance_metrics import average_precision, match_counts
from unetdist.instance_targets import boundary_classes
from unetdist.instance_validation import InstanceValidation, ap_metrics, tune_decoding
from unetdist.instances import (
    DEFAULT_MIN_SIZE,
    DEFAULT_MIN_SIZE_3D,
    DecodeParams,
    decode_instances,
    decode_min_size_variants,
    instances_from_labels,
)
from unetdist.model import build_unet


def _balls(shape: tuple[int, int, int], spacing: int, seed: int) -> np.ndarray:
    """int32 ZxYxX ids of touching balls: centres on a jittered grid ``spacing`` apart, radii a bit
    over half of it, each voxel to the nearest centre within its radius (so neighbours share
    faces, and every ball is large enough for an interior)."""
    rng = np.random.default_rng(seed)
    axes = [np.arange(spacing // 2, side - spacing // 3, spacing) for side in shape]
    centres = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3).astype(np.float64)
    centres += rng.uniform(-1.5, 1.5, centres.shape)
    radii = rng.uniform(0.55, 0.7, len(centres)) * spacing
    keep = rng.random(len(centres)) < 0.85  # some gaps, so that the background is not only the edges
    centres, radii = centres[keep], radii[keep]
    grid = np.indices(shape).reshape(3, -1).T
    scaled = np.linalg.norm(grid[:, None, :] - centres[None], axis=-1) / radii  # [voxels, balls]
    nearest = scaled.argmin(axis=1)
    inside = scaled[np.arange(len(grid)), nearest] < 1.0
    return np.where(inside, nearest + 1, 0).astype(np.int32).reshape(shape)


def _one_hot(classes: np.ndarray, num_classes: int) -> np.ndarray:
    return np.moveaxis(np.eye(num_classes, dtype=np.float32)[classes], -1, 0)


@pytest.fixture(scope="module")
def volumes() -> list[np.ndarray]:
    return [_balls((32, 40, 36), 12, seed) for seed in range(2)]


# ---------------------------------------------------------------- boundary target


@pytest.mark.parametrize(("width_px", "spacing"), [(1, None), (2, None), (2, (2.0, 1.0, 1.0))])
def test_exact_boundary_probabilities_give_exact_volumes(volumes, width_px, spacing) -> None:
    params = DecodeParams.defaults("boundary", spatial_dims=3)
    for truth in volumes:
        assert len(np.unique(truth)) > 10
        probabilities = _one_hot(boundary_classes(truth, width_px, spacing), 3)
        instances = decode_instances(probabilities, params)
        assert instances.shape == truth.shape and instances.dtype == np.uint16
        assert average_precision(match_counts(truth, instances)).tolist() == [1.0, 1.0, 1.0]


def test_noisy_boundary_probabilities_still_find_every_ball(volumes) -> None:
    rng = np.random.default_rng(3)
    truth = volumes[0]
    probabilities = _one_hot(boundary_classes(truth, 2), 3) + rng.uniform(0, 0.4, (3, *truth.shape))
    probabilities = (probabilities / probabilities.sum(axis=0)).astype(np.float32)
    instances = decode_instances(probabilities, DecodeParams.defaults("boundary", spatial_dims=3))
    assert average_precision(match_counts(truth, instances))[0] == 1.0


def test_a_speck_of_interior_does_not_split_a_ball_and_diagonal_parts_stay_in_it() -> None:
    truth = (np.linalg.norm(np.indices((24, 24, 24)).transpose(1, 2, 3, 0) - 12, axis=-1) < 8).astype(np.int32)
    classes = boundary_classes(truth, 2)
    assert classes[12, 12, 5] == 2 and not (classes[11:14, 11:14, 4:7] == 1).any()
    classes[12, 12, 5] = 1  # a stray interior voxel in the rim, apart from the interior: no seed of its own
    probabilities = _one_hot(classes, 3)
    instances = decode_instances(probabilities, DecodeParams.defaults("boundary", spatial_dims=3))
    assert instances.max() == 1 and (instances > 0).sum() == (truth > 0).sum()
    assert decode_instances(probabilities, DecodeParams("boundary", min_size=1)).max() == 2  # kept: a second seed
    # a voxel joined to the ball by a corner only is part of it (26-connected), not an object
    corner = np.zeros((3, 6, 6, 6), np.float32)
    corner[0] = 1
    corner[:, 1:4, 1:4, 1:4] = [[[[0]]], [[[1]]], [[[0]]]]
    corner[:, 4, 4, 4] = [0, 0, 1]
    decoded = decode_instances(corner, DecodeParams("boundary", min_size=1))
    assert decoded.max() == 1 and decoded[4, 4, 4] == 1


# ---------------------------------------------------------------- semantic target


def test_distance_watershed_separates_two_touching_balls() -> None:
    grid = np.indices((24, 24, 36)).transpose(1, 2, 3, 0)
    left = np.linalg.norm(grid - (12, 12, 11), axis=-1) < 8
    right = np.linalg.norm(grid - (12, 12, 25), axis=-1) < 8  # 14 apart: they overlap, a neck between
    truth = np.where(left, 1, 0) + np.where(right & ~left, 2, 0)
    components = instances_from_labels(truth > 0, split_touching=False)  # one 26-connected blob
    assert components.max() == 1 and components.dtype == np.uint16
    foreground = (truth > 0).astype(np.float32)
    probabilities = np.stack([1 - foreground, foreground])
    instances = decode_instances(probabilities, DecodeParams.defaults("semantic", spatial_dims=3))
    assert instances.max() == 2
    assert average_precision(match_counts(truth, instances, (0.5, 0.9))).tolist() == [1.0, 1.0]
    # the class-label form (predict --border-class off) splits them the same way
    assert instances_from_labels(truth > 0, min_size=DEFAULT_MIN_SIZE_3D).max() == 2


def test_border_class_labels_grow_into_the_border_in_3d(volumes) -> None:
    truth = volumes[1]
    classes = boundary_classes(truth, 1)
    instances = instances_from_labels(classes, border_class=2, min_size=DEFAULT_MIN_SIZE_3D)
    assert average_precision(match_counts(truth, instances))[0] == 1.0


def test_min_size_variants_equal_separate_decodings_in_3d(volumes) -> None:
    truth = volumes[0]
    boundary = _one_hot(boundary_classes(truth, 2), 3)
    foreground = (truth > 0).astype(np.float32)
    for probabilities, target in ((boundary, "boundary"), (np.stack([1 - foreground, foreground]), "semantic")):
        params = DecodeParams.defaults(target, spatial_dims=3)
        sizes = [50, 100, 400, 2000]
        for size, variant in zip(sizes, decode_min_size_variants(probabilities, params, sizes), strict=True):
            np.testing.assert_array_equal(
                variant, decode_instances(probabilities, DecodeParams(target, min_size=size))
            )


# ---------------------------------------------------------------- matching, defaults, grid


def test_matching_counts_a_3d_hand_case() -> None:
    truth = np.zeros((8, 8, 8), np.int64)
    truth[0:4, 0:4, 0:4] = 5  # 64 voxels
    truth[6:8, 6:8, 6:8] = 9  # 8 voxels
    pred = np.zeros_like(truth)
    pred[0:3, 0:4, 0:4] = 1  # 48 of the 64: IoU exactly 0.75
    pred[6:8, 6:8, 6:8] = 2  # IoU 1
    pred[0:2, 6:8, 0:2] = 3  # nothing there: a false positive
    counts = match_counts(truth, pred, (0.5, 0.75, 0.9))
    assert counts.tolist() == [[2, 1, 0], [2, 1, 0], [1, 2, 1]]
    assert average_precision(counts).tolist() == [2 / 3, 2 / 3, 1 / 4]  # tp / (tp + fp + fn)


def test_3d_defaults_and_grid_count_voxels() -> None:
    assert DecodeParams.defaults("boundary") == DecodeParams(target="boundary")  # 2-D: as before
    assert DecodeParams.defaults("semantic", 3).min_size == DEFAULT_MIN_SIZE_3D > DEFAULT_MIN_SIZE
    with pytest.raises(ValueError, match="spatial_dims=4"):
        DecodeParams.defaults("semantic", 4)
    assert decoding_grid("boundary") == decoding_grid("boundary", spatial_dims=2)
    volumes_grid = decoding_grid("boundary", spatial_dims=3)
    assert len(volumes_grid) == 100
    assert sorted({params.min_size for params in volumes_grid}) == [50, 100, 200, 300]
    semantic = decoding_grid("semantic", 4000.0, spatial_dims=3)  # a ball ~20 voxels across
    assert sorted({params.min_distance for params in semantic}) == [3, 4, 6]
    assert sorted({params.min_size for params in semantic}) == [200, 400, 800, 1200]


# ---------------------------------------------------------------- validation of 3-D tiles


def test_instance_validation_and_tuning_of_3d_tiles(volumes) -> None:
    scores = InstanceValidation(DecodeParams.defaults("boundary", 3), keep_for_tuning=True)
    for truth in volumes:
        classes = torch.from_numpy(boundary_classes(truth, 1).astype(np.int64))
        logits = torch.nn.functional.one_hot(classes, 3).permute(3, 0, 1, 2).float()[None] * 20.0
        padded = torch.from_numpy(np.pad(truth, 2))[None]  # valid convs: the truth is larger than the logits
        predicted = scores.add(logits, padded)
        assert predicted.shape == (1, *truth.shape) and predicted.max() > 10
    assert scores.spatial_dims == 3
    assert ap_metrics(scores.counts) == {"val/ap50": 1.0, "val/ap75": 1.0, "val/ap90": 1.0}
    params, ap = tune_decoding(scores, "boundary", lambda counts: counts)
    assert ap == 1.0 and params.min_size in (50, 100, 200, 300)  # the voxel grid
    grid = decoding_grid("boundary", spatial_dims=3)[:3]
    counts = tuning_counts(scores.kept_probabilities, scores.kept_truths, grid)
    assert counts.shape == (3, 3) and (counts[:, 1:] == 0).all()


# ---------------------------------------------------------------- predict --instances


def _checkpoint(directory: Path, target: str) -> Path:
    """A seeded random-weight padded 3-D model as a trainer checkpoint (as tests/test_predict_3d.py)."""
    torch.manual_seed(0)
    model = build_unet("padded", 1, 3, base_width=2, depth=1, spatial_dims=3).eval()
    config = {"preset": "padded", "in_channels": 1, "num_classes": 3, "base_width": 2, "depth": 1,
              "norm": model.norm, "spatial_dims": 3, "z_pools": -1}  # fmt: skip
    state = {"model": model.state_dict(), "step": 1,
             "config": {"model": config, "data": {"tile_size": 16, "tile_depth": 16}, "loss": {"target": target}}}  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / "model.pt")
    return directory / "model.pt"


@pytest.mark.parametrize("target", ["boundary", "semantic"])
def test_predict_instances_of_a_3d_model_zarr_and_tiff(tmp_path: Path, target: str) -> None:
    import zarr

    from unetdist.inference.cli import main

    checkpoint = _checkpoint(tmp_path / "ckpt", target)
    volume = np.random.default_rng(1).integers(0, 255, (12, 20, 18)).astype(np.uint8)
    zarr.create_array(store=str(tmp_path / "vol.zarr"), data=volume, chunks=(8, 16, 16), overwrite=True)
    stacks = tmp_path / "stacks"
    stacks.mkdir()
    tifffile.imwrite(stacks / "zyx.tif", volume)
    out = tmp_path / "out"
    code = main(["--model", str(checkpoint), "--input", str(tmp_path / "vol.zarr"), str(stacks),
                 "--output", str(out), "--instances", "--min-size", "1", "--device", "cpu"])  # fmt: skip
    assert code == 0
    ids = zarr.open_array(str(out / "vol_instances.zarr"))
    assert ids.shape == volume.shape and ids.dtype == np.uint32
    assert zarr.open_array(str(out / "vol_mask.zarr")).shape == volume.shape
    stack_ids = tifffile.imread(out / "zyx_instances.tif")
    assert stack_ids.shape == volume.shape and stack_ids.dtype in (np.uint16, np.uint32)
    assert not (out / ".vol_instances.zarr.probabilities.partial").exists()  # the scratch is gone
    for found in (ids[:], stack_ids):  # ids 1..N consecutive (random weights: maybe no background)
        assert found.max() >= 1 and set(range(1, int(found.max()) + 1)) <= set(np.unique(found))
