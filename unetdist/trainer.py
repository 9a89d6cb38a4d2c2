"""The step loop: forward, loss, backward, gradient sync, optimizer step, validate, checkpoint, log.

``Trainer`` owns one model replica per rank. A training step consumes
``accumulation_steps`` micro-batches; gradients are synchronised by DDP only on the last
one (``no_sync`` on the others), so N ranks x A micro-batches give the gradient of the
whole global batch. One code path serves fp32, bf16 and fp16 (autocast + a GradScaler
that is enabled only for fp16).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from unetdist import __version__, distributed
from unetdist import checkpoint as ckpt
from unetdist.batch_layout import BatchLayout
from unetdist.config import Config
from unetdist.data import to_model_input
from unetdist.distributed import DistributedContext
from unetdist.geometry import center_crop
from unetdist.instance_validation import InstanceValidation, ap_metrics, tune_decoding
from unetdist.instances import DecodeParams
from unetdist.losses import SegmentationLoss
from unetdist.metrics import confusion_from_logits, metric_dict
from unetdist.model import build_unet
from unetdist.optim import lr_at, set_lr
from unetdist.precision import autocast, grad_scaler
from unetdist.preemption import Preempted, StopSignal
from unetdist.seeding import rng_state, set_rng_state
from unetdist.tracking.run_outputs import RunOutputs
from unetdist.watchdog import Watchdog

log = logging.getLogger(__name__)

def build_model(config: Config, ctx: DistributedContext) -> tuple[nn.Module, nn.Module]:
    """The configured U-Net on this rank's device, wrapped for DDP/compile: (raw_model, wrapped)."""
    model = build_unet(
        config.model.preset,
        config.model.in_channels,
        config.model.num_classes,
        base_width=config.model.base_width or None,
        depth=config.model.depth or None,
        norm=config.model.norm,
        spatial_dims=config.model.spatial_dims,
        z_pools=None if config.model.z_pools < 0 else config.model.z_pools,
    )
    return wrap_model(model, config, ctx)


def channels_last_format(config: Config) -> torch.memory_format:
    """``train.channels_last``'s layout: NHWC for images, NDHWC (``channels_last_3d``) for volumes."""
    return torch.channels_last_3d if config.model.spatial_dims == 3 else torch.channels_last


def wrap_model(model: nn.Module, config: Config, ctx: DistributedContext) -> tuple[nn.Module, nn.Module]:
    """Move ``model`` to the device and wrap it for DDP / compile; returns (raw_model, wrapped)."""
    if config.model.sync_batchnorm and ctx.is_distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if config.train.activation_checkpointing:
        model.activation_checkpointing = True
    model = model.to(ctx.device)
    if config.train.channels_last:
        model = model.to(memory_format=channels_last_format(config))
    wrapped: nn.Module = model
    if ctx.is_distributed:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        wrapped = DistributedDataParallel(
            model, device_ids=device_ids, gradient_as_bucket_view=True, static_graph=config.train.static_graph
        )
    if config.train.compile:
        # compilation happens at the first call; a graph that fails to compile runs eagerly
        # (dynamo logs why) instead of stopping the run
        torch._dynamo.config.suppress_errors = True
        wrapped = torch.compile(wrapped, mode=config.train.compile_mode)
    return model, wrapped


class Trainer:
    def __init__(
        self,
        config: Config,
        ctx: DistributedContext,
        layout: BatchLayout,
        raw_model: nn.Module,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        outputs: RunOutputs,
        checkpointer: ckpt.CheckpointWriter | None = None,
        stop_signal: StopSignal | None = None,
    ) -> None:
        self.config = config
        self.ctx = ctx
        self.layout = layout
        self.raw_model = raw_model  # for state_dict and logging; `model` may be DDP/compiled
        self.model = model
        self.optimizer = optimizer
        self.outputs = outputs
        self._log_call_s = 0.0  # how long the last train-metrics call to the tracker took
        self.checkpointer = checkpointer
        self.stop_signal = stop_signal
        self.loss_fn = SegmentationLoss(config.loss.kind, config.model.num_classes, config.loss.dice_weight,
                                        ignore_index=config.data.ignore_index)
        self.scaler = grad_scaler(ctx.device.type, config.train.precision)
        self.step = 0  # optimizer steps taken
        self.best_fg_dice = float("-inf")  # best validation foreground Dice of this job
        self.best_checkpoint: Path | None = None
        # how predictions become instances: the target's defaults until tuned on validation
        self.decoding = DecodeParams.defaults(config.loss.target, config.model.spatial_dims)

    # ------------------------------------------------------------ one step

    def _to_device(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        batch = to_model_input(batch, self.ctx.device)  # device-side augmentation, when configured
        image = batch["image"]
        if self.config.train.channels_last:
            image = image.contiguous(memory_format=channels_last_format(self.config))
        weight = batch.get("weight")  # present when the data gives one (loss.use_weight_map)
        return image, batch["mask"], weight

    def _forward(self, image: torch.Tensor) -> torch.Tensor:
        with autocast(self.ctx.device.type, self.config.train.precision):
            return self.model(image)

    def train_step(self, micro_batches: list[dict[str, Any]]) -> torch.Tensor:
        """One optimizer step over this rank's micro-batches; returns the mean loss (detached, no host sync)."""
        if not (self.model.training and self.raw_model.training):  # train() walks every module: ~0.2 ms of host time
            self.model.train()
        set_lr(self.optimizer, lr_at(self.step, self.config.optim, self.config.train.max_steps))
        losses = []
        for index, batch in enumerate(micro_batches):
            is_last = index == len(micro_batches) - 1
            image, mask, weight = self._to_device(batch)
            sync = contextlib.nullcontext() if is_last or not self.ctx.is_distributed else self.model.no_sync()
            with sync:
                logits = self._forward(image)
                loss = self.loss_fn(logits, mask, weight)
                if len(micro_batches) > 1:
                    loss = loss / len(micro_batches)
                self.scaler.scale(loss).backward()
            losses.append(loss.detach())
        if self.config.optim.grad_clip_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.config.optim.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return losses[0] if len(losses) == 1 else torch.stack(losses).sum()

    # ------------------------------------------------------------ validation

    @torch.no_grad()
    def validate(self, val_loader: Iterable[dict[str, Any]], tune: bool = False) -> dict[str, float]:
        """Loss, per-class Dice/IoU and, for instance data, AP at IoU 0.5/0.75/0.9 over the whole
        validation split, summed across all ranks. ``tune``: also choose the decoding thresholds
        of the highest AP@0.5 (:mod:`unetdist.instance_validation`), kept as ``self.decoding``."""
        self.model.eval()
        num_classes = self.config.model.num_classes
        confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=self.ctx.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.ctx.device)
        tiles = torch.zeros((), dtype=torch.float64, device=self.ctx.device)
        instance_scores = InstanceValidation(self.decoding, keep_for_tuning=tune)
        seen_instances = False
        panel_tiles = None
        for index, batch in enumerate(val_loader):
            if self.config.train.val_max_batches and index >= self.config.train.val_max_batches:
                break
            image, mask, weight = self._to_device(batch)
            logits = self._forward(image).float()
            loss_sum += self.loss_fn(logits, mask, weight).double() * image.shape[0]
            tiles += image.shape[0]
            confusion += confusion_from_logits(logits, mask, num_classes, ignore_index=self.config.data.ignore_index)
            predicted = None
            if batch.get("instances") is not None:  # data with instance masks: decoded and matched
                seen_instances = True
                predicted = instance_scores.add(logits, batch["instances"])
            if panel_tiles is None:  # the first val tiles are the same at every validation
                count = self.config.tracking.num_images
                truth = center_crop(mask[:count], logits.shape[2:])  # [N, *spatial]: images or volumes
                panel_tiles = (image[:count], truth, logits[:count].argmax(dim=1))
                if predicted is not None:
                    panel_tiles += (center_crop(batch["instances"][:count], logits.shape[2:]), predicted[:count])
        totals = distributed.all_reduce_sum(torch.cat([loss_sum.view(1), tiles.view(1)]))
        distributed.all_reduce_sum(confusion)
        metrics = metric_dict(confusion.cpu())
        metrics["val/loss"] = float(totals[0] / totals[1].clamp(min=1))
        metrics["val/tiles"] = float(totals[1])
        # every rank must take part in the collectives below, also one that saw no validation tile
        if self._sum_over_ranks(torch.tensor([int(seen_instances)])).item():
            counts = self._sum_over_ranks(torch.from_numpy(instance_scores.counts))
            metrics.update(ap_metrics(counts.numpy()))
            if tune:
                self.decoding, tuned_ap = tune_decoding(instance_scores, self.decoding.target, self._sum_over_ranks,
                                                        spatial_dims=self.config.model.spatial_dims)
                metrics["val/tuned_ap50"] = tuned_ap
                log.info("decoding tuned on validation: AP@0.5 %.4f with %s", tuned_ap, self.decoding.to_dict())
        if panel_tiles is not None:
            self.outputs.log_val_panels(self.step, *panel_tiles)
        return metrics

    def _sum_over_ranks(self, counts: torch.Tensor) -> torch.Tensor:
        """A host tensor summed over ranks (through the device: NCCL reduces only CUDA tensors)."""
        return distributed.all_reduce_sum(counts.to(self.ctx.device)).cpu()

    # ------------------------------------------------------------ the run

    def fit(self, train_loader: Iterable[dict[str, Any]], val_loader: Iterable[dict[str, Any]]) -> dict[str, float]:
        """Train to ``train.max_steps``; raises ``Preempted`` after saving when a stop signal arrives."""
        config = self.config.train
        batches = iter(train_loader)  # the loader's workers start now, while the step-0 validation runs
        val_metrics: dict[str, float] = {}
        log.info(
            "training steps %d..%d: global batch %d = %d ranks x %d micro-batches x %d tiles",
            self.step + 1,
            config.max_steps,
            self.layout.global_batch_size,
            self.layout.world_size,
            self.layout.accumulation_steps,
            self.layout.micro_batch_size,
        )
        if config.val_at_start and self.step == 0:
            self.outputs.tracker.log_metrics(self.validate(val_loader), step=0)
        window = _ThroughputWindow(self.ctx.device)  # after the step-0 validation: it is not training time
        sample_log = self._open_sample_log()
        watchdog = Watchdog(config.watchdog_s, self.ctx.rank)  # a dead peer must not hang the job
        try:
            while self.step < config.max_steps:
                wait_start = time.perf_counter()
                micro_batches = _take(batches, self.layout.accumulation_steps)
                window.data_wait_s += time.perf_counter() - wait_start
                if sample_log:
                    keys = [key for batch in micro_batches for key in batch["key"]]
                    sample_log.write(json.dumps({"step": self.step + 1, "keys": keys}) + "\n")
                window.add(self.train_step(micro_batches))
                watchdog.beat(self.step)
                is_last = self.step == config.max_steps

                if self.step % config.log_every == 0 or is_last:
                    self._log_train_metrics(window, getattr(train_loader, "skipped_samples", 0))
                    window.restart()
                is_best = False
                if (config.val_every and self.step % config.val_every == 0) or is_last:
                    val_start = time.perf_counter()
                    val_metrics = self.validate(val_loader, tune=is_last and config.tune_decoding)
                    is_best = val_metrics["val/fg_dice"] > self.best_fg_dice
                    self.best_fg_dice = max(self.best_fg_dice, val_metrics["val/fg_dice"])
                    self.outputs.tracker.log_metrics(val_metrics, step=self.step)
                    log.info("step %d val loss %.4f fg dice %.4f", self.step, val_metrics["val/loss"],
                             val_metrics["val/fg_dice"])
                    window.exclude(val_start)
                # a collective over all ranks' host threads: not every step, so that a host that
                # queues GPU work ahead is not held in lock-step with the slowest rank
                stop = (self.stop_signal is not None and (self.step % config.stop_check_every == 0 or is_last)
                        and self.stop_signal.should_stop())
                every = self.config.checkpoint.every
                if (every and self.step % every == 0) or is_last or stop:
                    save_start = time.perf_counter()
                    self.save_checkpoint(is_best=is_best)
                    window.exclude(save_start)
                watchdog.beat(self.step)
                if stop and not is_last:
                    raise Preempted(self.step, self.stop_signal.received or "a peer's signal")
        finally:
            watchdog.stop()
            if sample_log:
                sample_log.close()
        return val_metrics

    def _log_train_metrics(self, window: _ThroughputWindow, skipped_samples: int) -> None:
        """Loss averaged over ranks and steps since the last log (the only host sync of the loop)."""
        elapsed = window.train_time_s
        totals = distributed.all_reduce_sum(torch.stack([window.loss_sum, window.loss_sum.new_tensor(skipped_samples)]))
        mean_loss = totals[0].item() / (window.steps * self.ctx.world_size)
        metrics = {
            "train/loss": mean_loss,
            "train/lr": self.optimizer.param_groups[0]["lr"],
            "train/samples_per_s": window.steps * self.layout.global_batch_size / elapsed,
            "train/step_time_s": elapsed / window.steps,
            # waiting for the next micro-batches: a worker behind, and the DataLoader's hand-over of each item
            "train/data_wait_pct": 100.0 * window.data_wait_s / elapsed,
            "data/skipped_samples": totals[1].item(),
            # the previous log's call to the tracker: what logging costs the loop (it queues, the
            # server is reached by a sender thread: an outage must not make this grow)
            "train/log_call_s": self._log_call_s,
        }
        if self.ctx.device.type == "cuda":
            metrics["train/cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated(self.ctx.device) / 2**30
        call_start = time.perf_counter()
        self.outputs.tracker.log_metrics(metrics, step=self.step)
        self._log_call_s = time.perf_counter() - call_start
        self.outputs.progress.update(self.step, loss=mean_loss, samples_per_s=metrics["train/samples_per_s"])
        log.info("step %d loss %.4f %.1f samples/s", self.step, mean_loss, metrics["train/samples_per_s"])

    def _open_sample_log(self):
        """With ``train.record_samples``, each rank appends the keys it trains on, step by step."""
        if not self.config.train.record_samples:
            return None
        path = self.outputs.run_dir / "samples" / f"rank-{self.ctx.rank:05d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "a", buffering=1)

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The replicated state, written once by rank 0."""
        return {
            "step": self.step,
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "config": self.config.to_dict(),
            "config_hash": self.config.digest(),
            "mlflow_run_id": self.outputs.tracker.run_id,
            "world_size": self.ctx.world_size,
            "decoding": self.decoding.to_dict(),
            "versions": {"torch": str(torch.__version__), "unetdist": __version__},
        }

    def rank_state_dict(self) -> dict[str, Any]:
        """What differs per rank: random states and the data position."""
        return {
            "rank": self.ctx.rank,
            "rng": rng_state(),
            "data": {"samples_consumed": self.step * self.layout.global_batch_size},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        if state.get("decoding"):  # checkpoints before decoding was tuned have none
            self.decoding = DecodeParams.from_dict(state["decoding"])
        if state.get("rank_state") is not None:
            set_rng_state(state["rank_state"]["rng"])
        else:
            log.warning("checkpoint has no part for rank %d (saved by %s ranks): fresh random state for this rank",
                        self.ctx.rank, state.get("saved_world_size"))

    def save_checkpoint(self, is_best: bool = False) -> None:
        if self.checkpointer is None:
            return
        trainer_state = self.state_dict() if self.ctx.is_main else None  # replicated: one writer
        path = self.checkpointer.save(self.step, trainer_state, self.rank_state_dict())
        if path is not None:
            self.outputs.on_checkpoint_saved(path, is_best=is_best)
            if is_best:
                self.best_checkpoint = path


class _ThroughputWindow:
    """Loss and timing accumulated between two log steps, on the device (no host sync per step)."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.restart()

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss
        self.steps += 1

    def exclude(self, since: float) -> None:
        """Leave the time since ``since`` (validation, a checkpoint save) out of the throughput."""
        self.excluded_s += time.perf_counter() - since

    @property
    def train_time_s(self) -> float:
        return time.perf_counter() - self.start - self.excluded_s

    def restart(self) -> None:
        self.loss_sum.zero_()
        self.steps = 0
        self.start = time.perf_counter()
        self.data_wait_s = 0.0
        self.excluded_s = 0.0


def _take(batches: Iterator[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    try:
        return [next(batches) for _ in range(count)]
    except StopIteration:
        raise RuntimeError("the training stream ended; it is expected to repeat forever") from None
