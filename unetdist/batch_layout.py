"""The global batch split over ranks and accumulation micro-steps, derived from the train config."""

from __future__ import annotations

from dataclasses import dataclass

from unetdist.config import ConfigError, TrainConfig


@dataclass(frozen=True)
class BatchLayout:
    """How the global batch is split over ranks and accumulation micro-steps."""

    global_batch_size: int
    world_size: int
    per_rank_batch_size: int
    micro_batch_size: int
    accumulation_steps: int


def batch_layout(train: TrainConfig, world_size: int) -> BatchLayout:
    """Derive per-rank batch and accumulation from the global batch; error when it does not divide."""
    global_batch = train.global_batch_size
    if global_batch % world_size:
        lower = global_batch - global_batch % world_size
        raise ConfigError(
            f"train.global_batch_size={global_batch} does not divide over {world_size} ranks; "
            f"use a multiple of {world_size} (e.g. {lower or world_size} or {lower + world_size}) or change --nproc_per_node"
        )
    per_rank = global_batch // world_size
    micro = train.micro_batch_size or per_rank
    if micro > per_rank or per_rank % micro:
        raise ConfigError(
            f"train.micro_batch_size={micro} must divide the per-rank batch {per_rank} "
            f"(= train.global_batch_size {global_batch} / {world_size} ranks); use a divisor of {per_rank} or 0"
        )
    return BatchLayout(global_batch, world_size, per_rank, micro, per_rank // micro)
