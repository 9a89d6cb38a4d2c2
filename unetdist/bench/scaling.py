"""bench train --nproc N: torchrun 1 rank, then N ranks, and report the scaling.

Each launch runs ``python -m unetdist.bench.train`` as the torchrun worker (its ``--worker-result``
file carries rank 0's figures back). The worker is named by module path, not imported, so this
launcher and the loops it times do not import each other.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from unetdist.bench import Figures

WORKER_MODULE = "unetdist.bench.train"


def run_scaling(args: argparse.Namespace) -> Figures:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = args.threads or max(1, cores // args.nproc)
    single = _launch(args, nproc=1, threads=threads)
    multi = _launch(args, nproc=args.nproc, threads=threads)
    figures = {key: multi[key] for key in multi if key not in ("trainer_steps_per_s", "global_samples_per_s")}
    figures.update(
        samples_per_s_1rank=single["global_samples_per_s"],
        global_samples_per_s=multi["global_samples_per_s"],
        speedup_vs_1rank=multi["global_samples_per_s"] / single["global_samples_per_s"],
        scaling_efficiency=multi["global_samples_per_s"] / (args.nproc * single["global_samples_per_s"]),
        steps_per_s=multi["trainer_steps_per_s"],
    )
    if args.vs_all_threads and multi["device"] == "cpu":
        # the same machine as one rank using every core: is splitting it into ranks worth it?
        whole = _launch(args, nproc=1, threads=threads * args.nproc)
        figures["samples_per_s_1rank_all_threads"] = whole["global_samples_per_s"]
        figures["speedup_vs_1rank_all_threads"] = multi["global_samples_per_s"] / whole["global_samples_per_s"]
    return figures


def _launch(args: argparse.Namespace, nproc: int, threads: int) -> Figures:
    with tempfile.TemporaryDirectory(prefix="unetdist-bench-") as scratch:
        result = Path(scratch) / "result.json"
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", WORKER_MODULE, *_worker_argv(args, threads), "--worker-result", str(result),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        # captured, so that nothing torchrun prints lands after the bench's final line
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not result.exists():
            tail = (done.stdout + done.stderr)[-4000:]
            raise RuntimeError(f"torchrun with {nproc} rank(s) failed (exit {done.returncode}):\n{tail}")
        return json.loads(result.read_text())


def _worker_argv(args: argparse.Namespace, threads: int) -> list[str]:
    argv = [
        "--preset", args.preset, "--base-width", str(args.base_width), "--depth", str(args.depth),
        "--norm", args.norm, "--tile", str(args.tile), "--batch", str(args.batch),
        "--precision", args.precision, "--compile-mode", args.compile_mode, "--optim", args.optim,
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--rounds", str(args.rounds),
        "--log-every", str(args.log_every), "--device", args.device, "--threads", str(threads),
        "--spatial-dims", str(args.spatial_dims), "--tile-depth", str(args.tile_depth), "--z-pools", str(args.z_pools),
    ]
    for flag in ("channels_last", "compile", "activation_checkpointing", "fused"):
        if getattr(args, flag):
            argv.append("--" + flag.replace("_", "-"))
    return argv
