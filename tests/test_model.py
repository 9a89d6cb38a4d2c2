"""Tests for unetdist.model: preset geometry, size arithmetic, init and gradients.

Shapes are checked on tiny widths (base 4): geometry does not depend on width.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from unetdist.model import (
    NORMS,
    PRESETS,
    UNet,
    build_unet,
    check_input_size,
    make_norm,
    nearest_valid_input_sizes,
    output_size,
    valid_input_sizes,
)

TINY = 4


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def logits_shape(model: UNet, height: int, width: int, batch: int = 1) -> tuple[int, ...]:
    model.eval()
    with torch.no_grad():
        return tuple(model(torch.randn(batch, model.in_channels, height, width)).shape)


# --- paper ---------------------------------------------------------------------


def test_paper_572_gives_388():
    # Same geometry as base 64, at a fraction of the cost.
    model = build_unet("paper", in_channels=1, num_classes=2, base_width=TINY)
    assert logits_shape(model, 572, 572) == (1, 2, 388, 388)
    assert model.output_size(572) == 388


def test_paper_parameter_count_matches_the_paper():
    model = build_unet("paper", in_channels=1, num_classes=2)
    assert (model.depth, model.padded) == (4, False)
    assert parameter_count(model) == 31_030_658
    assert abs(parameter_count(model) - 31.03e6) / 31.03e6 < 0.01


def test_paper_has_no_norm_layers():
    model = build_unet("paper", in_channels=1, num_classes=2, base_width=TINY)
    norm_types = (nn.BatchNorm2d, nn.InstanceNorm2d, nn.GroupNorm)
    assert not any(isinstance(module, norm_types) for module in model.modules())


def test_paper_he_normal_init():
    model = build_unet("paper", in_channels=1, num_classes=2)
    bottom_conv = model.bottleneck[1][0]  # 3x3 conv 512 -> 1024, 4.7 M weights
    assert isinstance(bottom_conv, nn.Conv2d) and bottom_conv.in_channels == 512
    expected_std = math.sqrt(2 / (3 * 3 * 512))  # the paper's N = k*k*in_channels
    assert bottom_conv.weight.std().item() == pytest.approx(expected_std, rel=0.02)
    assert bottom_conv.weight.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert torch.count_nonzero(bottom_conv.bias) == 0
    # A 2x2 stride-2 up-conv output pixel meets exactly one tap per input channel.
    first_up = model.decoder[0].up
    assert first_up.weight.std().item() == pytest.approx(math.sqrt(2 / 1024), rel=0.02)
    assert torch.count_nonzero(first_up.bias) == 0


# --- article -------------------------------------------------------------------


def test_article_output_shape_by_hand():
    model = build_unet("article", in_channels=3, num_classes=5, base_width=TINY)
    assert model.depth == 3
    # 124 -> convs 120 -> pool 60 -> convs 56 -> pool 28 -> convs 24 -> pool 12
    #     -> bottom convs 8 -> up 16 -> convs 12 -> up 24 -> convs 20 -> up 40 -> convs 36
    expected = 36
    assert logits_shape(model, 124, 124) == (1, 5, expected, expected)
    assert output_size("article", 3, 124) == expected == model.output_size(124)


def test_article_ends_in_a_plain_conv_not_relu_batchnorm():
    torch.manual_seed(0)
    model = build_unet("article", in_channels=1, num_classes=2, base_width=TINY)
    assert list(model.modules())[-1] is model.out_conv
    assert isinstance(model.out_conv, nn.Conv2d) and model.out_conv.kernel_size == (1, 1)
    # Raw logits: an untrained net produces negative ones too.
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 124, 124)).min() < 0


def test_article_layer_order_is_conv_relu_batchnorm():
    model = build_unet("article", in_channels=1, num_classes=2, base_width=TINY)
    first_block = [type(layer) for layer in model.encoder[0]]
    assert first_block == [nn.Conv2d, nn.ReLU, nn.BatchNorm2d] * 2
    up = model.decoder[0].up
    assert (up.kernel_size, up.stride, up.padding, up.output_padding) == ((3, 3), (2, 2), (1, 1), (1, 1))


# --- padded --------------------------------------------------------------------


@pytest.mark.parametrize("norm", NORMS)
def test_padded_keeps_size_for_each_norm(norm):
    model = build_unet("padded", in_channels=3, num_classes=2, base_width=TINY, depth=3, norm=norm)
    assert model.padded
    assert logits_shape(model, 32, 48, batch=2) == (2, 2, 32, 48)
    assert model.output_size(32) == 32


def test_padded_convs_drop_bias_only_before_a_norm():
    with_norm = build_unet("padded", in_channels=1, num_classes=2, base_width=TINY, depth=2, norm="batch")
    without = build_unet("padded", in_channels=1, num_classes=2, base_width=TINY, depth=2, norm="none")
    assert with_norm.encoder[0][0].bias is None
    assert without.encoder[0][0].bias is not None


def test_group_norm_groups_divide_channels():
    assert make_norm("group", 4).num_groups == 4
    assert make_norm("group", 12).num_groups == 6
    assert make_norm("group", 64).num_groups == 8


# --- sizes.py against the real modules -------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("depth", [2, 3])
def test_sizes_agree_with_module_output(preset, depth):
    model = build_unet(preset, in_channels=1, num_classes=2, base_width=TINY, depth=depth)
    valid = valid_input_sizes(preset, depth, 1, 200)[:6]
    assert len(valid) == 6
    for size in valid:
        expected = output_size(preset, depth, size)
        assert logits_shape(model, size, size) == (1, 2, expected, expected), size
    # Height and width are independent.
    height, width = valid[0], valid[-1]
    assert logits_shape(model, height, width)[-2:] == (
        output_size(preset, depth, height),
        output_size(preset, depth, width),
    )


@pytest.mark.parametrize("preset", PRESETS)
def test_invalid_sizes_are_refused_by_module_and_sizes(preset):
    depth = 2
    model = build_unet(preset, in_channels=1, num_classes=2, base_width=TINY, depth=depth)
    valid = set(valid_input_sizes(preset, depth, 1, 80))
    for size in set(range(1, 81)) - valid:
        with pytest.raises(ValueError, match=f"tile size {size} "):
            output_size(preset, depth, size)
    invalid = max(set(range(1, 81)) - valid)
    with pytest.raises(ValueError, match="nearest valid sizes"):
        model(torch.randn(1, 1, invalid, invalid))


def test_valid_sizes_are_evenly_spaced():
    assert valid_input_sizes("paper", 4, 500, 600) == [508, 524, 540, 556, 572, 588]
    assert valid_input_sizes("padded", 4, 1, 64) == [16, 32, 48, 64]
    assert valid_input_sizes("article", 3, 1, 100) == [92, 100]


def test_invalid_size_message_names_size_preset_and_nearest_sizes():
    with pytest.raises(ValueError) as raised:
        check_input_size("paper", 4, 570)
    message = str(raised.value)
    assert "570" in message and "paper" in message and "depth 4" in message
    assert "max-pool" in message and "556, 572" in message
    check_input_size("paper", 4, 572)  # valid: no error


def test_too_small_tiles_point_above():
    with pytest.raises(ValueError, match="nearest valid sizes: 188, 204"):
        check_input_size("paper", 4, 10)
    assert nearest_valid_input_sizes("paper", 4, 10) == [188, 204]


def test_nearest_valid_sizes():
    assert nearest_valid_input_sizes("paper", 4, 570) == [556, 572]
    assert nearest_valid_input_sizes("padded", 4, 17) == [16, 32]
    assert nearest_valid_input_sizes("padded", 4, 32) == [16, 48]
    # 16 and 64 are both 24 away; ties go to the smaller size.
    assert nearest_valid_input_sizes("padded", 4, 40, count=3) == [16, 32, 48]


# --- gradients and argument checks ---------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_backward_reaches_every_parameter(preset):
    depth = 2
    size = valid_input_sizes(preset, depth, 40, 200)[0]
    model = build_unet(preset, in_channels=2, num_classes=3, base_width=TINY, depth=depth)
    logits = model(torch.randn(2, 2, size, size))
    out = model.output_size(size)
    target = torch.randint(0, 3, (2, out, out))
    nn.functional.cross_entropy(logits, target).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name


def test_preset_defaults():
    for preset, (width, depth) in {"paper": (64, 4), "article": (64, 3), "padded": (32, 4)}.items():
        model = build_unet(preset, in_channels=1, num_classes=2)
        assert (model.encoder[0][0].out_channels, model.depth) == (width, depth)
        assert (model.preset, model.in_channels, model.num_classes) == (preset, 1, 2)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"preset": "unet++"}, ["unet++", "paper", "article", "padded"]),
        ({"norm": "layer"}, ["layer", "batch", "instance", "group", "none"]),
        ({"base_width": 0}, ["base_width", "0"]),
        ({"depth": -1}, ["depth", "-1"]),
        ({"num_classes": 0}, ["num_classes", "0"]),
        ({"in_channels": 1.5}, ["in_channels", "1.5"]),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, named):
    arguments = {"preset": "padded", "in_channels": 1, "num_classes": 2, "base_width": TINY, "depth": 2}
    arguments.update(kwargs)
    with pytest.raises(ValueError) as raised:
        build_unet(**arguments)
    for text in named:
        assert text in str(raised.value)


def test_sizes_reject_unknown_preset():
    with pytest.raises(ValueError, match="allowed: paper, article, padded"):
        output_size("resnet", 4, 572)
