"""Loader throughput in alternating rounds, for ``bench data``: each contestant is timed over one window
of micro-batches per round, in turn, so that load from other processes hits them alike; beside the
rates, the cores that other processes kept busy during each window (Linux), so that a slow window can
be told from a contended one.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch


def rate(iterator, batches: int, batch: int, buffered: int) -> float:
    """Samples/s over ``batches`` micro-batches of ``batch``, once what the workers hold is drained."""
    for _ in range(buffered + 1):  # started, and what the workers had prefetched while idle is drained
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch / (time.perf_counter() - start)


def cpu_s_of_others() -> float | None:
    """CPU seconds the machine's other processes (not this one, not its children) have used so far:
    busy time from ``/proc/stat`` less this process tree's; None where ``/proc`` is not there."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = sum(fields[:3]) + fields[5] + fields[6]  # user, nice, system, irq, softirq
        ours = 0
        for pid in [os.getpid(), *(child.pid for child in multiprocessing.active_children())]:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ours += int(stat[11]) + int(stat[12])  # utime, stime
    except (AttributeError, OSError, ValueError, IndexError):
        return None
    return (busy - ours) / ticks


def rounds(
    contestants: dict[str, tuple], batches: int, batch: int, repeats: int
) -> tuple[dict[str, list[float]], list[float]]:
    """Samples/s of each ``name: (iterator, items in flight)`` in ``repeats`` rounds of one window each, in
    turn, and the cores other processes kept busy in each window (none: not measurable here)."""
    for iterator, buffered in contestants.values():
        # untimed: every loader's workers start (the next one's would otherwise start in a timed window)
        rate(iterator, 4, batch, buffered)
    rates: dict[str, list[float]] = {name: [] for name in contestants}
    other_cores = []
    for round_index in range(repeats):
        print(f"bench data: round {round_index + 1} of {repeats}", file=sys.stderr, flush=True)
        for name, (iterator, buffered) in contestants.items():
            others_before, start = cpu_s_of_others(), time.perf_counter()
            rates[name].append(rate(iterator, batches, batch, buffered))
            others_after = cpu_s_of_others()
            if others_before is not None and others_after is not None:
                other_cores.append(max(0.0, others_after - others_before) / (time.perf_counter() - start))
    return rates, other_cores


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    return float(np.median(np.divide(numerators, denominators)))


def augmentation_rate(batch: dict, device: str, repeats: int) -> float:
    """Tiles/s of ``to_model_input`` (copy to ``device`` + augmentation + normalisation)."""
    from unetdist.data import to_model_input

    synchronize = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if device.startswith("cuda"):
        batch = {**batch, **{key: batch[key].pin_memory() for key in ("image", "mask") if key in batch}}
    to_model_input(batch, device)  # warm-up: kernels, allocator
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        to_model_input(batch, device)
    synchronize()
    return repeats * len(batch["image"]) / (time.perf_counter() - start)
