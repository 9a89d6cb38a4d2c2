"""Model FLOPs per training sample, accelerator peaks, and model FLOPs utilisation (MFU).

Counted the way MFU is usually reported: the multiply-adds of convolutions and matrix
products (2 FLOPs each) in one forward and one backward pass, nothing for norms,
activations, pooling or the optimizer. A convolution of any number of spatial axes is
counted by torch's own formula (kernel taps times channels times output voxels; a
transposed one per input voxel), so 3-D models and their 1x2x2 up-convolutions are
counted as exactly as 2-D ones (tests/test_flops.py checks both against a hand count).
The count runs on a copy of the model on the ``meta`` device, so it costs no compute and
no memory even for the paper's 572x572 tile::

    flops = training_flops_per_sample(model, (1, 572, 572))   # ~0.90 TFLOP for the paper U-Net
    flops = training_flops_per_sample(model_3d, (1, 116, 132, 132))   # a 3-D model: (C, Z, Y, X)
    peak = peak_flops_per_s(torch.cuda.get_device_name(), "bf16")
    utilisation = mfu(flops, samples_per_s, peak)
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# Datasheet dense tensor-core peaks in FLOP/s: (name pattern, bf16/fp16, tf32). First match wins,
# so the more specific names come first ("H200" before "H20", "L40S" before "L4").
_PEAKS: tuple[tuple[str, float, float], ...] = (
    (r"B200", 2250e12, 1100e12),
    (r"H200", 989e12, 494e12),  # also GH200
    (r"H100.*PCIe", 756e12, 378e12),
    (r"H100", 989e12, 494e12),  # SXM
    (r"H20\b", 148e12, 74e12),
    (r"A100", 312e12, 156e12),
    (r"L40S", 362e12, 183e12),
    (r"L4\b", 121e12, 60e12),
    (r"A10\b", 125e12, 62.5e12),
)


def training_flops_per_sample(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward + backward pass for one sample of ``input_shape`` (C, H, W) or (C, Z, Y, X).

    The input needs no gradient, so the first layer's input gradient is not counted,
    just as in training; activation checkpointing's recomputation is not counted either.
    ``model`` itself is not touched (a meta-device copy is run).
    """
    probe = copy.deepcopy(model).to("meta").train()
    if getattr(probe, "activation_checkpointing", False):
        probe.activation_checkpointing = False  # model FLOPs: a recomputation is extra hardware work
    sample = torch.empty((1, *input_shape), device="meta")
    with FlopCounterMode(display=False) as counter:
        output = probe(sample)
        output.float().sum().backward()
    return int(counter.get_total_flops())


def forward_flops_per_sample(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass (inference) for one sample of ``input_shape`` (C, *spatial)."""
    probe = copy.deepcopy(model).to("meta").eval()
    sample = torch.empty((1, *input_shape), device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        probe(sample)
    return int(counter.get_total_flops())


def peak_flops_per_s(device_name: str, precision: str) -> float | None:
    """Datasheet dense peak of the named CUDA device for ``precision`` (fp32, bf16, fp16); None if unknown.

    fp32 is rated at the TF32 tensor-core peak: PyTorch runs fp32 convolutions in TF32
    by default (``torch.backends.cudnn.allow_tf32``), which is what U-Nets are made of.
    """
    for pattern, half_peak, tf32_peak in _PEAKS:
        if re.search(pattern, device_name):
            return tf32_peak if precision == "fp32" else half_peak
    return None


def mfu(flops_per_sample: float, samples_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak (None without a peak)."""
    if not peak:
        return None
    return flops_per_sample * samples_per_s / peak
