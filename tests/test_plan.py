"""The planner: fingerprints of real prepared data, the rules on hand-made fingerprints, the CLI.

The plan must be a pure function of the fingerprint and the budget, the fingerprint a
deterministic function of the data, and the written YAML a config ``unetdist.train`` loads.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml

from unetdist.config import DataConfig, load_config
from unetdist.data.fingerprint import (
    ChannelIntensity,
    Fingerprint,
    FingerprintError,
    IntensityStats,
    fingerprint_data,
    fingerprint_path,
    stored_mask_kind,
)
from unetdist.data.prepare import prepare_dataset
from unetdist.data.synthetic import synthetic_cells
from unetdist.flops import training_flops_per_sample
from unetdist.model import build_unet
from unetdist.plan import main, read_fingerprint, render_plan
from unetdist.planning import Budget, Net, PlanError, costs, plan_config, rules

IMAGE_PX, TILE_PX, IMAGES = 96, 48, 8
SCHEDULE_KEYS = {"train.max_steps", "optim.warmup_steps", "train.val_every", "train.log_every",
                 "checkpoint.every", "tracking.image_every"}  # fmt: skip


# ---------------------------------------------------------------- data


def _raw(folder: Path, hot_pixels: bool = False) -> tuple[Path, Path, list[np.ndarray]]:
    """Synthetic cells as TIFFs; ``hot_pixels``: uint16 images with a few saturated pixels."""
    images, masks = folder / "images", folder / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    rng = np.random.default_rng(3)
    labels = []
    for index in range(IMAGES):
        image, instances = synthetic_cells(IMAGE_PX, rng)
        if hot_pixels:
            image = image.astype(np.uint16) * 8
            image[rng.integers(0, IMAGE_PX, 3), rng.integers(0, IMAGE_PX, 3)] = 65535
        tifffile.imwrite(images / f"cells_{index}.tif", image)
        tifffile.imwrite(masks / f"cells_{index}.tif", instances)
        labels.append(instances)
    return images, masks, labels


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One raw set, prepared as tar shards, pre-tiled Zarr and whole-image Zarr."""
    folder = tmp_path_factory.mktemp("plan-data")
    images, masks, labels = _raw(folder / "raw")
    roots = {}
    layouts = {"webdataset": {}, "zarr": {"output_format": "zarr"},
               "whole": {"output_format": "zarr", "whole_images": True}}  # fmt: skip
    for name, options in layouts.items():
        roots[name] = folder / name
        prepare_dataset(images, masks, roots[name], tile_size=TILE_PX, val_fraction=0.25, weight_map=False,
                        **options)  # fmt: skip
    return {"roots": roots, "labels": labels, "folder": folder}


def _fingerprint(root: Path) -> Fingerprint:
    meta = json.loads((root / "dataset.json").read_text())
    return fingerprint_data(DataConfig(root=str(root), format=meta["format"], tile_size=TILE_PX), 1)


def test_the_fingerprint_is_deterministic_and_survives_its_json(prepared):
    first, second = (_fingerprint(prepared["roots"]["webdataset"]) for _ in range(2))
    assert first == second
    text = json.dumps(first.to_dict(), indent=2)
    assert Fingerprint.from_dict(json.loads(text)) == first
    # the plan from the file is the plan from the data
    from_file = Fingerprint.from_dict(json.loads(text))
    assert render_plan(from_file, Budget(steps=100)) == render_plan(first, Budget(steps=100))


@pytest.mark.parametrize("layout", ["webdataset", "zarr", "whole"])
def test_the_fingerprint_recovers_image_sizes_and_objects_from_every_layout(prepared, layout):
    fp = _fingerprint(prepared["roots"][layout])
    train_images = IMAGES - 2  # val_fraction 0.25 of 8
    assert fp.num_train_images == train_images
    assert fp.median_image_hw == (IMAGE_PX, IMAGE_PX) and fp.smallest_image_edge_px == IMAGE_PX
    assert fp.train_pixels == train_images * IMAGE_PX**2
    assert fp.image_sizes_from == ("whole images" if layout == "whole" else "tile keys")
    assert fp.max_tile_px == (IMAGE_PX if layout == "whole" else TILE_PX)
    assert fp.mask_kind == "instances" and fp.objects_from == "instance ids"
    assert fp.channels == 1 and fp.image_dtype == "uint8" and fp.num_classes == 2
    # the synthetic cells touch by design; their size, measured on the whole label images
    areas = np.concatenate([np.bincount(labels.ravel())[1:] for labels in prepared["labels"]])
    truth = 2 * math.sqrt(np.median(areas[areas > 0]) / math.pi)
    assert 0.6 * truth < fp.median_object_diameter_px < 1.3 * truth
    assert fp.touching_fraction > 0.5
    assert sum(fp.class_frequencies.values()) == pytest.approx(1.0, abs=1e-5)
    fg, bg = fp.intensity[0].foreground, fp.intensity[0].background
    assert fg.mean > bg.mean and fg.p1 <= fg.p50 <= fg.p99_8 <= fg.max


def test_masks_stored_as_0_1_give_connected_components_and_no_touching_figure(prepared, tmp_path):
    assert stored_mask_kind({"mask_kind": "instances"}, "classes") == "instances"
    assert stored_mask_kind({"source": {"mask_kind": "instances"}}, "classes") == "binary"  # 0/1, as once
    assert stored_mask_kind({"source": {"mask_kind": "classes"}}, "instances") == "classes"
    assert stored_mask_kind(None, "instances") == "instances"
    old = tmp_path / "old"
    old.mkdir()
    source = prepared["roots"]["webdataset"]
    for path in source.iterdir():
        (old / path.name).write_bytes(path.read_bytes())
    meta = json.loads((old / "dataset.json").read_text())
    del meta["mask_kind"]
    (old / "dataset.json").write_text(json.dumps(meta))
    fp = _fingerprint(old)
    assert fp.mask_kind == "binary" and fp.touching_fraction is None
    assert fp.objects_from.startswith("connected components")
    assert fp.median_object_diameter_px > 0 and fp.num_objects > 0
    values, _ = plan_config(fp, Budget(steps=100))
    assert values["loss"]["target"] == "semantic" and values["model"]["num_classes"] == 2


def test_a_config_naming_the_data_gives_the_prepared_folder_s_fingerprint(prepared, tmp_path):
    root = prepared["roots"]["webdataset"]
    spec = tmp_path / "data.yaml"
    spec.write_text(yaml.safe_dump({"data": {"root": str(root), "tile_size": TILE_PX}}))
    assert read_fingerprint(str(spec)) == read_fingerprint(str(root))


def test_hot_pixels_in_the_data_make_the_plan_clip_percentiles(tmp_path):
    images, masks, _ = _raw(tmp_path / "raw", hot_pixels=True)
    prepare_dataset(images, masks, tmp_path / "hot", tile_size=TILE_PX, val_fraction=0.25, weight_map=False)
    fp = _fingerprint(tmp_path / "hot")
    assert fp.image_dtype == "uint16" and fp.intensity[0].all.max == 65535
    values, reasons = plan_config(fp, Budget(steps=100))
    assert values["data"]["normalize"] == "percentile", reasons["data.normalize"]


# ---------------------------------------------------------------- the network by arithmetic


@pytest.mark.parametrize(
    ("width", "depth", "tile", "channels", "classes"), [(8, 2, 32, 1, 2), (16, 3, 64, 3, 3)]
)
def test_flops_and_parameters_by_arithmetic_equal_the_model_s(width, depth, tile, channels, classes):
    model = build_unet("padded", channels, classes, width, depth, norm="instance")
    assert costs.training_flops(tile, depth, channels, classes, width) == training_flops_per_sample(
        model, (channels, tile, tile)
    )
    parameters = sum(p.numel() for p in model.parameters())
    assert costs.parameter_count(depth, channels, classes, width) == parameters


def test_activation_elements_track_what_autograd_keeps():
    width, depth, tile = 8, 3, 64
    model = build_unet("padded", 1, 3, width, depth).train()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(torch.randn(2, 1, tile, tile))
    estimate = 2 * 4 * costs.activation_elements(tile, depth, 1, 3, width)
    assert 0.9 < sum(kept.values()) / estimate <= 1.0


def test_the_memory_model_reproduces_its_calibration_rows():
    net = Net(256, 4, 1, 2)
    for precision, measured_mib in (("fp32", 5925), ("bf16", 3144)):
        assert net.memory_bytes(32, precision) / 2**20 == pytest.approx(measured_mib, rel=0.01)


# ---------------------------------------------------------------- rules on hand-made fingerprints


def _stats(low: float, high: float, p1: float, p99_8: float) -> IntensityStats:
    middle = (p1 + p99_8) / 2
    return IntensityStats(10_000, middle, (p99_8 - p1) / 4, low, high, p1, p1, middle, p99_8, p99_8)


def _hand_made(**changes) -> Fingerprint:
    body = _stats(0, 250, 10, 240)
    base = Fingerprint(
        data={"format": "webdataset", "root": "data/cells"}, dataset="data/cells", mask_kind="instances",
        objects_from="instance ids", channels=1, image_dtype="uint8", num_classes=2, num_train_images=200,
        num_train_samples=3200, median_image_hw=(1024, 1024), smallest_image_edge_px=1024,
        image_sizes_from="tile keys",
        max_tile_px=512, train_pixels=200 * 1024 * 1024, sampled_tiles=256, seed=0,
        intensity=(ChannelIntensity(body, body, body),), num_objects=500, median_object_diameter_px=12.0,
        median_object_area_px=113.0, touching_fraction=0.3, objects_cut_fraction=0.2,
        class_frequencies={"0": 0.7, "1": 0.3},
    )  # fmt: skip
    return dataclasses.replace(base, **changes)


def _plan(fp: Fingerprint, budget: Budget) -> dict:
    values, _ = plan_config(fp, budget)
    return values


def test_larger_objects_get_a_larger_tile_and_a_deeper_net():
    small, large = (_plan(_hand_made(median_object_diameter_px=d), Budget(steps=1000)) for d in (8.0, 60.0))
    assert large["data"]["tile_size"] >= 4 * 60 > small["data"]["tile_size"] == rules.CPU_MIN_TILE_PX
    assert large["model"]["depth"] >= small["model"]["depth"]

    for values in (small, large):
        tile, depth = values["data"]["tile_size"], values["model"]["depth"]
        assert tile % 2**depth == 0 and tile // 2**depth >= 8 and (depth == 4 or tile // 2 ** (depth + 1) < 8)


def test_the_tile_stops_at_the_stored_tiles_and_the_median_image():
    gpu = Budget(steps=1000, gpu_memory_gb=80)
    assert _plan(_hand_made(max_tile_px=200), gpu)["data"]["tile_size"] == 192  # 200 is not divisible by 2**4
    assert _plan(_hand_made(median_image_hw=(300, 400)), gpu)["data"]["tile_size"] == 288


def test_small_data_caps_the_batch_at_5_percent_of_its_pixels():
    gpu = Budget(steps=1000, gpu_memory_gb=80)
    for images in (30, 60):
        values = _plan(_hand_made(num_train_images=images, train_pixels=images * 1024**2), gpu)
        tile = values["data"]["tile_size"]
        cap = math.floor(rules.MAX_BATCH_PIXEL_SHARE * images * 1024**2 / tile**2)
        assert values["train"]["global_batch_size"] == max(2, cap - cap % 8 if cap >= 16 else cap)
    tiny = _plan(_hand_made(train_pixels=4 * 512**2), gpu)
    assert tiny["train"]["global_batch_size"] == 2  # the 5% rule allows none: the smallest batch


def test_more_gpu_memory_gives_a_larger_batch():
    fp = _hand_made(train_pixels=10_000 * 1024**2)  # a large data set: memory, not the 5% rule, decides
    cpu, gpu16, gpu80 = (_plan(fp, Budget(steps=1000, gpu_memory_gb=gb)) for gb in (None, 16, 80))
    assert cpu["data"]["tile_size"] < gpu16["data"]["tile_size"] == gpu80["data"]["tile_size"] == 512
    assert 2 <= gpu16["train"]["global_batch_size"] < gpu80["train"]["global_batch_size"]
    net = Net(512, 4, 1, 3)
    assert net.memory_bytes(gpu80["train"]["global_batch_size"], "bf16") <= 0.85 * 80 * 2**30
    assert gpu80["train"]["precision"] == "bf16" and cpu["train"]["precision"] == "fp32"
    assert gpu80["model"]["norm"] == "batch" and cpu["model"]["norm"] == "instance"


def test_heavy_tails_choose_percentile_normalisation():
    light = _plan(_hand_made(), Budget(steps=1000))
    hot = _stats(0, 65535, 100, 2000)  # hot pixels: the max is far beyond the body
    heavy_fp = _hand_made(image_dtype="uint16", intensity=(ChannelIntensity(hot, hot, hot),))
    heavy = _plan(heavy_fp, Budget(steps=1000))
    assert light["data"]["normalize"] == "zscore" and heavy["data"]["normalize"] == "percentile"


def test_instance_masks_train_the_boundary_target_and_class_masks_their_classes():
    instances = _plan(_hand_made(median_object_diameter_px=30.0), Budget(steps=1000))
    assert instances["loss"]["target"] == "boundary" and instances["model"]["num_classes"] == 3
    assert instances["loss"]["boundary_width_px"] == 3 and instances["data"]["mask_kind"] == "instances"
    class_fp = _hand_made(mask_kind="classes", num_classes=4, touching_fraction=None)
    classes = _plan(class_fp, Budget(steps=1000))
    assert classes["loss"]["target"] == "semantic" and classes["model"]["num_classes"] == 4
    assert classes["data"]["foreground_fraction"] == pytest.approx(0.33)


def test_the_plan_is_pure_and_a_different_budget_changes_the_schedule_only():
    fp = _hand_made()
    assert render_plan(fp, Budget(steps=1000)) == render_plan(_hand_made(), Budget(steps=1000))
    budgets = (Budget(steps=1000), Budget(minutes=30), Budget(minutes=60))

    def flat(values: dict) -> dict:
        return {f"{section}.{key}": value for section, items in values.items()
                for key, value in items.items()}  # fmt: skip

    steps, minutes, longer = (flat(plan_config(fp, budget)[0]) for budget in budgets)
    assert {key for key in steps if steps[key] != minutes[key]} <= SCHEDULE_KEYS
    assert steps.keys() == minutes.keys()
    assert steps["train.max_steps"] == 1000
    assert longer["train.max_steps"] == pytest.approx(2 * minutes["train.max_steps"], abs=1)
    net = Net(steps["data.tile_size"], steps["model.depth"], 1, 3, steps["model.base_width"])
    step_s = net.step_s(steps["train.global_batch_size"], Budget(minutes=30))
    assert minutes["train.max_steps"] == math.floor(30 * 60 * (1 - rules.EVALUATION_SHARE) / step_s)


def test_a_short_cpu_budget_plans_many_small_steps_of_a_narrow_net():
    """4 minutes on a CPU: width 16, the object-sized tile, a step of about 1/500 of the time."""
    values = _plan(_hand_made(median_object_diameter_px=18.0), Budget(minutes=4, tflops=0.067))
    assert values["model"]["base_width"] == rules.CPU_BASE_WIDTH
    assert values["data"]["tile_size"] == rules.CPU_MIN_TILE_PX
    assert 0.8 * rules.CPU_TARGET_STEPS <= values["train"]["max_steps"] <= 1.5 * rules.CPU_TARGET_STEPS
    gpu = _plan(_hand_made(median_object_diameter_px=18.0), Budget(minutes=4, gpu_memory_gb=80))
    assert gpu["model"]["base_width"] == 32  # nnU-Net's width where compute is plentiful


def test_bad_budgets_are_named():
    with pytest.raises(PlanError, match="--gpu-memory-gb=-1"):
        Budget(gpu_memory_gb=-1)
    with pytest.raises(PlanError, match="not both"):
        Budget(steps=10, minutes=1)


# ---------------------------------------------------------------- the written plan and the CLI


def test_the_cli_writes_a_plan_train_loads_and_the_same_bytes_again(prepared, tmp_path, capsys):
    root = prepared["roots"]["webdataset"]
    out = tmp_path / "plan.yaml"
    speed = ["--minutes", "5", "--tflops", "0.016"]  # without --tflops, --minutes times this CPU first
    assert main([str(root), "--out", str(out), *speed]) == 0
    assert "Planned" in capsys.readouterr().out
    text = out.read_text()
    fingerprint = json.loads(fingerprint_path(out).read_text())
    assert fingerprint_path(out).name == "plan.fingerprint.json"
    assert fingerprint["num_train_images"] == IMAGES - 2
    config = load_config([out])
    values, reasons = plan_config(Fingerprint.from_dict(fingerprint), Budget(minutes=5, tflops=0.016))
    for section, items in values.items():
        for key, value in items.items():
            assert getattr(getattr(config, section), key) == value, f"{section}.{key}"
            assert f"# {reasons[f'{section}.{key}']}" in text  # every value says why
    assert config.data.root == str(root) and config.loss.target == "boundary"
    assert config.model.num_classes == 3 and config.data.mask_kind == "instances"
    assert "median diameter" in text and "channel 0" in text  # the fingerprint, summarised in the header
    again = tmp_path / "again" / "plan.yaml"
    assert main([str(root), "--out", str(again), *speed]) == 0
    assert again.read_text() == text
    replanned = tmp_path / "from-json" / "plan.yaml"  # from the fingerprint alone: no data read
    assert main([str(fingerprint_path(out)), "--out", str(replanned), *speed]) == 0
    assert replanned.read_text() == text


@pytest.mark.parametrize("kind", ["missing", "no dataset.json"])
def test_bad_data_is_one_line_naming_it(tmp_path, capsys, kind):
    data = tmp_path / "nowhere"
    if kind == "no dataset.json":
        data.mkdir()
    assert main([str(data), "--out", str(tmp_path / "plan.yaml")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(data) in err and err.startswith("plan: error:")
    assert not (tmp_path / "plan.yaml").exists()


def test_a_fingerprint_error_names_the_sample(prepared, tmp_path):
    with pytest.raises(FingerprintError, match=r"expected \[3, H, W\]"):
        fingerprint_data(DataConfig(root=str(prepared["roots"]["webdataset"]), tile_size=TILE_PX), 3)


def test_ome_zarr_images_named_by_a_config_are_planned_through_the_loader_s_source(tmp_path):
    from test_sources_ome_zarr import cells, write_ngff

    images = [write_ngff(tmp_path / f"img{i}.ome.zarr", *cells(IMAGE_PX, i), "0.4", "cyx") for i in range(4)]
    spec = tmp_path / "data.yaml"
    spec.write_text(yaml.safe_dump({
        "data": {"format": "ome-zarr", "images": images, "labels": "cells", "mask_kind": "instances",
                 "tile_size": TILE_PX, "val_fraction": 0.25},
        "model": {"in_channels": 2},
    }))  # fmt: skip
    out = tmp_path / "plan.yaml"
    assert main([str(spec), "--out", str(out), "--steps", "50"]) == 0
    fp = Fingerprint.from_dict(json.loads(fingerprint_path(out).read_text()))
    assert fp.image_sizes_from == "whole images" and fp.num_train_images == 3
    assert fp.channels == 2 and fp.image_dtype == "uint16" and len(fp.intensity) == 2
    assert fp.mask_kind == "instances" and fp.touching_fraction is not None  # ids past uint16's range survive
    assert fp.intensity[1].foreground.mean == pytest.approx(2 * fp.intensity[0].foreground.mean, rel=1e-4)
    config = load_config([out])
    assert config.data.images == images and config.data.labels == "cells" and config.data.val_fraction == 0.25
    assert config.model.in_channels == 2 and config.loss.target == "boundary"


def test_train_runs_the_plan_as_written(prepared, tmp_path):
    """The plan's keys together in a real run (only its length and width cut, and percentile clipping on)."""
    import subprocess
    import sys

    out = tmp_path / "plan.yaml"
    assert main([str(prepared["roots"]["webdataset"]), "--out", str(out), "--steps", "2"]) == 0
    faster = ["model.base_width=8", "tracking.enabled=false", "train.progress=false",
              "data.normalize=percentile", f"train.output_dir={tmp_path / 'run'}"]  # fmt: skip
    run = subprocess.run([sys.executable, "-m", "unetdist.train", "--config", str(out), *faster],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "step 2 val loss" in run.stderr


def test_the_summary_is_flat_scalars_for_a_run_tracker():
    summary = _hand_made().summary()
    assert all(value is None or isinstance(value, (str, int, float)) for value in summary.values())
    assert summary["median_object_diameter_px"] == 12.0 and summary["median_image_hw"] == "1024x1024"
    assert summary["ch0_max"] == 250 and summary["foreground_share"] == pytest.approx(0.3)


def test_one_whole_image_caps_the_tile_at_its_held_out_region(prepared, tmp_path):
    """One image: prepare holds out its last rows; validation cuts tiles there too, so the plan's
    tile must fit the held-out region, not only the (larger) training region."""
    folder = prepared["folder"] / "raw"
    one = tmp_path / "one"
    for kind in ("images", "masks"):
        (one / kind).mkdir(parents=True)
        (one / kind / "cells_0.tif").symlink_to(folder / kind / "cells_0.tif")
    meta = prepare_dataset(one / "images", one / "masks", tmp_path / "data", tile_size=TILE_PX // 2,
                           output_format="zarr", whole_images=True, weight_map=False)  # fmt: skip
    (y0, y1, x0, x1), = meta["val_regions"].values()
    (ty0, ty1, tx0, tx1), = meta["train_regions"].values()
    assert min(y1 - y0, x1 - x0) < min(ty1 - ty0, tx1 - tx0)
    assert _fingerprint(tmp_path / "data").max_tile_px == min(y1 - y0, x1 - x0)
