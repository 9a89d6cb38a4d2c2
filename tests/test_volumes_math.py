"""Volumes (issue 19) in the pure parts: windows, augmentation, losses, metrics, crops, panels,
weight maps and boundary targets on 3 spatial axes, and 2-D left as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unetdist.data import augment
from unetdist.geometry import center_crop, crop_to_logits
from unetdist.instance_targets import BOUNDARY, INTERIOR, boundary_classes
from unetdist.losses import SegmentationLoss, pixel_cross_entropy, soft_dice_loss
from unetdist.metrics import confusion_from_logits, confusion_matrix
from unetdist.reports import MIN_PANEL_HEIGHT_PX, SEPARATOR_PX, panel
from unetdist.weight_map import border_weight_map, border_weight_map_reference

IGNORE = 255


# ---------------------------------------------------------------- windows


def test_volume_words_come_after_the_2d_ones_which_do_not_move():
    positions = np.arange(50)
    words = augment.sample_words(5, positions)
    assert np.array_equal(words[:, : augment._DEPTH], augment.sample_words(5, positions, count=augment._DEPTH))


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_2d_windows_of_an_int_tile_are_those_of_its_square_shape(fraction):
    rng = np.random.default_rng(0)
    words = augment.sample_words(1, np.arange(200))
    shapes = [(int(rng.integers(32, 90)), int(rng.integers(32, 90))) for _ in range(200)]
    points = [rng.integers(0, 32, (int(rng.integers(0, 3)), 2)) for _ in range(200)]
    square = augment.point_windows(shapes, points.__getitem__, 32, words, fraction)
    assert square == augment.point_windows(shapes, points.__getitem__, (32, 32), words, fraction)
    for (height, width), (top, left) in zip(shapes, square, strict=True):
        assert 0 <= top <= height - 32 and 0 <= left <= width - 32


def test_3d_windows_lie_inside_and_foreground_ones_hold_the_picked_voxel():
    rng = np.random.default_rng(1)
    count, tile = 300, (8, 16, 12)
    words = augment.sample_words(2, np.arange(count))
    shapes = [tuple(int(v) for v in rng.integers((8, 16, 12), (30, 50, 40))) for _ in range(count)]
    points = [np.stack([rng.integers(0, axis, 5) for axis in shape], axis=1) for shape in shapes]
    uniform = augment.point_windows(shapes, points.__getitem__, tile, words, 0.0)
    centred = augment.point_windows(shapes, points.__getitem__, tile, words, 1.0)
    for i, (shape, corner, around) in enumerate(zip(shapes, uniform, centred, strict=True)):
        for window in (corner, around):
            assert len(window) == 3
            assert all(0 <= at <= axis - size for at, axis, size in zip(window, shape, tile, strict=True))
        picked = points[i][int(words[i, augment._PICK]) % len(points[i])]
        assert all(at <= v < at + size for v, at, size in zip(picked, around, tile, strict=True))
    assert len({corner[0] for corner in uniform}) > 10  # z is drawn, not pinned


def test_crop_windows_of_volume_masks_with_a_cube_tile():
    masks = [np.zeros((10, 20, 20), np.uint8) for _ in range(20)]
    for mask in masks:
        mask[9, 19, 0] = 1
    windows = augment.crop_windows(masks, 6, augment.sample_words(3, np.arange(20)), 1.0)
    assert windows == [(4, 14, 0)] * 20  # the one voxel, its window clamped to the corner


# ---------------------------------------------------------------- augmentation


def _blocks(batch: int, shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """uint8 labels in 2x2x2 blocks: a mask whose pixels have neighbours of the same label."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, 4, (batch, *(size // 2 for size in shape)), generator=generator, dtype=torch.uint8)
    return coarse.repeat_interleave(2, 1).repeat_interleave(2, 2).repeat_interleave(2, 3)


def _params(spec: augment.AugmentSpec, count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    params, seeds = augment.draw_params(augment.sample_words(seed, np.arange(count)), spec)
    return torch.from_numpy(params), torch.from_numpy(seeds)


def test_z_flip_is_drawn_for_about_half_the_samples_and_flips_z():
    spec = augment.AugmentSpec(flips=True)
    params, seeds = _params(spec, 2000)
    share = float(params[:, augment._Z_FLIP].mean())
    assert 0.45 < share < 0.55
    volume = torch.arange(4 * 6 * 6, dtype=torch.float32).view(1, 1, 4, 6, 6).repeat(8, 1, 1, 1, 1)
    some = params[:8].clone()
    some[:, :2] = 0  # no in-plane turn or flip: only z
    image, _, _ = augment.apply(volume, volume[:, 0].to(torch.uint8), None, some, seeds[:8], spec)
    for index in range(8):
        flipped = bool(some[index, augment._Z_FLIP])
        assert torch.equal(image[index], volume[index].flip(-3) if flipped else volume[index])


@pytest.mark.parametrize("elastic", [False, True])
def test_volume_image_mask_and_weight_stay_aligned(elastic):
    spec = augment.AugmentSpec(flips=True, elastic=elastic, elastic_sigma_px=2.0)
    mask = _blocks(6, (8, 12, 12), seed=3)
    image = mask[:, None].float()
    params, seeds = _params(spec, 6, seed=4)
    out_image, out_mask, out_weight = augment.apply(image, mask, mask.float(), params, seeds, spec)
    assert out_image.shape == image.shape and out_mask.shape == mask.shape and out_mask.dtype == torch.uint8
    assert torch.equal(out_weight, out_mask.float())  # both sampled nearest, at the same places
    if elastic:
        assert not torch.equal(out_mask, augment.apply(image, mask, None, params, seeds,
                                                       augment.AugmentSpec(flips=True))[1])
        # the image is sampled trilinearly: where it lands on a whole label (the mask is flat around
        # the sample) it agrees with the mask's nearest sample; a misplaced mask would agree at ~1/4
        flat = (out_image[:, 0] - out_image[:, 0].round()).abs() < 1e-3
        assert flat.float().mean() > 0.2
        assert (out_image[:, 0].round()[flat] == out_mask.float()[flat]).float().mean() > 0.99
    else:
        assert torch.equal(out_image[:, 0], out_mask.float())


def test_zero_volume_displacements_leave_the_volume_as_it_was():
    spec = augment.AugmentSpec(flips=False, elastic=True)
    image = torch.rand(2, 2, 5, 7, 9, generator=torch.Generator().manual_seed(5))
    params = torch.zeros(2, augment.NUM_PARAMS)
    out, _, _ = augment.apply(image, image[:, 0] > 0.5, None, params, torch.zeros(2, dtype=torch.int64), spec)
    torch.testing.assert_close(out, image, atol=1e-5, rtol=0)


def test_volume_intensity_noise_and_normalisation_are_per_sample_and_channel():
    spec = augment.AugmentSpec(flips=False, intensity=True, noise_std=0.05)
    stored = torch.randint(0, 256, (3, 2, 4, 8, 8), generator=torch.Generator().manual_seed(6), dtype=torch.uint8)
    params, seeds = _params(spec, 3)
    batch = {"image": stored, "mask": torch.zeros(3, 4, 8, 8, dtype=torch.uint8), "normalize": "zscore",
             "augment": (spec, params.numpy(), seeds.numpy())}
    image = augment.to_model_input(batch)["image"]
    assert image.shape == (3, 2, 4, 8, 8)
    torch.testing.assert_close(image.mean(dim=(-3, -2, -1)), torch.zeros(3, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(image.std(dim=(-3, -2, -1), unbiased=False), torch.ones(3, 2), atol=1e-4, rtol=0)
    floats = torch.rand(2, 1, 3, 10, 10, generator=torch.Generator().manual_seed(7)) * 5 + 2
    unit = augment.unit_range(floats)
    assert torch.allclose(unit.amin(dim=(-3, -2, -1)), torch.zeros(2, 1))
    assert torch.allclose(unit.amax(dim=(-3, -2, -1)), torch.ones(2, 1), atol=1e-5)
    clipped = augment.percentile_clip(floats)
    for b in range(2):
        voxels = floats[b, 0].numpy().ravel()
        low, high = (np.quantile(voxels, q / 100.0, method="lower") for q in augment.CLIP_PERCENTILES)
        np.testing.assert_array_equal(clipped[b, 0].numpy().ravel(), np.clip(voxels, low, high))


# ---------------------------------------------------------------- losses and metrics


def _volume_logits_and_target() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 3, 4, 5, 6, generator=generator, requires_grad=True)
    target = torch.randint(0, 3, (2, 6, 7, 8), generator=generator)  # larger: valid-conv, cropped
    ignored = torch.rand(2, 6, 7, 8, generator=generator) < 0.3
    target[ignored] = IGNORE
    weight = torch.rand(2, 6, 7, 8, generator=generator) + 0.5
    return logits, target, weight


def _kept(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor):
    """The counted voxels only, as a [1, C, K, 1] batch with [1, K, 1] targets and weights."""
    target, weight = center_crop(target, logits.shape[2:]), center_crop(weight, logits.shape[2:])
    keep = target != IGNORE
    flat_logits = logits.movedim(1, -1)[keep].T[None, :, :, None]
    return flat_logits, target[keep][None, :, None], weight[keep][None, :, None]


@pytest.mark.parametrize("kind", ["ce", "dice_ce"])
def test_ignored_voxels_add_no_loss_and_no_gradient(kind):
    logits, target, weight = _volume_logits_and_target()
    loss = SegmentationLoss(kind, num_classes=3, ignore_index=IGNORE)(logits, target, weight)
    loss.backward()
    ignored = center_crop(target, logits.shape[2:]) == IGNORE
    assert ignored.any() and (~ignored).any()
    assert torch.equal(logits.grad.movedim(1, -1)[ignored], torch.zeros(int(ignored.sum()), 3))
    assert logits.grad.movedim(1, -1)[~ignored].abs().sum() > 0
    kept_logits, kept_target, kept_weight = _kept(logits.detach(), target, weight)
    expected = SegmentationLoss(kind, num_classes=3)(kept_logits, kept_target, kept_weight)
    torch.testing.assert_close(loss.detach(), expected)


def test_ignored_voxels_are_left_out_of_the_ce_mean_and_of_dice():
    logits, target, weight = _volume_logits_and_target()
    logits = logits.detach()
    kept_logits, kept_target, kept_weight = _kept(logits, target, weight)
    keep = kept_target.numel()
    ce = (F.cross_entropy(kept_logits, kept_target, reduction="none") * kept_weight).sum() / keep
    torch.testing.assert_close(pixel_cross_entropy(logits, target, weight, ignore_index=IGNORE), ce)
    torch.testing.assert_close(soft_dice_loss(logits, target, 3, ignore_index=IGNORE),
                               soft_dice_loss(kept_logits, kept_target, 3))
    everything_ignored = torch.full_like(target, IGNORE)
    assert float(pixel_cross_entropy(logits, everything_ignored, ignore_index=IGNORE)) == 0.0


def test_volume_losses_without_ignore_match_their_definition():
    logits, target, weight = _volume_logits_and_target()
    target = target.clamp(max=2)
    cropped = center_crop(target, logits.shape[2:])
    expected = (F.cross_entropy(logits, cropped, reduction="none") * center_crop(weight, logits.shape[2:])).mean()
    torch.testing.assert_close(pixel_cross_entropy(logits, target, weight), expected)
    probabilities = torch.softmax(logits, 1)
    one_hot = F.one_hot(cropped, 3).movedim(-1, 1).float()
    dice = (2 * (probabilities * one_hot).sum((0, 2, 3, 4)) + 1e-5) / (
        probabilities.sum((0, 2, 3, 4)) + one_hot.sum((0, 2, 3, 4)) + 1e-5)
    torch.testing.assert_close(soft_dice_loss(logits, target, 3), 1 - dice.mean())


def test_ignored_voxels_are_counted_nowhere_in_the_confusion_matrix():
    logits, target, _ = _volume_logits_and_target()
    confusion = confusion_from_logits(logits.detach(), target, 3, ignore_index=IGNORE)
    cropped = center_crop(target, logits.shape[2:])
    keep = cropped != IGNORE
    expected = confusion_matrix(logits.detach().argmax(1)[keep], cropped[keep], 3)
    assert torch.equal(confusion, expected)
    assert int(confusion.sum()) == int(keep.sum())
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        confusion_matrix(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, IGNORE, 7]), 3, ignore_index=IGNORE)


# ---------------------------------------------------------------- geometry


def test_center_crop_crops_the_trailing_axes_of_a_volume():
    volume = torch.arange(2 * 6 * 7 * 9).view(2, 6, 7, 9)
    assert torch.equal(center_crop(volume, (4, 3, 5)), volume[:, 1:5, 2:5, 2:7])
    assert torch.equal(center_crop(volume, (3, 5)), volume[..., 2:5, 2:7])
    with pytest.raises(ValueError, match="cannot center-crop 6x7x9 to the larger 8x3x5"):
        center_crop(volume, (8, 3, 5))


def test_crop_to_logits_takes_volume_targets_and_names_the_misfit():
    logits = torch.zeros(2, 3, 4, 5, 6)
    assert crop_to_logits(logits, torch.zeros(2, 6, 7, 8)).shape == (2, 4, 5, 6)
    with pytest.raises(ValueError, match=r"weight shape \(2, 3, 7, 8\).*expected \[2, D>=4, H>=5, W>=6\]"):
        crop_to_logits(logits, torch.zeros(2, 3, 7, 8), "weight")
    with pytest.raises(ValueError, match=r"target must be \[N, D, H, W\]"):
        crop_to_logits(logits, torch.zeros(2, 7, 8))


# ---------------------------------------------------------------- panels


@pytest.mark.parametrize("with_instances", [False, True])
def test_volume_panel_shows_the_three_central_slices(with_instances):
    rng = np.random.default_rng(9)
    image = rng.standard_normal((1, 12, 20, 24)).astype(np.float32)  # cropped to the maps' 8x16x18
    truth = np.zeros((8, 16, 18), np.int64)
    truth[2:6, 4:12, 5:14] = 1
    instances = (truth, truth) if with_instances else (None, None)
    strip = panel(image, truth, truth, *instances)
    scale = -(-MIN_PANEL_HEIGHT_PX // 16)
    parts = 5 if with_instances else 4
    height = (16 + 8 + 8) * scale + 2 * SEPARATOR_PX  # xy (Y high), xz and yz (Z high)
    width = parts * 18 * scale + (parts - 1) * SEPARATOR_PX  # the widest plane: X
    assert strip.dtype == np.uint8 and strip.shape == (height, width, 3)
    truth_xy = strip[: 16 * scale, 18 * scale + SEPARATOR_PX : 2 * 18 * scale + SEPARATOR_PX]
    assert tuple(truth_xy[8 * scale, 8 * scale]) == (255, 255, 255)  # inside the box on the central plane
    assert tuple(truth_xy[0, 0]) == (0, 0, 0)


# ---------------------------------------------------------------- weight map and boundary targets


def _two_boxes(gap: int) -> np.ndarray:
    volume = np.zeros((12, 16, 30), np.int32)
    volume[3:9, 4:12, 4:12] = 1
    volume[3:9, 4:12, 12 + gap : 20 + gap] = 2
    return volume


@pytest.mark.parametrize("method", ["exact", "per_slice"])
def test_volume_weight_map_is_higher_between_close_objects(method):
    close = border_weight_map(_two_boxes(2), spatial_dims=3, method=method)
    far = border_weight_map(_two_boxes(8), spatial_dims=3, method=method)
    assert close.shape == (12, 16, 30) and close.dtype == np.float32
    assert close[6, 8, 12] > far[6, 8, 12] > 1.0  # in the gap, just beside the first box
    assert close[6, 8, 12] > close[0, 0, 29]  # than far from both


def test_exact_volume_weight_map_matches_the_brute_force_one_also_anisotropic():
    volume = np.zeros((6, 10, 10), np.int32)
    volume[1:3, 1:4, 1:4], volume[3:5, 5:8, 2:6], volume[2:4, 2:5, 6:9] = 1, 2, 3
    for spacing in (None, (2.5, 1.0, 1.0)):
        np.testing.assert_allclose(
            border_weight_map(volume, sigma=2.0, spatial_dims=3, method="exact", spacing=spacing),
            border_weight_map_reference(volume, sigma=2.0, spatial_dims=3, spacing=spacing), rtol=1e-5)
    per_slice = border_weight_map(volume, sigma=2.0, spatial_dims=3, method="per_slice")
    class_term = border_weight_map(volume, w0=0.0, spatial_dims=3)
    for z in range(6):  # each slice's own border term over the volume's class balance
        slice_border = border_weight_map(volume[z], sigma=2.0, class_weights=np.zeros(2))
        np.testing.assert_allclose(per_slice[z], class_term[z] + slice_border, rtol=1e-6)
    with pytest.raises(ValueError, match="spatial_dims=3"):
        border_weight_map(volume)


def test_volume_boundary_classes_draw_a_3d_rim():
    volume = np.zeros((9, 9, 9), np.int32)
    volume[1:8, 1:8, 1:8] = 1
    classes = boundary_classes(volume, 1)
    assert (classes == INTERIOR).sum() == 5**3 and classes[1, 4, 4] == BOUNDARY and classes[0, 4, 4] == 0
    stacked = np.zeros((8, 6, 6), np.int32)
    stacked[:4], stacked[4:] = 1, 2  # touching along a coarse z: still a rim between them
    classes = boundary_classes(stacked, 1, spacing=(4.0, 1.0, 1.0))
    assert classes[3, 3, 3] == BOUNDARY and classes[4, 3, 3] == BOUNDARY and classes[1, 3, 3] == INTERIOR
