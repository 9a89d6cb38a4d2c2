"""``python -m unetdist.plan``: fingerprint a data set, write a complete, commented training config.

    python -m unetdist.plan data/cells --out plan.yaml --minutes 30
    python -m unetdist.plan data/cells --out plan.yaml --steps 20000 --gpu-memory-gb 80
    python -m unetdist.plan my-data.yaml --out plan.yaml            # a config naming the data (any source)
    python -m unetdist.plan plan.fingerprint.json --out plan-gpu.yaml --gpu-memory-gb 40   # no data read
    python -m unetdist.train --config plan.yaml

DATA is a folder written by ``python -m unetdist.prepare`` (its dataset.json), a config YAML
whose data section names the data (shards, a Zarr store, OME-Zarr images: what the loader
reads, with ``model.in_channels``), or a fingerprint JSON this command wrote. The data's
fingerprint (:mod:`unetdist.data.fingerprint`) goes beside the plan (``plan.fingerprint.json``)
and, summarised, into its header; the values come from fixed rules
(:func:`unetdist.planning.plan_config`), each with a comment saying why. The same data and
budget give the same file, byte for byte. Exit codes: 0 written, 2 bad input (one line naming it).

Volumes (a whole-volume Zarr store: dataset.json or the store says ``"spatial_dims": 3``) get
the 3-D fingerprint (:mod:`unetdist.data.fingerprint_volumes`: spacing, shapes and objects per
axis) and a 3-D plan (:mod:`unetdist.planning.volumes`: nnU-Net's tile and pooling per axis).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from unetdist.config import ConfigError, DataConfig, load_config
from unetdist.data.fingerprint import (
    DEFAULT_SAMPLE_TILES,
    Fingerprint,
    FingerprintError,
    IntensityStats,
    fingerprint_data,
    fingerprint_path,
)
from unetdist.data.fingerprint_volumes import (
    VolumeFingerprint,
    fingerprint_volumes,
    is_volume_data,
    load_fingerprint,
)
from unetdist.data.remote import display, is_remote
from unetdist.data.samples import DataError
from unetdist.data.sources.tar import dataset_meta
from unetdist.planning import Budget, PlanError, plan_config

__all__ = ["main", "read_fingerprint", "render_plan", "write_plan"]

COMMENT_COLUMN = 44
# A CPU plan with --minutes times the machine itself (below): the share of a bare training step's
# FLOP rate that `unetdist.train` keeps on a CPU, where its loader worker shares the cores (measured
# on the 2-core development machine, quiet: a plan of tile 120 at batch 2 trained at 69 GFLOP/s,
# the bare step below at 84).
TRAIN_SHARE_OF_BARE_CPU = 0.8
# The reference network timed: the padded preset at nnU-Net's width, a typical planned tile.
REFERENCE_NET = {"tile_px": 128, "depth": 3, "batch": 2, "num_classes": 3}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m unetdist.plan",
        description="Fingerprint a data set and write a training config planned from it by fixed rules.",
    )
    parser.add_argument(
        "data",
        metavar="DATA",
        help="a prepared folder (dataset.json), a config YAML naming the data, or a fingerprint JSON",
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="the plan to write (YAML); its fingerprint goes beside it"
    )
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps of the run")
    length.add_argument(
        "--minutes", type=float, help="training time: the steps from the plan's step-time estimate"
    )
    parser.add_argument(
        "--gpu-memory-gb", type=float, help="plan for a GPU with this much memory (GiB; default: a CPU plan)"
    )
    parser.add_argument(
        "--tflops",
        type=float,
        help="achieved training TFLOP/s of the machine (default: unetdist.planning.costs' figure)",
    )
    parser.add_argument(
        "--sample-tiles", type=int, default=DEFAULT_SAMPLE_TILES, help="training tiles the fingerprint reads"
    )
    parser.add_argument("--seed", type=int, default=0, help="which tiles the fingerprint reads")
    return parser


def read_fingerprint(data: str, sample_tiles: int = DEFAULT_SAMPLE_TILES, seed: int = 0) -> Fingerprint:
    """The fingerprint of DATA (see the module docstring); PlanError naming DATA when it is none of those."""
    path = Path(data)
    if path.suffix == ".json" and path.is_file():
        try:
            return load_fingerprint(json.loads(path.read_text()))
        except (ValueError, TypeError, KeyError) as err:
            raise PlanError(f"{data}: not a fingerprint this command wrote: {err}") from None
    if path.suffix in (".yaml", ".yml") and path.is_file():
        config = load_config([path])
        return _fingerprint(config.data, config.model.in_channels, sample_tiles, seed)
    if not is_remote(data) and not path.is_dir():
        raise PlanError(
            f"DATA {data}: not found; expected a folder written by `python -m unetdist.prepare` (with "
            "dataset.json), a config YAML naming the data, or a fingerprint JSON"
        )
    try:
        meta = dataset_meta(data)
    except ValueError as err:
        raise PlanError(f"DATA {err}") from None
    format_, tile, channels = meta.get("format", "webdataset"), meta.get("tile_size"), meta.get("in_channels")
    if not isinstance(tile, int) or not isinstance(channels, int):
        raise PlanError(f"DATA {display(data)}/dataset.json: expected integer tile_size and in_channels")
    data_config = DataConfig(root=data, format=format_, tile_size=tile)
    return _fingerprint(data_config, channels, sample_tiles, seed)


def _fingerprint(data: DataConfig, channels: int, sample_tiles: int, seed: int) -> Fingerprint:
    """The 3-D fingerprint of volumes, else the 2-D one."""
    fingerprint = fingerprint_volumes if is_volume_data(data) else fingerprint_data
    return fingerprint(data, channels, sample_tiles=sample_tiles, seed=seed)


def measure_cpu_tflops(in_channels: int = 1, min_seconds: float = 3.0) -> float:
    """This CPU's achieved training TFLOP/s for the plan's step-time estimates: a few real training
    steps (forward, backward, AdamW) of ``REFERENCE_NET``, times ``TRAIN_SHARE_OF_BARE_CPU``."""
    import torch

    from unetdist.model import build_unet
    from unetdist.planning.costs import training_flops

    tile, depth, batch, classes = (REFERENCE_NET[key] for key in ("tile_px", "depth", "batch", "num_classes"))
    model = build_unet("padded", in_channels, classes, base_width=32, depth=depth, norm="instance")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(batch, in_channels, tile, tile, generator=generator)
    target = torch.randint(0, classes, (batch, tile, tile), generator=generator)

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(image), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the first step allocates; not timed
    steps, started = 0, time.perf_counter()
    while steps < 3 or time.perf_counter() - started < min_seconds:
        step()
        steps += 1
    seconds = time.perf_counter() - started
    flops = training_flops(tile, depth, in_channels, classes) * batch * steps
    return flops / seconds * TRAIN_SHARE_OF_BARE_CPU / 1e12


# ---------------------------------------------------------------- writing


def _scalar(value: Any) -> str:
    """``value`` as one line of YAML (flow style for lists)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**9).removesuffix("...\n").strip()


def _stats(stats: IntensityStats) -> str:
    return f"mean {stats.mean:.4g}, std {stats.std:.4g}, p1..p99.8 {stats.p1:.4g}..{stats.p99_8:.4g}"


def _volume_lines(fp: VolumeFingerprint) -> list[str]:
    """The header's lines on volumes, in place of the 2-D image lines."""
    shape, cap = (" x ".join(str(size) for size in sizes) for sizes in (fp.median_volume_zyx, fp.max_tile_zyx))
    z, y, x = fp.spacing
    return [
        f"fingerprint of {fp.sampled_tiles} training volumes (seed {fp.seed}):",
        f"  volumes: {fp.num_train_images} for training, median {shape} voxels (z, y, x), each at least {cap}",
        f"  spacing (median, z, y, x): {z:g}, {y:g}, {x:g}: z {z / max(y, x):.3g}x the in-plane",
        f"  {fp.train_pixels / 1e6:.4g} M training voxels; {fp.channels} channel(s) of {fp.image_dtype}; "
        f"masks: {fp.mask_kind}",
    ]


def _header(fp: Fingerprint, budget: Budget, plan_name: str, fingerprint_name: str) -> list[str]:
    height, width = fp.median_image_hw
    lines = [
        f"unetdist plan for {fp.dataset}: python -m unetdist.train --config {plan_name}",
        "Written by python -m unetdist.plan by fixed rules (unetdist/planning/) from the data's fingerprint",
        f"({fingerprint_name}) and the budget: the same data and budget give this file byte for byte.",
        "Each value's comment says why; change any of them here or on the train command line.",
        "",
    ]
    if isinstance(fp, VolumeFingerprint):
        lines += _volume_lines(fp)
    else:
        lines += [
            f"fingerprint of {fp.sampled_tiles} training tiles (seed {fp.seed}):",
            f"  images: {fp.num_train_images} for training, median {height} x {width} px, smallest edge "
            f"{fp.smallest_image_edge_px} px (from {fp.image_sizes_from})",
            f"  {fp.train_pixels / 1e6:.4g} M training pixels in {fp.num_train_samples} samples, tiles of up to "
            f"{fp.max_tile_px} px; {fp.channels} channel(s) of {fp.image_dtype}; masks: {fp.mask_kind}",
        ]
    for channel, stats in enumerate(fp.intensity):
        lines.append(f"  channel {channel}: min {stats.all.min:g}, max {stats.all.max:g}")
        for name in ("foreground", "background"):
            part = getattr(stats, name)
            lines.append(f"    {name}: " + (_stats(part) if part else "none"))
    if fp.median_object_diameter_px is None:
        lines.append(f"  objects ({fp.objects_from}): none seen")
    elif isinstance(fp, VolumeFingerprint) and fp.median_object_zyx:
        touching = "unknown" if fp.touching_fraction is None else f"{fp.touching_fraction:.0%}"
        extent = " x ".join(f"{size:.3g}" for size in fp.median_object_zyx)
        lines.append(
            f"  objects ({fp.objects_from}): {fp.num_objects} measured, median extent {extent} voxels "
            f"(z, y, x; {fp.median_object_volume_vx:.3g} voxels), touching another: {touching}; "
            f"cut by a volume face: {fp.objects_cut_fraction:.0%}"
        )
    else:
        touching = "unknown" if fp.touching_fraction is None else f"{fp.touching_fraction:.0%}"
        lines.append(
            f"  objects ({fp.objects_from}): {fp.num_objects} measured, median diameter "
            f"{fp.median_object_diameter_px:.3g} px (area {fp.median_object_area_px:.3g} px), "
            f"touching another: {touching}; cut by a tile edge: {fp.objects_cut_fraction:.0%}"
        )
    lines.append("  pixels per label: " + ", ".join(f"{k}: {v:.1%}" for k, v in fp.class_frequencies.items()))
    length = "no --steps or --minutes"
    if budget.steps or budget.minutes:
        length = f"--steps {budget.steps}" if budget.steps else f"--minutes {budget.minutes:g}"
    machine = f"a GPU of {budget.gpu_memory_gb:g} GiB" if budget.gpu_memory_gb else "a CPU"
    lines += ["", f"budget: {length} on {machine}", f"machine speed: {budget.speed_line()}"]
    return [f"# {line}".rstrip() for line in lines]


def render_plan(fp: Fingerprint, budget: Budget, plan_name: str = "plan.yaml") -> str:
    """The plan's YAML text: the header, then every value with its reason as a comment."""
    values, reasons = plan_config(fp, budget)
    lines = _header(fp, budget, plan_name, fingerprint_path(Path(plan_name)).name)
    for section, items in values.items():
        if not items:
            continue
        lines.append(f"{section}:")
        for key, value in items.items():
            text = f"  {key}: {_scalar(value)}"
            lines.append(f"{text:<{COMMENT_COLUMN - 1}} # {reasons[f'{section}.{key}']}")
    return "\n".join(lines) + "\n"


def write_plan(fp: Fingerprint, budget: Budget, out: Path) -> tuple[Path, Path]:
    """Write the plan YAML to ``out`` and the fingerprint JSON beside it; returns both paths."""
    fingerprint_file = fingerprint_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fingerprint_file.write_text(json.dumps(fp.to_dict(), indent=2) + "\n")
    out.write_text(render_plan(fp, budget, out.name))
    return out, fingerprint_file


def main(argv: list[str] | None = None) -> int:
    """CLI entry: 0 when the plan is written, 2 after a one-line error on stderr."""
    args = _parser().parse_args(argv)
    started = time.perf_counter()
    try:
        tflops = args.tflops
        if tflops is None and args.minutes and not args.gpu_memory_gb:  # minutes of this CPU: time it
            tflops = round(measure_cpu_tflops(), 4)
        budget = Budget(args.steps, args.minutes, args.gpu_memory_gb, tflops)
        if args.sample_tiles < 1:
            raise PlanError(f"--sample-tiles={args.sample_tiles}: expected a positive number")
        fp = read_fingerprint(args.data, args.sample_tiles, args.seed)
        plan, fingerprint_file = write_plan(fp, budget, args.out)
        load_config([plan])  # what train will do with it: a plan that does not load is a bug, said here
    except (PlanError, FingerprintError, ConfigError, DataError, OSError) as err:
        print(f"plan: error: {err}", file=sys.stderr)
        return 2
    values, _ = plan_config(fp, budget)
    seconds = time.perf_counter() - started
    tile = values["data"]["tile_size"]
    if "tile_depth" in values["data"]:
        tile = f"{values['data']['tile_depth']}x{tile}x{tile} (z_pools {values['model']['z_pools']})"
    print(
        f"Planned {fp.dataset} ({fp.sampled_tiles} {'volumes' if isinstance(fp, VolumeFingerprint) else 'tiles'} "
        f"fingerprinted, {seconds:.1f} s in all): "
        f"tile {tile}, depth {values['model']['depth']}, batch "
        f"{values['train']['global_batch_size']}, {values['train']['max_steps']} steps -> {plan} "
        f"(fingerprint: {fingerprint_file})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
