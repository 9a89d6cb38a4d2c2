"""Optimizers and the learning-rate schedule (a pure function of the step)."""

from __future__ import annotations

import math

import torch

from unetdist.config import OptimConfig

# The paper trains with momentum 0.99 "such that a large number of the previously seen
# training samples determine the update in the current optimization step".
PAPER_MOMENTUM = 0.99
DEFAULT_MOMENTUM = 0.9


def build_optimizer(params, optim: OptimConfig, preset: str, device_type: str) -> torch.optim.Optimizer:
    # fused kernels exist for CUDA only; foreach is the fast default elsewhere
    fused = {"fused": True} if optim.fused and device_type == "cuda" else {}
    if optim.name == "sgd":
        momentum = optim.momentum
        if momentum < 0:
            momentum = PAPER_MOMENTUM if preset in ("paper", "article") else DEFAULT_MOMENTUM
        return torch.optim.SGD(params, lr=optim.lr, momentum=momentum, weight_decay=optim.weight_decay, **fused)
    return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay, **fused)


def lr_at(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then constant or cosine."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    decay_steps = max(1, max_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / decay_steps)
    floor = optim.lr * optim.min_lr_ratio
    return floor + (optim.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
