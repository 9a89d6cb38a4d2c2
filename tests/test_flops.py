"""Model FLOPs: the counter against a hand count, and the MFU arithmetic."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from unetdist.flops import forward_flops_per_sample, mfu, peak_flops_per_s, training_flops_per_sample
from unetdist.model import build_unet


def tiny_conv_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))


def test_training_flops_match_a_hand_count():
    # 8x8 input, 2 FLOPs per multiply-add, biases not counted (as MFU counts):
    conv1 = 2 * 1 * 4 * 3 * 3 * 8 * 8  # 4,608: 3x3 conv 1 -> 4 channels
    conv2 = 2 * 4 * 2 * 1 * 1 * 8 * 8  # 1,024: 1x1 conv 4 -> 2 channels
    forward = conv1 + conv2
    # backward: every conv's weight gradient costs its forward again; input gradients
    # too, except for the first conv, whose input (the image) needs none
    backward = conv1 + 2 * conv2
    assert forward_flops_per_sample(tiny_conv_net(), (1, 8, 8)) == forward == 5_632
    assert training_flops_per_sample(tiny_conv_net(), (1, 8, 8)) == forward + backward == 12_288


def test_unet_flops_scale_with_the_tile_and_leave_the_model_alone():
    model = build_unet("padded", 1, 2, base_width=4, depth=2)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    small = training_flops_per_sample(model, (1, 32, 32))
    large = training_flops_per_sample(model, (1, 64, 64))
    assert large == 4 * small  # same-padding convs: FLOPs proportional to pixels
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    assert all(parameter.grad is None for parameter in model.parameters())


def test_paper_unet_flops_match_the_reference_figures():
    # issue 9: paper 572x572 at 129 tiles/s = 24% of H200 TF32 peak (494 TF/s)
    flops = training_flops_per_sample(build_unet("paper", 1, 2), (1, 572, 572))
    assert flops == pytest.approx(0.24 * 494e12 / 129, rel=0.03)


def test_peaks_and_mfu():
    assert peak_flops_per_s("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops_per_s("NVIDIA H200", "fp32") == 494e12
    assert peak_flops_per_s("NVIDIA H100 PCIe", "fp16") == 756e12
    assert peak_flops_per_s("NVIDIA L40S", "bf16") == 362e12
    assert peak_flops_per_s("Some Future GPU", "bf16") is None
    assert mfu(72e9, 2681, 989e12) == pytest.approx(0.195, abs=0.001)
    assert mfu(72e9, 2681, None) is None


def hand_count_forward(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """Forward FLOPs of every convolution by its shapes (forward hooks), and the first conv's.

    Independent of FlopCounterMode: a conv costs 2 x output voxels x out channels x its
    incoming taps (in_channels/groups x kernel); a transposed conv with kernel == stride
    (each output voxel meets one tap per input channel) 2 x output voxels x out x in channels.
    """
    counts: list[int] = []

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        voxels = output[0, 0].numel()
        if isinstance(module, nn.ConvTranspose3d):
            assert module.kernel_size == module.stride
            counts.append(2 * voxels * module.out_channels * module.in_channels)
        elif isinstance(module, nn.Conv3d):
            counts.append(2 * voxels * module.out_channels * module.weight[0].numel())

    handles = [module.register_forward_hook(hook) for module in model.modules()]
    with torch.no_grad():
        model.eval()(torch.zeros(1, *input_shape))
    for handle in handles:
        handle.remove()
    return sum(counts), counts[0]


@pytest.mark.parametrize(("preset", "depth", "z_pools", "shape"), [
    ("padded", 2, 1, (1, 8, 16, 16)),  # anisotropic: a 1x2x2 pool and up-conv at level 0
    ("cicek", 1, None, (2, 20, 20, 20)),  # valid 3x3x3 convs, block widening, 2x2x2 up-conv keeping the width
])
def test_3d_flops_match_a_hand_count(preset, depth, z_pools, shape):
    model = build_unet(preset, shape[0], 3, base_width=2, depth=depth, spatial_dims=3, z_pools=z_pools)
    forward, first_conv = hand_count_forward(model, shape)
    assert forward_flops_per_sample(model, shape) == forward
    # backward: every weight gradient costs its forward again, every input gradient too but the image's
    assert training_flops_per_sample(model, shape) == 3 * forward - first_conv


def test_3d_flops_scale_with_voxels():
    model = build_unet("padded", 1, 2, base_width=2, depth=2, spatial_dims=3)
    small = training_flops_per_sample(model, (1, 8, 16, 16))
    assert training_flops_per_sample(model, (1, 16, 32, 32)) == 8 * small  # same-padding convs: per voxel
