"""Train a U-Net: one process, or one process per device under torchrun.

    python -m unetdist.train --config configs/quickstart.yaml train.max_steps=50
    torchrun --nproc_per_node=2 -m unetdist.train --config configs/quickstart.yaml
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HEAD:29500 \\
        --rdzv_id=JOB -m unetdist.train --config configs/x.yaml --resume auto

Trailing ``section.key=value`` arguments override the YAML files. Exit codes: 0 done,
2 bad config or input (one line naming the key, file, store or sample; a data loader
worker's error included), 75 stopped by SIGTERM/SIGUSR1/Ctrl-C after saving a checkpoint
(resume with ``--resume auto``), 74 a checkpoint could not be written (disk full, file size
limit; the previous one is intact), 130 a second Ctrl-C (stopped at once, no checkpoint),
3 the watchdog saw no progress, 1 any other failure.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from unetdist import checkpoint as ckpt
from unetdist import distributed, preemption
from unetdist.batch_layout import BatchLayout, batch_layout
from unetdist.config import RESUME_SAFE_KEYS, Config, ConfigError, load_config
from unetdist.data import build_train_loader, build_val_loader
from unetdist.distributed import DistributedContext
from unetdist.logs import setup_logging
from unetdist.optim import build_optimizer
from unetdist.preemption import Preempted, StopSignal
from unetdist.redaction import redact_values
from unetdist.seeding import seed_everything
from unetdist.tracking.run_outputs import RunOutputs, error_summary
from unetdist.trainer import Trainer, build_model

log = logging.getLogger("unetdist.train")

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process that Ctrl-C ended


def parse_args(argv: list[str] | None) -> tuple[list[str], list[str]]:
    parser = argparse.ArgumentParser(prog="python -m unetdist.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", action="append", default=[], metavar="YAML", help="config file(s), later wins")
    parser.add_argument("--resume", help="never | auto | PATH (same as checkpoint.resume=...)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    return args.config, overrides


def main(argv: list[str] | None = None) -> int:
    files, overrides = parse_args(argv)
    try:
        config = load_config(files, overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    stop_signal = StopSignal()  # before the slow start-up, so an early SIGTERM is not lost
    ctx = distributed.init_distributed(config.train.device, config.train.backend, config.train.timeout_s)
    setup_logging(ctx.is_main)
    output_dir = Path(config.train.output_dir)
    outputs: RunOutputs | None = None
    try:
        layout = batch_layout(config.train, ctx.world_size)
        seed_everything(config.train.seed, ctx.rank)
        if torch.cuda.is_available():
            torch.backends.cudnn.benchmark = config.train.cudnn_benchmark
        resume_state = find_resume_state(config, ctx)
        start_step = int(resume_state["step"]) if resume_state else 0

        raw_model, wrapped_model = build_model(config, ctx)
        optimizer = build_optimizer(raw_model.parameters(), config.optim, config.model.preset, ctx.device.type)
        run_id = resume_state.get("mlflow_run_id") if resume_state else None
        outputs = RunOutputs.open(config, ctx, start_step, run_id)
        outputs.log_config_files(files)  # a plan's reasons and its data fingerprint
        checkpointer = ckpt.CheckpointWriter(
            output_dir / "checkpoints",
            ctx.rank,
            ctx.world_size,
            keep=config.checkpoint.keep,
            keep_every=config.checkpoint.keep_every,
            async_save=config.checkpoint.async_save,
        )
        trainer = Trainer(config, ctx, layout, raw_model, wrapped_model, optimizer, outputs, checkpointer, stop_signal)
        if resume_state:
            trainer.load_state_dict(resume_state)
            log.info("resumed at step %d", trainer.step)

        train_loader, val_loader = build_loaders(config, ctx, layout, start_step)
        outputs.log_data_lineage(config.data, train_loader, val_loader)
        trainer.fit(train_loader, val_loader)
        checkpointer.finish()
        log_models(outputs, trainer, config)
        outputs.close("FINISHED")
        return 0
    except Preempted as stop:
        log.warning("%s; resume with --resume auto", stop)
        if outputs:
            outputs.mark_preempted(stop.step)
            outputs.close("PREEMPTED")
        return preemption.EXIT_PREEMPTED
    except ckpt.CheckpointWriteError as err:
        # disk full or a file size limit: the message names the file, the sizes and the intact checkpoint
        log.error("%s", err)
        if outputs:
            outputs.close("FAILED", error=error_summary(err))
        return ckpt.EXIT_WRITE_FAILED
    except (ConfigError, ValueError, ckpt.CheckpointError) as err:
        # bad input: the message names the key, file or sample; a traceback would only hide it
        log.error("%s", err)
        log.debug("details", exc_info=True)
        if outputs:
            outputs.close("FAILED", error=error_summary(err))
        return 2
    except KeyboardInterrupt as err:
        # a second Ctrl-C: the first one asked for a checkpoint (StopSignal), this one stops at once
        log.error("stopped by a second Ctrl-C without saving; --resume auto continues from the last checkpoint")
        if outputs:
            outputs.close("KILLED", error=error_summary(err))
        return EXIT_INTERRUPTED
    except BaseException as err:
        if outputs:
            outputs.close("FAILED", error=error_summary(err))
        raise
    finally:
        stop_signal.restore()
        distributed.cleanup()


def log_models(outputs: RunOutputs, trainer: Trainer, config: Config) -> None:
    """The final model, and the best one by validation foreground Dice when that is another step."""
    outputs.log_final_model(trainer.raw_model, config, step=trainer.step, decoding=trainer.decoding.to_dict())
    best = trainer.best_checkpoint
    if best is not None and best.name != ckpt.step_name(trainer.step):
        best_state = ckpt.load_checkpoint(best)
        best_model = copy.deepcopy(trainer.raw_model)
        best_model.load_state_dict(best_state["model"])
        outputs.log_final_model(best_model, config, best=True, step=int(best_state["step"]),
                                decoding=best_state.get("decoding"))  # as tuned then, if it was


def find_resume_state(config: Config, ctx: DistributedContext) -> dict[str, Any] | None:
    """The checkpoint to continue from: ``auto`` = newest good one in the run's folder.

    Rank 0 chooses and broadcasts the choice, so all ranks load the same checkpoint.
    """
    resume = config.checkpoint.resume
    if resume == "never":
        return None
    path: Path | None = Path(resume)
    if resume == "auto":
        path = None
        if ctx.is_main:
            try:
                path = ckpt.latest_good_checkpoint(Path(config.train.output_dir) / "checkpoints")
            except ckpt.CheckpointError as err:
                path = err
        path = distributed.broadcast_object(path)
        if isinstance(path, ckpt.CheckpointError):
            raise path
        if path is None:
            log.info("resume auto: no checkpoint in %s/checkpoints; starting fresh", config.train.output_dir)
            return None
    state = ckpt.load_checkpoint(path, rank=ctx.rank)
    if state.get("config_hash") != config.digest():
        _refuse_math_changes(state["config"], config)
    log.info("resuming from %s (step %d, saved by %s ranks)", path, state["step"], state.get("saved_world_size"))
    return state


def _refuse_math_changes(saved: dict[str, dict[str, Any]], config: Config) -> None:
    # both sides redacted: a checkpoint from before redaction may hold a credential, a new one holds ***
    saved, current = redact_values(saved), config.to_dict()
    changed = [
        f"{section}.{key}: {saved.get(section, {}).get(key)!r} -> {value!r}"
        for section, values in current.items()
        for key, value in values.items()
        if f"{section}.{key}" not in RESUME_SAFE_KEYS and saved.get(section, {}).get(key) != value
    ]
    if changed:
        raise ConfigError("cannot resume: the checkpoint was trained with a different config in\n  " + "\n  ".join(changed))


def build_loaders(config: Config, ctx: DistributedContext, layout: BatchLayout, start_step: int):
    """This rank's endless training stream, continuing the global sample sequence exactly where
    ``start_step`` left it (at any world size), and its share of the validation split."""
    common = dict(
        rank=ctx.rank,
        world_size=ctx.world_size,
        micro_batch_size=layout.micro_batch_size,
        in_channels=config.model.in_channels,
        num_classes=config.model.num_classes,
        use_weight_map=config.loss.use_weight_map,
        target=config.loss.target,
        boundary_width_px=config.loss.boundary_width_px,
        spatial_dims=config.model.spatial_dims,
    )
    train_loader = build_train_loader(
        config.data,
        seed=config.train.seed,
        global_batch_size=layout.global_batch_size,
        start_sample=start_step * layout.global_batch_size,
        **common,
    )
    return train_loader, build_val_loader(config.data, **common)


if __name__ == "__main__":
    sys.exit(main())
