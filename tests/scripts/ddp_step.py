"""One optimizer step of the real Trainer on a fixed global batch; saves the parameters.

Run under torchrun (any world size) or plain python; each rank takes its contiguous share
of the same global batch, so every layout must give the same parameters:
    torchrun --nproc_per_node=2 tests/scripts/ddp_step.py OUT.pt MICRO_BATCH
"""

import sys
from pathlib import Path

import torch

from unetdist import distributed
from unetdist.batch_layout import batch_layout
from unetdist.config import load_config
from unetdist.model import build_unet
from unetdist.optim import build_optimizer
from unetdist.tracking.run_outputs import RunOutputs
from unetdist.trainer import Trainer, wrap_model

GLOBAL_BATCH, TILE = 4, 60


def main(out: str, micro_batch_size: int) -> None:
    config = load_config(
        [],
        [
            "data.root=unused",
            "model.preset=paper",
            "model.base_width=4",
            "model.depth=2",
            f"data.tile_size={TILE}",
            f"train.global_batch_size={GLOBAL_BATCH}",
            f"train.micro_batch_size={micro_batch_size}",
            "optim.name=sgd",
            "optim.lr=0.5",
            "optim.schedule=constant",
            "tracking.enabled=false",
        ],
    )
    ctx = distributed.init_distributed("cpu", "gloo")
    layout = batch_layout(config.train, ctx.world_size)
    torch.manual_seed(0)
    model = build_unet("paper", 1, 2, base_width=4, depth=2)
    raw_model, wrapped = wrap_model(model, config, ctx)
    optimizer = build_optimizer(raw_model.parameters(), config.optim, "paper", "cpu")
    outputs = RunOutputs.null(Path(out).parent)
    trainer = Trainer(config, ctx, layout, raw_model, wrapped, optimizer, outputs)

    data = torch.Generator().manual_seed(123)
    images = torch.randn(GLOBAL_BATCH, 1, TILE, TILE, generator=data)
    masks = torch.randint(0, 2, (GLOBAL_BATCH, TILE, TILE), generator=data)
    weights = 1 + 5 * torch.rand(GLOBAL_BATCH, TILE, TILE, generator=data)
    first = ctx.rank * layout.per_rank_batch_size
    micro_batches = [
        {"image": images[i : i + layout.micro_batch_size], "mask": masks[i : i + layout.micro_batch_size],
         "weight": weights[i : i + layout.micro_batch_size]}
        for i in range(first, first + layout.per_rank_batch_size, layout.micro_batch_size)
    ]
    assert len(micro_batches) == layout.accumulation_steps
    trainer.train_step(micro_batches)
    if ctx.is_main:
        torch.save(raw_model.state_dict(), out)
    distributed.cleanup()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
