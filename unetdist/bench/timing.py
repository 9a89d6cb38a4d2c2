"""Clocks for the training benchmark: wall and CPU time per window of steps, device syncs, peak memory.

Kept apart from the loops in ``bench/train.py`` so that what is timed there reads as the loops
themselves; the device is synchronised only where a window starts and ends.
"""

from __future__ import annotations

import itertools
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Clocks:
    """Wall time and this process's CPU time (all threads), in seconds."""

    wall_s: float
    cpu_s: float

    @staticmethod
    def now() -> Clocks:
        return Clocks(time.perf_counter(), time.process_time())

    def __sub__(self, other: Clocks) -> Clocks:
        return Clocks(self.wall_s - other.wall_s, self.cpu_s - other.cpu_s)


@dataclass(frozen=True)
class Window:
    """One timed run of ``steps`` steps: the total, and each step's wall time (CPU device only:
    on CUDA a step's host time says nothing until the device is synchronised)."""

    total: Clocks
    step_wall_s: list[float]


def window_of(stamps: list[Clocks], device: torch.device) -> Window:
    per_step = [b.wall_s - a.wall_s for a, b in itertools.pairwise(stamps)] if device.type == "cpu" else []
    return Window(stamps[-1] - stamps[0], per_step)


class TimedStream:
    """The same batch forever; reads the clocks as each step from ``first`` to ``stop`` begins.

    The device is synchronised at ``first`` and ``stop`` only, so the trainer's own host syncs
    (or their absence) are what is measured.
    """

    def __init__(self, batch: dict[str, torch.Tensor], first: int, stop: int, device: torch.device) -> None:
        self.batch = batch
        self.first, self.stop = first, stop
        self.device = device
        self.stamps: list[Clocks] = []
        self.calls = 0

    def __iter__(self) -> TimedStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.first <= self.calls <= self.stop:
            if self.calls in (self.first, self.stop):
                synchronize(self.device)
            self.stamps.append(Clocks.now())
        self.calls += 1
        return self.batch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def interleaved(
    timed: dict[str, Callable[[], object]], device: torch.device, repeats: int
) -> dict[str, float]:
    """The best of ``repeats`` seconds of each function, after one warm-up run each; the functions
    take turns, so a machine that slows down or speeds up meanwhile skews no ratio."""
    for function in timed.values():
        function()
    best = dict.fromkeys(timed, float("inf"))
    for _ in range(max(repeats, 1)):
        for name, function in timed.items():
            best[name] = min(best[name], timed_once(function, device))
    return best


def timed_once(function: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    function()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started
