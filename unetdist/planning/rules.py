"""The planner's rules: a data fingerprint and a budget -> config values, each with its reason.

nnU-Net's lesson is that a few fixed rules over the data's fingerprint beat hand-tuned
defaults. These are those rules for unetdist's 2-D padded U-Net, in order:

1. tile and network (nnU-Net): the largest tile whose batch of 2 fits the budget, up to the
   stored tiles and the median image; then at least ``OBJECT_DIAMETERS_PER_TILE`` median
   object diameters; pool while the bottom edge stays >= 8 px, features 32 * 2**level up to
   512 (``model.base_width`` 32, depth <= 4); the tile divisible by 2**depth.
2. batch: what the GPU memory holds (``--gpu-memory-gb``) or a CPU step of
   ``CPU_STEP_BUDGET_S`` computes, at most 5% of the training pixels per batch, at least 2.
3. normalisation: per-image z-score, or percentile clipping first when a channel's tails are
   heavy (``HEAVY_TAIL_RATIO``); foreground oversampling 1/3 (nnU-Net's); augmentations.
4. instance masks: the background / interior / boundary target, its rim from the median
   diameter; other masks: their classes.
5. schedule: steps from the budget (``--minutes``: the step-time estimate of
   :mod:`unetdist.planning.costs`), AdamW with warmup and cosine decay, 5 validations.

Volumes (a :class:`~unetdist.data.fingerprint_volumes.VolumeFingerprint`): rule 1 is
:mod:`unetdist.planning.volumes`' (nnU-Net's 3-D tile, pooling per axis, 3-D or slice-wise);
rules 2-5 are these, over voxels. 2-D fingerprints take exactly the 2-D path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

from unetdist.data.fingerprint import Fingerprint
from unetdist.data.fingerprint_volumes import VolumeFingerprint
from unetdist.instance_targets import boundary_width_px
from unetdist.planning.costs import (
    BASE_WIDTH,
    MAX_DEPTH,
    MAX_FEATURES,
    MIN_BOTTOM_EDGE_PX,
    MIN_TILE_PX,
    STEP_OVERHEAD_S,
    Budget,
    Net,
    PlanError,
    is_plannable_tile,
    network_depth,
    rate,
)
from unetdist.planning.volumes import volume_tile

PRESET = "padded"
OBJECT_DIAMETERS_PER_TILE = 4  # a tile holds an object with its neighbours, not just part of one
MIN_BATCH = 2  # nnU-Net's smallest batch
MAX_BATCH_PIXEL_SHARE = 0.05  # nnU-Net: one batch covers at most 5% of the data set
CPU_STEP_BUDGET_S = 2.0  # CPU: a step of the plan's batch takes at most about this long
# CPU and a time budget: a short run is worth many small steps more than a few large ones. On
# BBBC007 nuclei (9 training images, 4 test images, 4 minutes on the 2-core CPU), width 16 at tile
# 128 and batch 8 (480 steps) reached AP@0.5 0.935, nnU-Net's width 32 at tile 224 and batch 2
# (119 steps) 0.859. So on a CPU: width 16, the tile from the objects (at least CPU_MIN_TILE_PX),
# and steps of about a CPU_TARGET_STEPS-th of the time (within 0.25..CPU_STEP_BUDGET_S s).
CPU_BASE_WIDTH = 16
CPU_MIN_TILE_PX = 128
CPU_TARGET_STEPS = 500
CPU_MIN_STEP_S = 0.25
BATCHNORM_MIN_BATCH = 16  # smaller batches: instance norm (batch statistics of a few tiles are noise)
FOREGROUND_FRACTION = 0.33  # nnU-Net's: a third of the crops centred on foreground
# Tails: the stretch from p99.8 to the max (or p1 to the min) against the body p1..p99.8. Over 1,
# a few pixels (hot pixels, debris) outspan the image: they set its z-score's std, so clip first.
HEAVY_TAIL_RATIO = 1.0
# Elastic deformation: off, as nnU-Net has it (the U-Net paper had it on). Measured on BBBC007
# nuclei (9 training images, 4 test images, width 16, tile 128, 480 steps): off AP@0.5 0.939 and
# AP@0.5:0.95 0.802, on (the paper's strain) 0.935 and 0.747: the warped outlines cost the strict
# IoUs, and the warp costs the loader time.
ELASTIC = False
ISOTROPIC_RATIO = 1.2  # volumes: spacing within this factor on all axes turns freely in 3-D
NOISE_OF_SPREAD = 0.05  # Gaussian noise std: this share of the p1..p99.8 spread, in unit range
LEARNING_RATE, WEIGHT_DECAY, GRAD_CLIP_NORM = 1e-3, 1e-4, 1.0  # AdamW, as configs/padded.yaml
MAX_WARMUP_STEPS, WARMUP_SHARE = 500, 0.05
VALIDATIONS = 5
DEFAULT_EPOCHS, MIN_DEFAULT_STEPS, MAX_DEFAULT_STEPS = 100, 1000, 50_000  # no --steps / --minutes
EVALUATION_SHARE = 0.1  # of --minutes, kept for validation and checkpoints
SECTIONS = ("data", "model", "loss", "optim", "train", "checkpoint", "tracking")

Choice = tuple[str, Any, str]  # ("section.key", value, why)


def _gib(value: float) -> str:
    return f"{value / 2**30:.1f} GiB"


def _count(value: float) -> str:
    """3 significant digits, without an exponent: 0.5, 20.6, 7281, 72,817."""
    return f"{value:.3g}" if value < 1000 else f"{value:,.0f}"


def _tile(fp: Fingerprint, budget: Budget, num_classes: int) -> tuple[Net, str]:
    """The largest plannable tile up to the data's cap whose batch of MIN_BATCH fits the budget;
    then, if the objects need more, the smallest tile that holds them (on a GPU only where it
    still fits: memory is a hard limit, CPU time is not)."""
    median_edge = min(fp.median_image_hw)
    cap = min(fp.max_tile_px, median_edge)
    candidates = [t for t in range(cap, MIN_TILE_PX - 1, -1) if is_plannable_tile(t)]  # largest first
    if not candidates:
        raise PlanError(f"the data gives tiles of at most {cap} px; a U-Net needs at least {MIN_TILE_PX}")

    width = BASE_WIDTH if budget.device == "gpu" else CPU_BASE_WIDTH
    fits_net, cost_net = _budget_check(budget)

    def net(tile: int) -> Net:
        return Net(tile, network_depth(tile), fp.channels, num_classes, width)

    def fits(tile: int) -> bool:
        return fits_net(net(tile))

    def cost(tile: int) -> str:
        return cost_net(net(tile))

    if fp.max_tile_px <= median_edge:
        limit = f"the stored tiles' {fp.max_tile_px} px"
    else:
        limit = f"the median image's shorter edge, {median_edge} px"
    tile = next((t for t in candidates if fits(t)), candidates[-1])
    if budget.device == "cpu":  # many small steps: the tile from the objects, not the largest that fits
        small = [t for t in candidates if t >= CPU_MIN_TILE_PX and fits(t)]
        if small and small[-1] < tile:
            tile = small[-1]
            limit = f"at least {CPU_MIN_TILE_PX} px on a CPU (a short run learns more from many small steps)"
            return _objects_tile(fp, budget, net, candidates, tile, f"{limit}: {cost(tile)}", limit, fits, cost)
    if tile == cap:
        why = f"{limit} (the cap), which fits the budget: {cost(tile)}"
    elif fits(tile):
        why = f"the largest under {limit} that fits the budget: {cost(tile)}"
    else:
        why = f"the smallest plannable tile, over the budget: {cost(tile)}"
    return _objects_tile(fp, budget, net, candidates, tile, why, limit, fits, cost)


def _budget_check(budget: Budget) -> tuple[Callable[[Net], bool], Callable[[Net], str]]:
    """Whether a batch of MIN_BATCH tiles of a net fits the budget (GPU memory, or the CPU step
    time), and that cost in words."""

    def fits(net: Net) -> bool:
        if budget.device == "gpu":
            return net.memory_bytes(MIN_BATCH, budget.precision) <= budget.usable_memory_bytes
        return net.step_s(MIN_BATCH, budget) <= cpu_step_s(budget)

    def cost(net: Net) -> str:
        if budget.device == "gpu":
            used = net.memory_bytes(MIN_BATCH, budget.precision)
            return f"{MIN_BATCH} tiles ~{_gib(used)} of {_gib(budget.usable_memory_bytes)}"
        step_s = net.step_s(MIN_BATCH, budget)
        return f"a step of {MIN_BATCH} tiles ~{step_s:.2g} s of {cpu_step_s(budget):.2g} s"

    return fits, cost


def _objects_tile(fp, budget, net, candidates, tile, why, limit, fits, cost) -> tuple[Net, str]:
    """``tile``, or a larger one where the objects need it (see :func:`_tile`)."""
    cap = candidates[0]
    diameter = fp.median_object_diameter_px
    if diameter:
        wanted = math.ceil(OBJECT_DIAMETERS_PER_TILE * diameter)
        objects = f"{OBJECT_DIAMETERS_PER_TILE} median object diameters ({wanted} px)"
        larger = [t for t in candidates if t >= wanted and (budget.device == "cpu" or fits(t))]
        if tile >= wanted:
            why += f"; it holds {objects}"
        elif larger:
            tile = larger[-1]
            why = f"the smallest tile that holds {objects}, over the CPU budget: {cost(tile)}; cap {limit}"
        elif cap < wanted:
            tile = candidates[0]
            why = f"{limit} (the cap), less than {objects}: prepare with a larger --tile or --whole-images"
        else:
            why += f"; less than {objects}: a GPU with more memory would fit a tile that holds them"
    return net(tile), why


def _pixels(net: Net) -> str:
    return "voxels" if net.tile_depth else "pixels"


def _batch(fp: Fingerprint, budget: Budget, net: Net) -> tuple[int, str]:
    share_cap = math.floor(MAX_BATCH_PIXEL_SHARE * fp.train_pixels / net.tile_elements)
    if budget.device == "gpu":
        fixed = net.memory_bytes(0, budget.precision)
        per_sample = net.memory_bytes(1, budget.precision) - fixed
        fits = math.floor((budget.usable_memory_bytes - fixed) / per_sample)
        why = (f"{fits} fit {_gib(budget.usable_memory_bytes)} of GPU memory at "
               f"~{per_sample / 2**20:.0f} MiB each ({budget.precision})")  # fmt: skip
    else:
        step_s = cpu_step_s(budget)
        fits = math.floor((step_s - STEP_OVERHEAD_S["cpu"]) * budget.flops_per_s / net.flops)
        why = f"a {step_s:.2g} s CPU step computes {fits} tiles of {net.flops / 1e9:.3g} GFLOP"
    why += f"; 5% of the {_count(fp.train_pixels / 1e6)} M training {_pixels(net)} allows {share_cap}"
    batch = min(fits, share_cap)
    if batch >= 16:
        batch -= batch % 8
        why += "; rounded down to a multiple of 8 (it splits over 1, 2, 4 or 8 GPUs)"
    if batch < MIN_BATCH:
        batch = MIN_BATCH
        why += f"; at least {MIN_BATCH}"
    if budget.device == "gpu":
        why += "; per GPU, so more GPUs need less each"
    return batch, why


def cpu_step_s(budget: Budget) -> float:
    """How long a CPU step of the plan's batch may take: with --minutes about a CPU_TARGET_STEPS-th
    of the training time (many small steps), else CPU_STEP_BUDGET_S."""
    if not budget.minutes:
        return CPU_STEP_BUDGET_S
    share = budget.minutes * 60 * (1 - EVALUATION_SHARE) / CPU_TARGET_STEPS
    return min(CPU_STEP_BUDGET_S, max(CPU_MIN_STEP_S, share))


def _steps(fp: Fingerprint, budget: Budget, batch: int, net: Net) -> tuple[int, str]:
    step_s = net.step_s(batch, budget)
    estimate = (f"a step ~{step_s:.3g} s ({batch} x {net.flops / 1e9:.3g} GFLOP at "
                f"{rate(budget.flops_per_s)} + {STEP_OVERHEAD_S[budget.device]} s)")  # fmt: skip
    if budget.steps:
        return budget.steps, f"--steps {budget.steps}; {estimate}: ~{budget.steps * step_s / 60:.3g} min"
    if budget.minutes:
        steps = max(1, math.floor(budget.minutes * 60 * (1 - EVALUATION_SHARE) / step_s))
        return steps, f"--minutes {budget.minutes:g}, {EVALUATION_SHARE:.0%} kept for validation; {estimate}"
    epoch_steps = fp.train_pixels / (batch * net.tile_elements)
    steps = min(MAX_DEFAULT_STEPS, max(MIN_DEFAULT_STEPS, math.ceil(DEFAULT_EPOCHS * epoch_steps)))
    return steps, (f"no --steps or --minutes: {DEFAULT_EPOCHS} passes over the training {_pixels(net)} "
                   f"({_count(epoch_steps)} steps each), within {MIN_DEFAULT_STEPS}..{MAX_DEFAULT_STEPS}; "
                   f"{estimate}")  # fmt: skip


def _heaviest_tail(fp: Fingerprint) -> tuple[float, int]:
    """The largest tail / body ratio over the channels, and its channel."""
    ratios = []
    for channel, stats in enumerate(fp.intensity):
        whole = stats.all
        body = whole.p99_8 - whole.p1
        if body > 0:
            ratios.append((max(whole.max - whole.p99_8, whole.p1 - whole.min) / body, channel))
    return max(ratios, default=(0.0, 0))


def _unit_spread(fp: Fingerprint) -> float:
    """The narrowest channel's p1..p99.8 spread in the unit range the augmentation sees."""
    spreads = []
    for stats in fp.intensity:
        scale = {"uint8": 255.0, "uint16": 65535.0}.get(fp.image_dtype)
        if scale is None:  # float images: per sample min..max -> 0..1
            scale = max(stats.all.max - stats.all.min, 1e-12)
        spreads.append((stats.all.p99_8 - stats.all.p1) / scale)
    return min(spreads)


def _data(fp: Fingerprint, net: Net) -> list[Choice]:
    kinds = {
        "instances": "the masks store instance ids (dataset.json mask_kind)",
        "binary": "the masks store 0/1 (prepared before prepare kept instance ids)",
        "classes": "the masks store class ids",
    }
    choices: list[Choice] = [
        (f"data.{key}", value, "the data fingerprinted" if key in ("root", "format") else "as the data spec")
        for key, value in fp.data.items()
    ]
    choices.append(("data.mask_kind", fp.mask_kind, kinds.get(fp.mask_kind, "as stored")))
    choices.append(("data.tile_size", net.tile_px, ""))  # its reason is the tile rule's
    ratio, channel = _heaviest_tail(fp)
    stats = fp.intensity[channel].all
    tails = (f"channel {channel}: min {stats.min:g}, p1 {stats.p1:g}, p99.8 {stats.p99_8:g}, "
             f"max {stats.max:g}: tail / body {ratio:.2f}")  # fmt: skip
    if ratio > HEAVY_TAIL_RATIO:
        why = f"{tails} > {HEAVY_TAIL_RATIO:g}: heavy tails; clip to p1..p99.8, then z-score"
        choices.append(("data.normalize", "percentile", why))
    else:
        why = f"{tails} <= {HEAVY_TAIL_RATIO:g}: no heavy tails; z-score"
        choices.append(("data.normalize", "zscore", why))
    noise = round(NOISE_OF_SPREAD * _unit_spread(fp), 4)
    choices += [
        ("data.foreground_fraction", FOREGROUND_FRACTION, "nnU-Net's: a third of the crops on foreground"),
        ("data.augment", True, "flips and 90-degree turns: microscopy has no up or left"),
        ("data.augment_intensity", True, "gamma, scale, shift: staining and exposure vary"),
        ("data.augment_noise_std", noise, f"{NOISE_OF_SPREAD:g} x the p1..p99.8 spread in unit range"),
        ("data.augment_elastic", ELASTIC, "off, as nnU-Net: measured better at strict IoU (planning/rules.py)"),
    ]
    return choices


def _model_and_loss(fp: Fingerprint, net: Net, batch: int) -> list[Choice]:
    instances = fp.mask_kind == "instances"
    bottom = net.tile_px // 2**net.depth
    depth_why = f"pool while the bottom edge stays >= {MIN_BOTTOM_EDGE_PX} px ({bottom} px here)"
    if net.depth == MAX_DEPTH:
        depth_why += f", at most {MAX_DEPTH} ({MAX_FEATURES} features)"
    if batch >= BATCHNORM_MIN_BATCH:
        norm, norm_why = "batch", f"batch {batch} >= {BATCHNORM_MIN_BATCH}: batch statistics hold"
    else:
        norm, norm_why = "instance", f"batch {batch} < {BATCHNORM_MIN_BATCH}: batch statistics would be noise"
    choices: list[Choice] = [
        ("model.preset", PRESET, "same-size output, a norm after each conv: nnU-Net's 2-D network"),
        ("model.in_channels", fp.channels, "the images' channels"),
        ("model.num_classes", net.num_classes, "background, interior, rim" if instances else "the classes"),
        ("model.base_width", net.width, f"nnU-Net's {BASE_WIDTH}, doubling per level up to {MAX_FEATURES}"
         if net.width == BASE_WIDTH else f"{net.width} on a CPU: more steps in the time (see planning/rules.py)"),
        ("model.depth", net.depth, depth_why),
        ("model.norm", norm, norm_why),
        ("loss.kind", "dice_ce", "nnU-Net's Dice + cross-entropy: robust to class imbalance"),
    ]
    if not instances:
        return choices + [
            ("loss.target", "semantic", f"the masks' classes ({fp.objects_from} for the object sizes)"),
            ("loss.use_weight_map", "auto", "a stored border weight map if there is one"),
        ]
    diameter = fp.median_object_diameter_px
    width_why = f"a tenth of the median diameter {diameter:.3g} px, 1..4" if diameter else "no objects seen"
    return choices + [
        ("loss.target", "boundary", "instance ids: train the rim so touching objects separate"),
        ("loss.boundary_width_px", boundary_width_px(diameter) if diameter else 2, width_why),
        ("loss.use_weight_map", "false", "the boundary class separates touching objects; weights cost time"),
    ]


def _schedule(fp: Fingerprint, budget: Budget, steps: int) -> list[Choice]:
    warmup = max(1, min(MAX_WARMUP_STEPS, round(WARMUP_SHARE * steps)))
    every = max(1, steps // VALIDATIONS)
    name = PurePosixPath(str(fp.data.get("root") or "data").rstrip("/")).name or "data"
    choices: list[Choice] = [
        ("optim.name", "adamw", "robust across batch sizes with one learning rate"),
        ("optim.lr", LEARNING_RATE, "as configs/padded.yaml"),
        ("optim.weight_decay", WEIGHT_DECAY, "as configs/padded.yaml"),
        ("optim.schedule", "cosine", "decays to zero at max_steps: a run of any length ends annealed"),
        ("optim.warmup_steps", warmup, f"{WARMUP_SHARE:.0%} of the steps, at most {MAX_WARMUP_STEPS}"),
        ("optim.grad_clip_norm", GRAD_CLIP_NORM, "one bad batch cannot throw the weights far"),
        ("train.output_dir", f"runs/{name}", "named after the data set"),
        ("train.max_steps", steps, ""),  # its reason is the step rule's
        ("train.global_batch_size", 0, ""),  # the batch rule's
    ]
    if budget.device == "gpu":
        choices += [("train.precision", "bf16", "bf16 on a GPU (README: 2.6x the tiles/s of fp32)"),
                    ("train.channels_last", True, "the GPU fast path for bf16 convolutions")]  # fmt: skip
    else:
        choices.append(("train.precision", "fp32", "fp32 on a CPU"))
    return choices + [
        ("train.val_every", every, f"{VALIDATIONS} validations in the run"),
        ("train.log_every", max(1, min(50, steps // 100)), "about 100 points per curve"),
        ("checkpoint.every", every, "at each validation"),
        ("tracking.enabled", True, "metrics, config and models to MLflow"),
        ("tracking.run_name", name, "the data set"),
        ("tracking.image_every", every, "overlay panels at each validation"),
    ]


# Volumes: the 3-D keys go beside their 2-D neighbours, and a few 2-D reasons read otherwise.
VOLUME_KEYS_AFTER = {"data.tile_size": "data.tile_depth", "model.preset": "model.spatial_dims",
                     "model.depth": "model.z_pools", "data.augment_elastic": "data.augment_rotate_3d"}  # fmt: skip
VOLUME_REASONS = {
    "model.preset": "same-size output, a norm after each conv: nnU-Net's 3d_fullres network",
    "data.augment": "in-plane flips and quarter turns, and z flips: microscopy has no up or left",
}


def _volume_tile(fp: VolumeFingerprint, budget: Budget, num_classes: int) -> tuple[Net, list[Choice]]:
    width = BASE_WIDTH if budget.device == "gpu" else CPU_BASE_WIDTH  # CPU: more steps in the time, as 2-D
    fits, cost = _budget_check(budget)
    net, choices = volume_tile(fp, num_classes, width, fits, cost)
    return net, choices + [(key, None, why) for key, why in VOLUME_REASONS.items()] + _rotations_3d(fp, net)


def _rotations_3d(fp: VolumeFingerprint, net: Net) -> list[Choice]:
    """Full 3-D rotations where they map the data onto data it could have been: an isotropic voxel
    (a turned tile has the same resolution on every axis) and a cubic tile (it turns onto itself)."""
    ratio, shape = max(fp.spacing) / min(fp.spacing), f"{net.tile_depth}x{net.tile_px}x{net.tile_px}"
    if ratio <= ISOTROPIC_RATIO and net.tile_depth == net.tile_px:
        why = f"spacing within {ratio:.3g}x on all axes (<= {ISOTROPIC_RATIO:g}) and a cubic tile {shape}: no axis is special"
        return [("data.augment_rotate_3d", True, why),
                ("data.augment", None, "any of the cube's 48 symmetries (data.augment_rotate_3d): no up, left or top")]  # fmt: skip
    why = (f"spacing {ratio:.3g}x between axes (isotropic: <= {ISOTROPIC_RATIO:g}): a turn would put a coarse axis in-plane"
           if ratio > ISOTROPIC_RATIO else f"tile {shape}, not a cube: a 3-D turn would not map it onto itself")
    why += "; in-plane turns and z flips"
    return [("data.augment_rotate_3d", False, why)]


def _in_order(choices: list[Choice], volume: list[Choice]) -> list[Choice]:
    """The 2-D choices with the volume's: theirs win, new keys after VOLUME_KEYS_AFTER's."""
    by_key = {dotted: (value, why) for dotted, value, why in volume}
    out: list[Choice] = []
    for dotted, value, why in choices:
        if dotted in by_key:
            new_value, why = by_key[dotted]
            value = value if new_value is None else new_value
        out.append((dotted, value, why))
        if dotted in VOLUME_KEYS_AFTER:
            after = VOLUME_KEYS_AFTER[dotted]
            out.append((after, *by_key[after]))
    return out


def plan_config(fp: Fingerprint, budget: Budget) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Config values {section: {key: value}} for the data ``fp`` describes and the ``budget``, and
    the reason for each ("section.key" -> why). Pure: the same arguments give the same result."""
    num_classes = 3 if fp.mask_kind == "instances" else fp.num_classes
    volume: list[Choice] = []
    if isinstance(fp, VolumeFingerprint):
        net, volume = _volume_tile(fp, budget, num_classes)
        tile_why = next(why for dotted, _, why in volume if dotted == "data.tile_size")
    else:
        net, tile_why = _tile(fp, budget, num_classes)
    batch, batch_why = _batch(fp, budget, net)
    steps, steps_why = _steps(fp, budget, batch, net)
    made_by_rules = {"data.tile_size": (net.tile_px, tile_why), "train.max_steps": (steps, steps_why),
                     "train.global_batch_size": (batch, batch_why)}  # fmt: skip
    values: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    reasons: dict[str, str] = {}
    choices = _data(fp, net) + _model_and_loss(fp, net, batch) + _schedule(fp, budget, steps)
    for dotted, value, why in _in_order(choices, volume) if volume else choices:
        value, why = made_by_rules.get(dotted, (value, why))
        section, key = dotted.split(".")
        values[section][key] = value
        reasons[dotted] = why
    return values, reasons
