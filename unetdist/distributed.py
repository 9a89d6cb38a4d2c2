"""The one home of process-group code: start-up, queries, collectives, shutdown.

Every function here is safe in a single plain ``python`` process (no torchrun): the
collectives then return their input, so the trainer has one code path for 1 and N ranks.
Nothing else in the package reads ``RANK``/``WORLD_SIZE`` or calls ``init_process_group``.
The only module-level state is the process group and its gloo twin for control messages.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.rendezvous import rendezvous

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: a single process without a process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def init_distributed(device: str = "auto", backend: str = "auto", timeout_s: int = 600) -> DistributedContext:
    """Join the process group that torchrun described in the environment, if any.

    ``device``: auto | cpu | cuda; ``backend``: auto (nccl on CUDA, gloo on CPU) | gloo | nccl.
    """
    launched_by_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but CUDA is not available on this machine; use train.device=cpu")
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")

    if backend == "auto":
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
    if backend == "nccl" and torch_device.type != "cuda":
        raise RuntimeError("train.backend=nccl needs CUDA devices; use train.backend=gloo (or auto) on CPU")

    if not launched_by_torchrun:
        return DistributedContext(0, 1, 0, torch_device, None)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        store, _, _ = next(rendezvous("env://", timeout=timeout))
        # After a worker dies, torchrun (2.13, --standalone) restarts the group against the same
        # store, and gloo then dials the dead workers' addresses. A prefix per restart keeps each
        # attempt's keys apart, so `--max-restarts` really recovers.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            backend=backend,
            store=dist.PrefixStore(f"unetdist/attempt_{attempt}", store),
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device_id=torch_device if torch_device.type == "cuda" else None,
        )
        _control_group()  # every rank must create it at the same point
    log.debug("rank %d/%d (local %d) on %s with %s", rank, world_size, local_rank, torch_device, backend)
    return DistributedContext(rank, world_size, local_rank, torch_device, backend)


def cleanup() -> None:
    global _CONTROL_GROUP
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CONTROL_GROUP = None


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (a no-op in a single process); returns it."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def gather_object(value: object, dst: int = 0) -> list[object] | None:
    """Every rank's ``value`` as a list on rank ``dst`` (None elsewhere)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(value, gathered, dst=dst, group=_control_group())
    return gathered


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (e.g. "a stop signal arrived").

    Runs on a gloo group with a CPU tensor, so on GPUs it does not wait for the CUDA stream.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    tensor = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=_control_group())
    return bool(tensor.item())


_CONTROL_GROUP = None


def _control_group():
    """A gloo group for small CPU-side messages (the default group may be NCCL)."""
    global _CONTROL_GROUP
    if _CONTROL_GROUP is None:
        _CONTROL_GROUP = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return _CONTROL_GROUP


def broadcast_object(value: object, src: int = 0) -> object:
    """Rank ``src``'s value on every rank (e.g. the MLflow run id)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]
