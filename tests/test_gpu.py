"""CUDA fast paths (bf16/fp16 autocast, GradScaler, channels_last, compile, fused AdamW). Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from unetdist import distributed
from unetdist.batch_layout import batch_layout
from unetdist.config import load_config
from unetdist.model import build_unet
from unetdist.optim import build_optimizer
from unetdist.tracking.run_outputs import RunOutputs
from unetdist.trainer import Trainer, wrap_model

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.precision=bf16"],
        ["train.precision=fp16"],
        ["train.precision=bf16", "train.channels_last=true", "optim.fused=true"],
        ["train.precision=bf16", "train.channels_last=true", "train.compile=true"],
    ],
)
def test_cuda_step_learns(tmp_path, overrides):
    config = load_config([], ["data.root=x", "data.tile_size=128", "model.base_width=16", "train.global_batch_size=8",
                              "train.device=cuda", "optim.schedule=constant", *overrides])
    ctx = distributed.init_distributed("cuda", "auto")
    torch.manual_seed(0)
    raw, model = wrap_model(build_unet("padded", 1, 2, base_width=16), config, ctx)
    optimizer = build_optimizer(raw.parameters(), config.optim, "padded", "cuda")
    outputs = RunOutputs.null(tmp_path)
    trainer = Trainer(config, ctx, batch_layout(config.train, 1), raw, model, optimizer, outputs)
    image = torch.randn(8, 1, 128, 128)
    batch = {"image": image, "mask": (image[:, 0] > 0.3).long(), "weight": torch.ones(8, 128, 128)}
    losses = [trainer.train_step([batch]).item() for _ in range(20)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.precision=bf16", "train.channels_last=true"],  # channels_last_3d for volumes
        ["train.precision=bf16", "train.channels_last=true", "train.compile=true"],
        ["train.precision=fp16", "train.activation_checkpointing=true"],
    ],
)
def test_cuda_volume_step_learns(tmp_path, overrides):
    config = load_config([], ["data.format=zarr", "data.zarr_store=x", "data.tile_size=64", "data.tile_depth=32",
                              "model.spatial_dims=3", "model.base_width=8", "model.depth=3", "model.norm=instance",
                              "train.global_batch_size=2", "train.device=cuda", "optim.schedule=constant",
                              *overrides])  # fmt: skip
    ctx = distributed.init_distributed("cuda", "auto")
    torch.manual_seed(0)
    raw, model = wrap_model(build_unet("padded", 1, 2, base_width=8, depth=3, norm="instance", spatial_dims=3),
                            config, ctx)  # fmt: skip
    optimizer = build_optimizer(raw.parameters(), config.optim, "padded", "cuda")
    trainer = Trainer(config, ctx, batch_layout(config.train, 1), raw, model, optimizer, RunOutputs.null(tmp_path))
    image = torch.randn(2, 1, 32, 64, 64)
    batch = {"image": image, "mask": (image[:, 0] > 0.3).long()}
    losses = [trainer.train_step([batch]).item() for _ in range(20)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
