"""Tests for the 3-D U-Net (issue 19): the same blocks built by dimension, anisotropic z
pooling, the ``cicek`` preset, shape arithmetic per axis, and a 2-D model left bitwise as it was.

Widths are tiny and volumes small: geometry does not depend on width.
"""

from __future__ import annotations

import copy
import hashlib
import math

import pytest
import torch
from torch import nn

from unetdist.model import (
    NORMS,
    build_unet,
    check_input_shape,
    make_norm,
    output_shape,
    output_size,
    valid_input_sizes,
)


@pytest.fixture(autouse=True)
def one_thread():
    # Volumes this small gain nothing from threads, and on a shared machine a second OpenMP
    # thread waiting at every op's barrier made the training tests 15x slower (0.8 s -> 13 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def logits_shape(model: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    model.eval()
    with torch.no_grad():
        return tuple(model(torch.randn(1, model.in_channels, *shape)).shape)


def state_dict_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(str(tuple(value.shape)).encode())
        digest.update(value.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


# --- the 2-D model is the one it always was ---------------------------------------------

# sha256 of keys, shapes and values of seeded 2-D models, taken before the blocks learned 3-D:
# the same modules, built in the same order, draw the same numbers.
DIGESTS_2D = {
    ("paper", "none", 2): "60a3473e7ce3c2df",
    ("article", "batch", 2): "547c94efbf4030fa",
    ("padded", "batch", 3): "263c92d063ed1df4",
    ("padded", "instance", 2): "5178949fe298727d",
}


@pytest.mark.parametrize(("preset", "norm", "depth"), list(DIGESTS_2D))
def test_2d_state_dict_is_unchanged(preset, norm, depth):
    torch.manual_seed(0)
    model = build_unet(preset, 1, 2, base_width=4, depth=depth, norm=norm)
    assert state_dict_digest(model).startswith(DIGESTS_2D[(preset, norm, depth)])
    assert model.spatial_dims == 2 and model.z_pools is None
    assert not any(isinstance(m, (nn.Conv3d, nn.MaxPool3d, nn.BatchNorm3d)) for m in model.modules())


def test_2d_output_shape_is_output_size_per_axis():
    model = build_unet("paper", 1, 2, base_width=4, depth=2)
    assert model.output_shape((92, 108)) == (model.output_size(92), model.output_size(108)) == (52, 68)


# --- 3-D blocks ---------------------------------------------------------------------------


@pytest.mark.parametrize("norm", NORMS)
def test_3d_padded_output_shape_equals_input_shape(norm):
    model = build_unet("padded", 2, 3, base_width=2, depth=2, norm=norm, spatial_dims=3)
    assert logits_shape(model, (8, 12, 16)) == (1, 3, 8, 12, 16)
    assert model.output_shape((8, 12, 16)) == (8, 12, 16)
    layer_types = {type(m) for m in model.modules()}
    assert {nn.Conv3d, nn.MaxPool3d, nn.ConvTranspose3d} <= layer_types
    assert not layer_types & {nn.Conv2d, nn.MaxPool2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.InstanceNorm2d}
    convs = [m for m in model.modules() if isinstance(m, nn.Conv3d) and m is not model.out_conv]
    assert all(conv.kernel_size == (3, 3, 3) for conv in convs)


def test_make_norm_by_dimension():
    assert isinstance(make_norm("batch", 4, 3), nn.BatchNorm3d)
    assert isinstance(make_norm("instance", 4, 3), nn.InstanceNorm3d) and make_norm("instance", 4, 3).affine
    assert isinstance(make_norm("group", 12, 3), nn.GroupNorm) and make_norm("group", 12, 3).num_groups == 6
    assert isinstance(make_norm("batch", 4), nn.BatchNorm2d)
    with pytest.raises(ValueError, match="spatial_dims"):
        make_norm("batch", 4, 1)


def test_he_init_counts_3d_taps():
    torch.manual_seed(0)
    model = build_unet("padded", 1, 2, base_width=16, depth=2, norm="none", spatial_dims=3, z_pools=1)
    conv = model.encoder[1][1][0]  # 3x3x3 over 16 channels: 432 incoming taps
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (27 * 16)), rel=0.05)
    for up in (model.decoder[0].up, model.decoder[1].up):  # 2x2x2 and 1x2x2 stride = kernel: one tap each
        assert up.weight.std().item() == pytest.approx(math.sqrt(2 / up.in_channels), rel=0.05)
        assert up.kernel_size == up.stride


# --- anisotropic pooling ------------------------------------------------------------------


def test_z_pools_pools_z_at_the_deepest_levels_only():
    model = build_unet("padded", 1, 2, base_width=2, depth=3, spatial_dims=3, z_pools=1)
    assert model.z_pools == 1
    pools = [model.encoder[1][0], model.encoder[2][0], model.bottleneck[0]]
    assert [pool.kernel_size for pool in pools] == [(1, 2, 2), (1, 2, 2), 2]
    ups = [level.up for level in model.decoder]  # deepest first
    assert [up.stride for up in ups] == [(2, 2, 2), (1, 2, 2), (1, 2, 2)]
    bottom = []
    model.bottleneck.register_forward_hook(lambda module, inputs, output: bottom.append(output.shape[2:]))
    assert logits_shape(model, (8, 32, 32)) == (1, 2, 8, 32, 32)
    assert bottom == [(4, 4, 4)]  # z halved once, y and x three times
    # every level by default, as in 2-D
    assert build_unet("padded", 1, 2, base_width=2, depth=3, spatial_dims=3).z_pools == 3


def test_valid_anisotropic_model_matches_the_arithmetic():
    model = build_unet("article", 1, 2, base_width=1, depth=2, spatial_dims=3, z_pools=1)
    z = valid_input_sizes("article", 2, 1, 60, pools=1)[0]
    y = valid_input_sizes("article", 2, 1, 60)[0]
    shape = (z, y, y)
    expected = output_shape("article", 2, shape, z_pools=1)
    in_plane = output_size("article", 2, y)
    assert expected == (output_size("article", 2, z, pools=1), in_plane, in_plane)
    assert logits_shape(model, shape)[2:] == expected == model.output_shape(shape)
    # an axis never pooled only loses the convs' border: 8 per level and 4 at the bottom
    assert output_size("cicek", 2, 30, pools=0) == 30 - 4 * 5


# --- the cicek preset ---------------------------------------------------------------------


def test_cicek_132x132x116_gives_44x44x28():
    # x, y: 132 -4 =128 /2 64 -4 60 /2 30 -4 26 /2 13, bottom -4 9, x2 18 -4 14, x2 28 -4 24, x2 48 -4 44
    # z:    116 -4 =112 /2 56 -4 52 /2 26 -4 22 /2 11, bottom -4 7,  x2 14 -4 10, x2 20 -4 16, x2 32 -4 28
    assert output_shape("cicek", 3, (116, 132, 132)) == (28, 44, 44)
    check_input_shape("cicek", 3, (116, 132, 132))


def test_cicek_widens_inside_each_block_and_counts_as_the_paper():
    model = build_unet("cicek", 3, 3, spatial_dims=3)
    assert (model.base_width, model.depth, model.norm, model.padded) == (32, 3, "batch", False)
    first = [m for m in model.encoder[0] if isinstance(m, nn.Conv3d)]
    assert [(c.in_channels, c.out_channels) for c in first] == [(3, 32), (32, 64)]
    bottom = [m for m in model.bottleneck.modules() if isinstance(m, nn.Conv3d)]
    assert [(c.in_channels, c.out_channels) for c in bottom] == [(256, 256), (256, 512)]
    assert (model.decoder[0].up.in_channels, model.decoder[0].up.out_channels) == (512, 512)
    assert model.decoder[0].conv[0].in_channels == 768  # 512 up + 256 skip
    assert model.out_conv.in_channels == 64
    # BatchNorm before ReLU, no conv bias before a BatchNorm
    assert [type(m) for m in model.encoder[0]] == [nn.Conv3d, nn.BatchNorm3d, nn.ReLU] * 2
    convs = [m for m in model.modules() if isinstance(m, nn.Conv3d) and m.bias is None]
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm3d)]
    ups = [m for m in model.modules() if isinstance(m, nn.ConvTranspose3d)]
    count = sum(p.numel() for p in model.parameters())
    # the paper's 19,069,955 counts conv biases but no BatchNorm affine and no up-conv biases
    paper_way = count + sum(c.out_channels for c in convs) - sum(2 * n.num_features for n in norms)
    paper_way -= sum(up.out_channels for up in ups)
    assert (count, paper_way) == (19_073_187, 19_069_955)


def test_cicek_smallest_volume_runs():
    (size,) = valid_input_sizes("cicek", 3, 1, 100)[:1]
    model = build_unet("cicek", 1, 2, base_width=1, spatial_dims=3)
    assert logits_shape(model, (size, size, size)) == (1, 2, *output_shape("cicek", 3, (size, size, size)))


# --- wrong sizes and arguments ------------------------------------------------------------


@pytest.mark.parametrize(("shape", "axis", "nearest"), [
    ((9, 32, 32), "z", "8, 10"),  # z pools once (at the bottom): any even size
    ((8, 30, 32), "y", "24, 32"),
    ((8, 32, 33), "x", "32, 40"),
])
def test_wrong_sizes_name_the_axis_and_the_nearest_sizes(shape, axis, nearest):
    model = build_unet("padded", 1, 2, base_width=2, depth=3, spatial_dims=3, z_pools=1)
    size = shape["zyx".index(axis)]
    with pytest.raises(ValueError, match=f"the {axis} axis: tile size {size} .*nearest valid sizes: {nearest}"):
        model(torch.zeros(1, 1, *shape))
    with pytest.raises(ValueError, match=f"the {axis} axis"):
        output_shape("padded", 3, shape, z_pools=1)


def test_wrong_arguments_are_refused():
    with pytest.raises(ValueError, match="z_pools is for 3-D"):
        build_unet("padded", 1, 2, spatial_dims=2, z_pools=1)
    with pytest.raises(ValueError, match="z_pools must be"):
        build_unet("padded", 1, 2, depth=3, spatial_dims=3, z_pools=4)
    with pytest.raises(ValueError, match="spatial_dims"):
        build_unet("padded", 1, 2, spatial_dims=1)
    with pytest.raises(ValueError, match="3 spatial axes"):
        build_unet("padded", 1, 2, base_width=2, depth=2, spatial_dims=3)(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="2 \\(y, x\\) or 3"):
        output_shape("padded", 2, (16,))


# --- training -----------------------------------------------------------------------------


def test_3d_model_overfits_one_volume():
    torch.manual_seed(0)
    model = build_unet("padded", 1, 2, base_width=4, depth=2, norm="instance", spatial_dims=3)
    grid = torch.stack(torch.meshgrid(*[torch.arange(12.0)] * 3, indexing="ij"))
    mask = ((grid - 5.5).pow(2).sum(0) < 17).long()[None]  # a ball
    image = mask[:, None].float() + 0.3 * torch.randn(1, 1, 12, 12, 12)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = nn.functional.cross_entropy(model(image), mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_activation_checkpointing_gives_the_same_gradients_in_3d():
    torch.manual_seed(0)
    plain = build_unet("padded", 1, 2, base_width=2, depth=2, spatial_dims=3, z_pools=1)
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing = True
    image = torch.randn(2, 1, 4, 16, 16)
    mask = torch.randint(0, 2, (2, 4, 16, 16))
    for model in (plain, checkpointed):
        model.train()
        nn.functional.cross_entropy(model(image), mask).backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), name
    for (name, a), b in zip(plain.named_buffers(), checkpointed.buffers(), strict=True):
        assert torch.equal(a, b), name  # running statistics moved once, not twice
