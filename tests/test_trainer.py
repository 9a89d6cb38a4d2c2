"""The step loop in one process: precision modes, clipping and accumulation on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from unetdist import distributed
from unetdist.batch_layout import batch_layout
from unetdist.config import load_config
from unetdist.model import build_unet
from unetdist.optim import build_optimizer
from unetdist.tracking.run_outputs import RunOutputs
from unetdist.trainer import Trainer, wrap_model


def make_trainer(tmp_path: Path, *overrides: str) -> Trainer:
    config = load_config([], ["data.root=x", "data.tile_size=32", "model.base_width=4", "model.depth=2",
                              "model.norm=group", "train.global_batch_size=4", "train.device=cpu", *overrides])
    ctx = distributed.init_distributed("cpu", "gloo")
    torch.manual_seed(0)
    model = build_unet("padded", 1, 2, base_width=4, depth=2, norm=config.model.norm)
    raw, wrapped = wrap_model(model, config, ctx)
    optimizer = build_optimizer(raw.parameters(), config.optim, "padded", "cpu")
    outputs = RunOutputs.null(tmp_path)
    return Trainer(config, ctx, batch_layout(config.train, 1), raw, wrapped, optimizer, outputs)


def batch(count: int = 4) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    image = torch.randn(count, 1, 32, 32, generator=generator)
    return {"image": image, "mask": (image[:, 0] > 0.5).long(), "weight": torch.ones(count, 32, 32)}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_step_tracks_fp32(tmp_path, precision):
    reference = make_trainer(tmp_path).train_step([batch()])
    trainer = make_trainer(tmp_path, f"train.precision={precision}")
    assert trainer.scaler.is_enabled() == (precision == "fp16")
    loss = trainer.train_step([batch()])
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(reference.item(), rel=0.05)


def test_loss_goes_down_over_steps(tmp_path):
    trainer = make_trainer(tmp_path, "optim.lr=0.01", "optim.schedule=constant")
    losses = [trainer.train_step([batch()]).item() for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]
    assert trainer.step == 30


def test_gradient_clipping_bounds_the_update(tmp_path):
    def update_norm(*overrides: str) -> float:
        trainer = make_trainer(tmp_path, "optim.name=sgd", "optim.momentum=0", "optim.lr=1", "optim.schedule=constant",
                               *overrides)
        before = torch.cat([p.detach().flatten().clone() for p in trainer.raw_model.parameters()])
        trainer.train_step([batch()])
        after = torch.cat([p.detach().flatten() for p in trainer.raw_model.parameters()])
        return float((after - before).norm())

    assert update_norm("optim.grad_clip_norm=0.01") == pytest.approx(0.01, rel=1e-3)
    assert update_norm() > 0.05


def test_validation_counts_every_tile(tmp_path):
    trainer = make_trainer(tmp_path)
    metrics = trainer.validate([batch(3), batch(2)])
    assert metrics["val/tiles"] == 5
    assert 0.0 <= metrics["val/fg_dice"] <= 1.0 and metrics["val/loss"] > 0


def test_training_after_validation_updates_batchnorm_statistics(tmp_path):
    """train_step switches modes only when needed: after validation every module trains again."""
    trainer = make_trainer(tmp_path, "model.norm=batch")
    trainer.train_step([batch()])
    trainer.validate([batch(2)])
    assert not any(module.training for module in trainer.raw_model.modules())
    norm = next(m for m in trainer.raw_model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = norm.running_mean.clone()
    trainer.train_step([batch()])
    assert all(module.training for module in trainer.raw_model.modules())
    assert not torch.equal(norm.running_mean, before)
