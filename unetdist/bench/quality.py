"""``python -m unetdist.bench quality``: the newcomer path end to end, and how good its instances are.

    python -m unetdist.bench quality --images raw/images --masks raw/masks --steps 300
    python -m unetdist.bench quality --synthetic 8 --image-size 192 --steps 60 --variants defaults,boundary

Holds out test images (``--test-fraction`` of them, seeded, or ``--test-stems``), then for each
variant runs the real commands: ``prepare`` (whole images in a Zarr store) -> ``plan`` ->
``train`` -> ``predict --instances`` on the test images -> ``evaluate``. Variants:

- ``defaults``: today's fixed defaults (no plan; the tile: ``--prepare-tile``), the same steps;
- ``semantic``: the plan, with the two-class target (distance-transform watershed decoding);
- ``boundary``: the plan, with the three-class boundary target (seeded watershed decoding);
- ``plan``: the plan as written (its own choice of target);
- ``no-elastic`` / ``elastic``: the plan with elastic deformation forced off / on.

Prints AP@0.5, mean AP@0.5:0.95 and Dice on the test images per variant, with the training and
prediction times; the last line has them as ``VARIANT_ap50=...`` pairs. Every step is a fresh
process, so the figures are those of the commands users run (tracking off: no MLflow start-up).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SMALL_ARGS = ["--synthetic", "6", "--image-size", "128", "--steps", "10", "--variants", "defaults,boundary",
              "--prepare-tile", "32"]
VARIANTS = ("defaults", "semantic", "boundary", "plan", "no-elastic", "elastic")
PLAN_OVERRIDES = {
    "semantic": ["loss.target=semantic", "model.num_classes=2"],
    "boundary": ["loss.target=boundary", "model.num_classes=3"],
    "plan": [],
    "no-elastic": ["data.augment_elastic=false"],
    "elastic": ["data.augment_elastic=true"],
}
QUIET = ["tracking.enabled=false", "train.progress=false"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=Path, help="folder of images (as prepare takes them)")
    parser.add_argument("--masks", type=Path, help="folder of instance masks, matched by stem")
    parser.add_argument("--synthetic", type=int, help="instead: N synthetic images of touching cells")
    parser.add_argument("--image-size", type=int, default=256, help="size of the --synthetic images")
    parser.add_argument("--test-fraction", type=float, default=0.3, help="images held out for the test")
    parser.add_argument("--test-stems", default="", help="comma-separated stems to test on (instead)")
    parser.add_argument("--steps", type=int, default=300, help="training steps of every variant")
    parser.add_argument("--prepare-tile", type=int, default=96, help="prepare's --tile (its validation grid)")
    parser.add_argument("--variants", default="defaults,semantic,boundary", help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--workers", type=int, default=1, help="data.num_workers of every run")
    parser.add_argument("--work", type=Path, help="keep the data, runs and predictions here (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> dict[str, float | int | str]:
    variants = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    work = args.work or Path(tempfile.mkdtemp(prefix="unetdist-quality-"))
    try:
        return _run(args, variants, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, variants: list[str], work: Path) -> dict[str, float | int | str]:
    images, masks = _inputs(args, work)
    dev, test = _split(images, masks, work, args)
    data = work / "data"
    _command("prepare", "--images", dev / "images", "--masks", dev / "masks", "--out", data,
             "--format", "zarr", "--whole-images", "--seed", args.seed, "--tile", args.prepare_tile)
    plan = work / "plan.yaml"
    if any(name != "defaults" for name in variants):
        _command("plan", data, "--out", plan, "--steps", args.steps)
    figures: dict[str, float | int | str] = {
        "train_images": len(list((dev / "images").iterdir())),
        "test_images": len(list((test / "images").iterdir())),
        "steps": args.steps,
    }
    for name in variants:
        run_dir, predictions = work / "runs" / name, work / "predictions" / name
        common = [f"train.output_dir={run_dir}", f"data.num_workers={args.workers}", f"train.seed={args.seed}", *QUIET]
        if name == "defaults":
            config = [f"data.root={data}", "data.format=zarr", f"data.tile_size={args.prepare_tile}",
                      f"train.max_steps={args.steps}", *common]  # the tile: prepare's (96 by default)
        else:
            config = ["--config", plan, *PLAN_OVERRIDES[name], *common]
        start = time.perf_counter()
        _command("train", *config)
        figures[f"{name}_train_s"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        _command("predict", "--model", run_dir, "--input", test / "images", "--output", predictions, "--instances")
        figures[f"{name}_predict_s"] = round(time.perf_counter() - start, 1)
        scores_file = predictions / "evaluation.json"
        _command("evaluate", "--pred", predictions, "--truth", test / "masks", "--json", scores_file)
        overall = json.loads(scores_file.read_text())["overall"]
        figures[f"{name}_ap50"] = round(float(overall["ap"]), 4)
        if "ap_50_95" in overall:
            figures[f"{name}_ap50_95"] = round(float(overall["ap_50_95"]), 4)
        figures[f"{name}_dice"] = round(float(overall["dice"]), 4)
    return figures


def _inputs(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    if args.synthetic:
        from unetdist.data.synthetic import write_synthetic

        return write_synthetic(work / "synthetic", args.synthetic, args.image_size, args.seed)
    if not (args.images and args.masks):
        raise ValueError("give --images and --masks, or --synthetic N")
    for folder in (args.images, args.masks):
        if not folder.is_dir():
            raise ValueError(f"{folder}: not a folder")
    return args.images, args.masks


def _split(images: Path, masks: Path, work: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """Links to the development and the test images (and masks) in two folder pairs."""
    image_files = {path.stem: path for path in sorted(images.iterdir()) if path.is_file()}
    mask_files = {path.stem: path for path in sorted(masks.iterdir()) if path.is_file()}
    stems = sorted(set(image_files) & set(mask_files))
    if args.test_stems:
        test = [stem.strip() for stem in args.test_stems.split(",") if stem.strip()]
        missing = sorted(set(test) - set(stems))
        if missing:
            raise ValueError(f"--test-stems {missing}: no such image and mask pair in {images} / {masks}")
    else:
        count = max(1, round(args.test_fraction * len(stems)))
        order = np.random.default_rng(args.seed).permutation(len(stems))
        test = sorted(stems[i] for i in order[:count])
    if len(test) >= len(stems):
        raise ValueError(f"{len(stems)} image and mask pairs leave none to train on after the test split")
    parts = {"dev": [s for s in stems if s not in test], "test": test}
    for part, chosen in parts.items():
        for kind, files in (("images", image_files), ("masks", mask_files)):
            folder = work / part / kind
            folder.mkdir(parents=True, exist_ok=True)
            for stem in chosen:
                (folder / files[stem].name).symlink_to(files[stem].resolve())
    return work / "dev", work / "test"


def _command(module: str, *arguments: object) -> None:
    """Run ``python -m unetdist.MODULE ARGS``; a failure raises with its last output lines."""
    command = [sys.executable, "-m", f"unetdist.{module}", *map(str, arguments)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{tail}")
