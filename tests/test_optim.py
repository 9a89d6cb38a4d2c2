"""The learning-rate schedule is a pure function of the step; optimizer defaults follow the paper."""

import pytest
import torch

from unetdist.config import OptimConfig
from unetdist.optim import build_optimizer, lr_at


def test_warmup_then_cosine_to_floor():
    optim = OptimConfig(lr=1.0, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, optim, 110) == pytest.approx(0.1)
    assert lr_at(9, optim, 110) == pytest.approx(1.0)
    assert lr_at(10, optim, 110) == pytest.approx(1.0)
    assert lr_at(60, optim, 110) == pytest.approx(0.55)
    assert lr_at(110, optim, 110) == pytest.approx(0.1)
    rates = [lr_at(s, optim, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))


def test_constant_schedule():
    optim = OptimConfig(lr=0.5, schedule="constant")
    assert {lr_at(s, optim, 100) for s in range(100)} == {0.5}


def test_sgd_momentum_defaults_to_the_papers_for_valid_conv_presets():
    params = [torch.nn.Parameter(torch.zeros(2))]
    sgd = OptimConfig(name="sgd")
    assert build_optimizer(params, sgd, "paper", "cpu").param_groups[0]["momentum"] == 0.99
    assert build_optimizer(params, sgd, "padded", "cpu").param_groups[0]["momentum"] == 0.9
    assert isinstance(build_optimizer(params, OptimConfig(), "padded", "cpu"), torch.optim.AdamW)
