"""bench train: the real trainer against a bare hand-written loop, on in-memory data.

The project's ``Trainer.fit`` (with ``wrap_model``, ``build_optimizer`` and the stop-signal
check of ``train.main``; no tracker, no checkpoints) runs a fixed number of steps on one
in-memory batch (pinned on CUDA, as with ``data.pin_memory``); in the same process a bare loop
drives the same model and optimizer objects with the same loss, LR schedule and batch and
nothing else (no DDP, no tracker, no logging syncs). Warmup steps are not timed. Rounds alternate bare and trainer
so that a slow spell of a shared machine hits both: ``trainer_vs_bare`` is the median of the
per-round ratios, steps/s the median over rounds. On a machine other jobs are using, two
steadier estimates come with it: the ratio by process CPU time (``trainer_vs_bare_cpu``) and,
on CPU, by the median single step (``trainer_vs_bare_step_median``). Keep ``--steps`` >=
``--log-every`` so that the trainer's logging steps (its one host sync) fall in the window.

    python -m unetdist.bench train --preset padded --base-width 16 --tile 128 --batch 8
    python -m unetdist.bench train --preset paper --tile 572 --batch 8 --precision bf16 --channels-last --compile
    python -m unetdist.bench train --preset padded --base-width 16 --tile 128 --batch 8 --nproc 2
    python -m unetdist.bench train --spatial-dims 3 --base-width 8 --depth 3 --tile 48 --batch 2

``--spatial-dims 3`` times the 3-D U-Net on volume tiles ``--tile-depth`` x ``--tile`` x ``--tile``
(``--tile-depth 0``: a cube; ``--z-pools``: the levels that pool z, the deepest ones) and
reports voxels/s where 2-D reports pixels/s: both count the input tile's.

``--nproc N`` launches torchrun twice (1 rank, then N ranks; gloo on CPU, NCCL on CUDA),
times the trainer alone and reports global samples/s, the speed-up over 1 rank and the
scaling efficiency (``--batch`` is then the per-rank batch). On CPU every rank gets
``cores // N`` threads, in both runs, so the efficiency measures the distribution alone;
``--vs-all-threads`` adds 1 rank with all those threads (is splitting the machine worth it?).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unetdist.bench import Figures
from unetdist.bench.scaling import run_scaling
from unetdist.bench.timing import Clocks, TimedStream, Window, peak_mb, reset_peak, synchronize, window_of
from unetdist.model.sizes import PRESETS
from unetdist.precision import PRECISIONS, autocast, grad_scaler

SMALL_ARGS = ["--preset", "padded", "--base-width", "8", "--depth", "3", "--tile", "64", "--batch", "4",
              "--steps", "4", "--warmup", "1", "--rounds", "1"]

def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model and data")
    model.add_argument("--preset", default="padded", choices=PRESETS)
    model.add_argument("--base-width", type=int, default=0, help="0: the preset's own (paper 64, padded 32)")
    model.add_argument("--depth", type=int, default=0, help="0: the preset's own")
    model.add_argument("--norm", default="batch", choices=("batch", "instance", "group", "none"))
    model.add_argument("--tile", type=int, default=128, help="input tile side (paper: 572)")
    model.add_argument("--spatial-dims", type=int, default=2, choices=(2, 3), help="3: volume tiles, the 3-D U-Net")
    model.add_argument("--tile-depth", type=int, default=0, help="--spatial-dims 3: the tile's z size; 0: --tile")
    model.add_argument("--z-pools", type=int, default=-1,
                       help="--spatial-dims 3: how many of the deepest levels pool z; -1: every level")
    model.add_argument("--batch", type=int, default=8, help="tiles per step per rank")
    fast = parser.add_argument_group("fast paths")
    fast.add_argument("--precision", default="fp32", choices=PRECISIONS)
    fast.add_argument("--channels-last", action="store_true")
    fast.add_argument("--compile", action="store_true", help="torch.compile the model (both loops)")
    fast.add_argument("--compile-mode", default="default", choices=("default", "reduce-overhead", "max-autotune"))
    fast.add_argument("--activation-checkpointing", action="store_true")
    fast.add_argument("--optim", default="adamw", choices=("adamw", "sgd"))
    fast.add_argument("--fused", action="store_true", help="fused optimizer (optim.fused; CUDA)")
    timing = parser.add_argument_group("timing")
    timing.add_argument("--steps", type=int, default=10, help="timed steps per round")
    timing.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each round")
    timing.add_argument("--rounds", type=int, default=5, help="alternating bare/trainer rounds; medians are reported")
    timing.add_argument("--log-every", type=int, default=10, help="the trainer's train.log_every (a host sync)")
    timing.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    timing.add_argument("--nproc", type=int, default=1, help="N > 1: torchrun N ranks vs 1 rank, trainer only")
    timing.add_argument("--threads", type=int, default=0, help="torch threads per rank on CPU; 0: cores // nproc")
    timing.add_argument("--vs-all-threads", action="store_true",
                        help="with --nproc on CPU: also time 1 rank using every rank's threads (the whole machine)")
    parser.add_argument("--worker-result", help=argparse.SUPPRESS)  # set by the --nproc launcher


def run(args: argparse.Namespace) -> Figures:
    _check_args(args)
    if args.nproc > 1:
        return run_scaling(args)
    return _run_in_process(args)


def _check_args(args: argparse.Namespace) -> None:
    for name in ("tile", "batch", "steps", "rounds", "log_every", "nproc"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.threads < 0 or args.tile_depth < 0:
        raise ValueError("--warmup, --threads and --tile-depth must be >= 0")
    if args.spatial_dims == 2 and (args.tile_depth or args.z_pools != -1):
        raise ValueError("--tile-depth and --z-pools are for volumes: add --spatial-dims 3")


def _tile_shape(args: argparse.Namespace) -> tuple[int, ...]:
    """The input tile per spatial axis: (Y, X), or (Z, Y, X) for volumes."""
    if args.spatial_dims == 3:
        return (args.tile_depth or args.tile, args.tile, args.tile)
    return (args.tile, args.tile)


# ---------------------------------------------------------------- building the parts


@dataclass
class _Parts:
    config: Any  # unetdist.config.Config
    ctx: Any  # unetdist.distributed.DistributedContext
    layout: Any
    raw_model: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batch: dict[str, torch.Tensor]
    stop_signal: Any  # unetdist.preemption.StopSignal: its per-step check is part of the trainer's cost


def _config(args: argparse.Namespace, world_size: int, output_dir: str):
    from unetdist.config import load_config

    overrides = [
        "data.root=in-memory",
        f"data.tile_size={args.tile}",
        f"model.preset={args.preset}",
        f"model.base_width={args.base_width}",
        f"model.depth={args.depth}",
        f"model.norm={args.norm}",
        f"optim.name={args.optim}",
        f"optim.fused={str(args.fused).lower()}",
        f"train.global_batch_size={args.batch * world_size}",
        f"train.precision={args.precision}",
        f"train.channels_last={str(args.channels_last).lower()}",
        f"train.compile={str(args.compile).lower()}",
        f"train.compile_mode={args.compile_mode}",
        f"train.activation_checkpointing={str(args.activation_checkpointing).lower()}",
        f"train.max_steps={args.warmup + args.steps + 1}",  # +1: fit ends with a validation, not timed
        f"train.log_every={args.log_every}",
        "train.val_every=0",
        "train.progress=false",
        f"train.device={args.device}",
        f"train.output_dir={output_dir}",
        "tracking.enabled=false",
        "checkpoint.every=0",
    ]
    if args.spatial_dims == 3:  # volumes come from Zarr stores only; the data here is in memory anyway
        overrides += ["data.format=zarr", "model.spatial_dims=3", f"model.z_pools={args.z_pools}",
                      f"data.tile_depth={args.tile_depth}"]
    return load_config([], overrides)


def _build(args: argparse.Namespace, output_dir: str) -> _Parts:
    from unetdist import distributed
    from unetdist.batch_layout import batch_layout
    from unetdist.optim import build_optimizer
    from unetdist.preemption import StopSignal
    from unetdist.trainer import build_model

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    config = _config(args, world_size, output_dir)
    ctx = distributed.init_distributed(config.train.device, config.train.backend, config.train.timeout_s)
    layout = batch_layout(config.train, ctx.world_size)
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = config.train.cudnn_benchmark
    torch.manual_seed(0)
    raw_model, wrapped = build_model(config, ctx)
    optimizer = build_optimizer(raw_model.parameters(), config.optim, config.model.preset, ctx.device.type)
    return _Parts(config, ctx, layout, raw_model, wrapped, optimizer,
                  _host_batch(args, ctx.device.type == "cuda"), StopSignal())


def _host_batch(args: argparse.Namespace, pin: bool) -> dict[str, torch.Tensor]:
    """One batch on the host, as a DataLoader would hand it over (pinned on CUDA)."""
    generator = torch.Generator().manual_seed(1)
    shape = _tile_shape(args)
    image = torch.randn(args.batch, 1, *shape, generator=generator)
    # tile-sized masks and weights, as the loader sends them; the loss crops them to the logits
    mask = torch.randint(0, 2, (args.batch, *shape), generator=generator)
    weight = 1 + 4 * torch.rand(args.batch, *shape, generator=generator)
    batch = {"image": image, "mask": mask, "weight": weight}
    return {key: value.pin_memory() for key, value in batch.items()} if pin else batch


# ---------------------------------------------------------------- the two loops


def _time_trainer(parts: _Parts, args: argparse.Namespace) -> Window:
    """``args.steps`` steps of ``Trainer.fit`` after ``args.warmup`` untimed ones.

    ``fit`` runs one step more than that and ends with a validation over nothing: neither is timed.
    """
    from unetdist.tracking.run_outputs import RunOutputs
    from unetdist.trainer import Trainer

    outputs = RunOutputs.null(Path(parts.config.train.output_dir))
    # as train.main builds it, less the checkpoint writer (a benchmark keeps no checkpoints)
    trainer = Trainer(parts.config, parts.ctx, parts.layout, parts.raw_model, parts.model, parts.optimizer, outputs,
                      None, parts.stop_signal)
    stream = TimedStream(parts.batch, args.warmup, args.warmup + args.steps, parts.ctx.device)
    trainer.fit(stream, [])
    return window_of(stream.stamps, parts.ctx.device)


class _BareLoop:
    """The loop anyone would write by hand around the same model and optimizer objects (the
    trainer's unwrapped model, no DDP, its own torch.compile wrapper when compiling), the same
    loss, LR schedule and batch, and nothing else. Sharing the objects keeps the comparison to
    the loop code alone: two copies of a model drift apart in memory placement and, on CPU, in
    numerics (denormals), which moved single-process timings by several per cent here."""

    def __init__(self, parts: _Parts, args: argparse.Namespace) -> None:
        from unetdist.losses import SegmentationLoss

        config = parts.config
        self.config = config
        self.device = parts.ctx.device
        # channels_last is the 4-D layout; a volume batch's is channels_last_3d
        layout = torch.channels_last if args.spatial_dims == 2 else torch.channels_last_3d
        self.memory_format = layout if args.channels_last else None
        model = parts.raw_model  # already on the device, channels_last when asked (wrap_model)
        self.model = torch.compile(model, mode=args.compile_mode) if args.compile else model
        self.optimizer = parts.optimizer
        self.loss_fn = SegmentationLoss(config.loss.kind, config.model.num_classes, config.loss.dice_weight)
        self.precision = args.precision
        self.scaler = grad_scaler(self.device.type, args.precision)
        self.batch = parts.batch

    def step(self, step: int) -> None:
        from unetdist.optim import lr_at, set_lr

        set_lr(self.optimizer, lr_at(step, self.config.optim, self.config.train.max_steps))
        image = self.batch["image"].to(self.device, non_blocking=True)
        if self.memory_format is not None:
            image = image.contiguous(memory_format=self.memory_format)
        mask = self.batch["mask"].to(self.device, non_blocking=True)
        weight = self.batch["weight"].to(self.device, non_blocking=True)
        with autocast(self.device.type, self.precision):
            logits = self.model(image)
        loss = self.loss_fn(logits, mask, weight)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def time(self, warmup: int, steps: int) -> Window:
        self.model.train()  # the trainer's validation at the end of each fit leaves the model in eval mode
        for step in range(warmup):
            self.step(step)
        synchronize(self.device)
        stamps = [Clocks.now()]
        for step in range(warmup, warmup + steps):
            self.step(step)
            if step == warmup + steps - 1:
                synchronize(self.device)
            stamps.append(Clocks.now())
        return window_of(stamps, self.device)


# ---------------------------------------------------------------- one process: trainer vs bare


def _run_in_process(args: argparse.Namespace) -> Figures:
    from unetdist import distributed

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="unetdist-bench-") as output_dir:
        parts = _build(args, output_dir)
        try:
            if args.worker_result:
                figures = _trainer_only(parts, args)
                if parts.ctx.is_main:
                    Path(args.worker_result).write_text(json.dumps(figures))
                return figures
            return _trainer_vs_bare(parts, args)
        finally:
            parts.stop_signal.restore()
            distributed.cleanup()


def _trainer_vs_bare(parts: _Parts, args: argparse.Namespace) -> Figures:
    device = parts.ctx.device
    bare = _BareLoop(parts, args)
    trainer_runs: list[Window] = []
    bare_runs: list[Window] = []
    trainer_peak = bare_peak = 0.0
    for round_index in range(args.rounds):
        # alternate the order so that neither loop always runs on a warmer (or busier) machine
        for which in (("bare", "trainer") if round_index % 2 == 0 else ("trainer", "bare")):
            reset_peak(device)
            if which == "bare":
                bare_runs.append(bare.time(args.warmup, args.steps))
                bare_peak = max(bare_peak, peak_mb(device))
            else:
                trainer_runs.append(_time_trainer(parts, args))
                trainer_peak = max(trainer_peak, peak_mb(device))
    trainer_rate = args.steps / statistics.median(run.total.wall_s for run in trainer_runs)
    bare_rate = args.steps / statistics.median(run.total.wall_s for run in bare_runs)
    # paired per round: a busy spell of the machine slows both halves of a pair alike
    pairs = list(zip(trainer_runs, bare_runs, strict=True))
    round_ratios = [bare_run.total.wall_s / trainer_run.total.wall_s for trainer_run, bare_run in pairs]
    cpu_ratios = [bare_run.total.cpu_s / trainer_run.total.cpu_s for trainer_run, bare_run in pairs]
    figures = _setting(parts, args)
    figures.update(
        trainer_steps_per_s=trainer_rate,
        bare_steps_per_s=bare_rate,
        trainer_vs_bare=statistics.median(round_ratios),
        trainer_vs_bare_round_min=min(round_ratios),
        trainer_vs_bare_round_max=max(round_ratios),
        trainer_vs_bare_cpu=statistics.median(cpu_ratios),
    )
    if device.type == "cpu":
        # the typical single step, blind to bursts from other jobs (and to rare costly steps)
        trainer_step = statistics.median(t for run in trainer_runs for t in run.step_wall_s)
        bare_step = statistics.median(t for run in bare_runs for t in run.step_wall_s)
        figures["trainer_vs_bare_step_median"] = bare_step / trainer_step
    elements = "voxels" if args.spatial_dims == 3 else "pixels"
    tile_elements = math.prod(_tile_shape(args))
    figures.update({
        "trainer_samples_per_s": trainer_rate * args.batch,
        "bare_samples_per_s": bare_rate * args.batch,
        f"trainer_{elements}_per_s": trainer_rate * args.batch * tile_elements,
        f"bare_{elements}_per_s": bare_rate * args.batch * tile_elements,
    })
    figures.update(
        peak_mem_mb=trainer_peak,
        bare_peak_mem_mb=bare_peak,
        peak_mem_kind="cuda_max_allocated" if device.type == "cuda" else "process_max_rss",
    )
    figures.update(_flops_figures(parts, args, {"trainer": trainer_rate * args.batch, "bare": bare_rate * args.batch}))
    return figures


def _trainer_only(parts: _Parts, args: argparse.Namespace) -> Figures:
    """Per-rank trainer timing under torchrun (the --nproc launcher reads rank 0's figures)."""
    device = parts.ctx.device
    times = []
    reset_peak(device)
    for _ in range(args.rounds):
        times.append(_time_trainer(parts, args).total.wall_s)
    rate = args.steps / statistics.median(times)
    figures = _setting(parts, args)
    figures.update(
        trainer_steps_per_s=rate,
        global_samples_per_s=rate * parts.layout.global_batch_size,
        peak_mem_mb=peak_mb(device),
        threads_per_rank=torch.get_num_threads() if device.type == "cpu" else 0,
    )
    return figures


def _setting(parts: _Parts, args: argparse.Namespace) -> Figures:
    model = parts.raw_model
    return {
        "preset": model.preset,
        "base_width": model.base_width,
        "depth": model.depth,
        "spatial_dims": args.spatial_dims,
        "tile": "x".join(str(size) for size in _tile_shape(args)) if args.spatial_dims == 3 else args.tile,
        **({"z_pools": parts.raw_model.z_pools} if args.spatial_dims == 3 else {}),
        "batch_per_rank": args.batch,
        "world_size": parts.ctx.world_size,
        "precision": args.precision,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "activation_checkpointing": args.activation_checkpointing,
        "optim": args.optim + ("_fused" if args.fused else ""),
        "device": parts.ctx.device.type,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
    }


def _flops_figures(parts: _Parts, args: argparse.Namespace, samples_per_s: dict[str, float]) -> Figures:
    from unetdist.flops import mfu, peak_flops_per_s, training_flops_per_sample

    flops = training_flops_per_sample(parts.raw_model, (parts.config.model.in_channels, *_tile_shape(args)))
    figures: Figures = {"model_gflops_per_sample": flops / 1e9}
    if parts.ctx.device.type != "cuda":
        return figures
    peak = peak_flops_per_s(torch.cuda.get_device_name(parts.ctx.device), args.precision)
    figures["peak_tflops"] = peak / 1e12 if peak else "unknown"
    for name, rate in samples_per_s.items():
        utilisation = mfu(flops, rate, peak)
        figures[f"{name}_mfu"] = utilisation if utilisation is not None else "unknown"
    return figures


def _worker_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unetdist.bench.train", description="a torchrun worker")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if not args.worker_result:
        parser.error("this entry point is the --nproc worker; run `python -m unetdist.bench train` instead")
    _check_args(args)
    _run_in_process(args)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
