"""The planner on volumes (issue 19): the 3-D fingerprint of a whole-volume store, nnU-Net's 3-D
rules on hand-made fingerprints, the 3-D cost arithmetic against the model, and the CLI.

The stores are written with :class:`~unetdist.data.writers.ZarrImageWriter` and a dataset.json
as prepare writes one for whole-volume stores (not through prepare: that is built beside this).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from unetdist.config import load_config
from unetdist.data.fingerprint import ChannelIntensity, IntensityStats, fingerprint_path
from unetdist.data.fingerprint_volumes import VolumeFingerprint, load_fingerprint
from unetdist.data.layout import STORE_NAME, WHOLE_IMAGES
from unetdist.data.writers import ZarrImageWriter
from unetdist.plan import main, read_fingerprint, render_plan
from unetdist.planning import Budget, Net, costs, plan_config, volumes

RADIUS = 6.0  # the objects' radius in spacing units: spheres in physical space
ISOTROPIC, ANISOTROPIC = (1.0, 1.0, 1.0), (4.0, 1.0, 1.0)
GPU = Budget(steps=100, gpu_memory_gb=80)


# ---------------------------------------------------------------- data


def _volume(shape: tuple[int, int, int], spacing: tuple[float, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Spheres of RADIUS (ellipsoids in voxels where the spacing differs) on a slightly jittered
    grid, a voxel and more apart (so they do not touch) and clear of the faces; image [1, Z, Y, X]
    uint8, ids uint16."""
    rng = np.random.default_rng(seed)
    axes = np.ogrid[tuple(slice(0, n) for n in shape)]
    physical = [axis * size for axis, size in zip(axes, spacing, strict=True)]
    labels = np.zeros(shape, np.uint16)
    centres = [np.arange(RADIUS + 2 * size, n * size - RADIUS - 2 * size, 2 * RADIUS + 2 * size)
               for n, size in zip(shape, spacing, strict=True)]  # fmt: skip
    for label, centre in enumerate(np.stack(np.meshgrid(*centres, indexing="ij"), -1).reshape(-1, 3), start=1):
        centre = centre + rng.uniform(-0.4, 0.4, 3)
        inside = sum((p - c) ** 2 for p, c in zip(physical, centre, strict=True)) <= RADIUS**2
        labels[inside] = label
    image = 40 + 120 * (labels > 0) + rng.normal(0, 8, shape)
    return np.clip(image, 0, 255).astype(np.uint8)[None], labels


def _store(root: Path, shape: tuple[int, int, int], spacing: tuple[float, ...], volumes: int = 4) -> Path:
    """``volumes`` training volumes and one for validation, as prepare --spatial-dims 3 lays them out."""
    stems = {"train": [f"vol_{i}" for i in range(volumes)], "val": [f"vol_{volumes}"]}
    for split, names in stems.items():
        writer = ZarrImageWriter(root / STORE_NAME, split)
        for stem in names:
            image, labels = _volume(shape, spacing, seed=int(stem.split("_")[1]))
            writer.write_image(stem, image, labels, None, offset=(0, 0, 0), spacing=spacing)
        writer.close()
    meta = {"mask_kind": "instances", "format": "zarr", "train_shards": [], "val_shards": [],
            "train_counts": [], "val_counts": [], "store": STORE_NAME, "layout": WHOLE_IMAGES,
            "context_margin": 0, "num_train_tiles": volumes, "num_val_tiles": 1, "tile_size": 32,
            "spatial_dims": 3, "tile_depth": 16, "spacing": list(spacing), "in_channels": 1,
            "num_classes": 2, "image_dtype": "uint8", "has_weight_map": False,
            "train_images": stems["train"], "val_images": stems["val"], "source": {}}  # fmt: skip
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("plan-volumes")
    return {
        "isotropic": _store(folder / "isotropic", (64, 64, 64), ISOTROPIC),
        # z 4x coarser, but 24 slices of 64 px: not thin enough for slice-wise (24 * 3 >= 64)
        "anisotropic": _store(folder / "anisotropic", (24, 64, 64), ANISOTROPIC),
    }


# ---------------------------------------------------------------- the fingerprint


def test_the_fingerprint_reads_spacing_shapes_and_objects_per_axis(stores):
    fp = read_fingerprint(str(stores["anisotropic"]))
    assert isinstance(fp, VolumeFingerprint) and fp.spatial_dims == 3
    assert fp.spacing == ANISOTROPIC and fp.median_volume_zyx == (24, 64, 64) and fp.max_tile_zyx == (24, 64, 64)
    assert fp.num_train_images == 4 and fp.sampled_tiles == 4 and fp.train_pixels == 4 * 24 * 64 * 64
    assert fp.median_image_hw == (64, 64) and fp.image_sizes_from == "whole volumes"
    assert fp.mask_kind == "instances" and fp.num_classes == 2 and fp.image_dtype == "uint8"
    # a sphere of radius 6 spans 11-13 voxels in-plane (its centre off the voxel grid) and 3 slices of 4
    object_z, object_y, object_x = fp.median_object_zyx
    assert object_z == 3 and 11 <= object_y <= 13 and 11 <= object_x <= 13
    assert fp.median_object_diameter_px == (object_y + object_x) / 2
    per_volume = [int(_volume((24, 64, 64), ANISOTROPIC, seed)[1].max()) for seed in range(4)]
    assert fp.touching_fraction == 0.0 and fp.objects_cut_fraction == 0.0 and fp.num_objects == sum(per_volume)
    assert 0.9 * 4 / 3 * math.pi * 6**3 / 4 < fp.median_object_volume_vx < 1.1 * 4 / 3 * math.pi * 6**3 / 4
    fg, bg = fp.intensity[0].foreground, fp.intensity[0].background
    assert fg.mean == pytest.approx(160, abs=2) and bg.mean == pytest.approx(40, abs=2)
    # deterministic, and its JSON gives it back (tuples and all)
    assert read_fingerprint(str(stores["anisotropic"])) == fp
    assert load_fingerprint(json.loads(json.dumps(fp.to_dict()))) == fp
    assert fp.summary()["spacing_zyx"] == "4x1x1"


# ---------------------------------------------------------------- the rules on hand-made fingerprints


def _stats() -> IntensityStats:
    return IntensityStats(10_000, 125.0, 57.5, 0, 250, 10, 10, 125, 240, 240)


def _hand_made(spacing: tuple[float, ...], median: tuple[int, int, int], **changes) -> VolumeFingerprint:
    body = _stats()
    base = VolumeFingerprint(
        data={"format": "zarr", "root": "data/volumes"}, dataset="data/volumes", mask_kind="instances",
        objects_from="instance ids", channels=1, image_dtype="uint8", num_classes=2, num_train_images=40,
        num_train_samples=40, median_image_hw=median[1:], smallest_image_edge_px=min(median[1:]),
        image_sizes_from="whole volumes", max_tile_px=min(median[1:]), train_pixels=40 * math.prod(median),
        sampled_tiles=40, seed=0, intensity=(ChannelIntensity(body, body, body),), num_objects=900,
        median_object_diameter_px=12.0, median_object_area_px=113.0, touching_fraction=0.2,
        objects_cut_fraction=0.1, class_frequencies={"0": 0.8, "1": 0.2}, spacing=spacing,
        median_volume_zyx=median, max_tile_zyx=median, median_object_zyx=(12.0 / spacing[0], 12.0, 12.0),
        median_object_volume_vx=900.0,
    )  # fmt: skip
    return dataclasses.replace(base, **changes)


def _net(values: dict) -> Net:
    model = values["model"]
    return Net(values["data"]["tile_size"], model["depth"], model["in_channels"], model["num_classes"],
               model["base_width"], values["data"]["tile_depth"], model["z_pools"])  # fmt: skip


def test_pooling_follows_the_spacing_per_axis():
    assert volumes.pooling((128, 128, 128), ISOTROPIC) == (4, 4)  # every level pools z
    # z 4x coarser: it joins once y and x have pooled twice (spacing 4 = z's), so the deepest 2
    assert volumes.pooling((32, 256, 256), ANISOTROPIC) == (4, 2)
    assert volumes.pooling((64, 256, 256), (2.0, 1.0, 1.0)) == (4, 3)  # 2x: from the second level
    assert volumes.pooling((32, 256, 256), (2.0, 1.0, 1.0)) == (4, 2)  # ... while z stays >= 8
    assert volumes.pooling((12, 256, 256), ISOTROPIC) == (4, 0)  # 12 slices: halved, fewer than 8
    assert volumes.pooling((64, 64, 64), ISOTROPIC) == (3, 3)  # the bottom stays >= 8 on every axis


def test_isotropic_volumes_get_a_cubic_tile_pooled_along_z_at_every_level():
    values, reasons = plan_config(_hand_made(ISOTROPIC, (256, 256, 256)), Budget(steps=1000, gpu_memory_gb=24))
    data, model = values["data"], values["model"]
    assert model["spatial_dims"] == 3 and data["format"] == "zarr" and model["preset"] == "padded"
    assert model["z_pools"] == model["depth"] == 4
    assert 0.5 <= data["tile_depth"] / data["tile_size"] <= 2  # cubic-ish: the physically longest shrinks
    assert data["tile_depth"] < 256  # 256**3 at batch 2 does not fit 24 GiB: shrunk
    assert data["tile_size"] % 16 == 0 and data["tile_depth"] % 16 == 0
    net = _net(values)
    assert net.memory_bytes(2, "bf16") <= 0.85 * 24 * 2**30
    assert model["norm"] == "instance" and values["train"]["global_batch_size"] < 16
    assert "shrunk along the physically longest axis" in reasons["data.tile_size"]


def test_anisotropic_spacing_pools_z_fewer_times_and_flattens_the_tile():
    iso = plan_config(_hand_made(ISOTROPIC, (128, 256, 256)), GPU)[0]
    aniso_values, reasons = plan_config(_hand_made(ANISOTROPIC, (128, 256, 256)), Budget(steps=1000, gpu_memory_gb=24))
    model, data = aniso_values["model"], aniso_values["data"]
    assert model["z_pools"] < model["depth"] and iso["model"]["z_pools"] == iso["model"]["depth"]
    assert data["tile_depth"] < data["tile_size"]  # flatter in voxels ...
    assert 0.5 <= 4 * data["tile_depth"] / data["tile_size"] <= 2  # ... about as deep as wide, physically
    assert data["tile_depth"] % 2 ** model["z_pools"] == 0 and data["tile_depth"] // 2 ** model["z_pools"] >= 8
    assert "the deepest" in reasons["model.z_pools"] and "4x the in-plane" in reasons["model.z_pools"]


def test_few_thick_slices_are_planned_slice_wise_and_the_plan_loads(tmp_path):
    """z 10x coarser and 12 slices: a 3-D tile would never pool z, so a tile of one slice."""
    fp = _hand_made((5.0, 0.5, 0.5), (12, 512, 512))
    values, reasons = plan_config(fp, GPU)
    assert values["data"]["tile_depth"] == 1 and values["model"]["z_pools"] == 0
    assert values["model"]["spatial_dims"] == 3 and "slice-wise" in reasons["data.tile_depth"]
    # thick slices, but enough of them to pool z (at the deepest level): 3-D
    assert plan_config(_hand_made((5.0, 0.5, 0.5), (20, 512, 512)), GPU)[0]["model"]["z_pools"] == 1
    # 4:1:1 and a third as many slices as pixels across (nnU-Net's "anisotropic voxels"), but
    # physically a cube: z pools twice, 3-D
    cube = plan_config(_hand_made(ANISOTROPIC, (128, 512, 512)), GPU)[0]
    assert cube["data"]["tile_depth"] > 16 and cube["model"]["z_pools"] == 2
    assert not volumes.slice_wise(_hand_made(ISOTROPIC, (12, 512, 512)))[0]  # few slices, but not thick
    out = tmp_path / "plan.yaml"
    out.write_text(render_plan(fp, GPU))
    config = load_config([out])
    assert (config.model.spatial_dims, config.data.tile_depth, config.model.z_pools) == (3, 1, 0)


@pytest.mark.parametrize("budget", [Budget(steps=50), Budget(minutes=30), Budget(gpu_memory_gb=16, steps=50)])
def test_the_plan_is_pure_and_loads_on_every_budget(tmp_path, budget):
    fp = _hand_made(ANISOTROPIC, (96, 300, 280))
    text = render_plan(fp, budget)
    assert text == render_plan(_hand_made(ANISOTROPIC, (96, 300, 280)), budget)  # same fingerprint, same YAML
    assert render_plan(load_fingerprint(json.loads(json.dumps(fp.to_dict()))), budget) == text
    out = tmp_path / "plan.yaml"
    out.write_text(text)
    config = load_config([out])  # validates the tile shape against the model
    values, reasons = plan_config(fp, budget)
    for section, items in values.items():
        for key, value in items.items():
            assert getattr(getattr(config, section), key) == value, f"{section}.{key}"
            assert reasons[f"{section}.{key}"] and f"# {reasons[f'{section}.{key}']}" in text
    assert config.data.tile_size <= 280 and config.data.tile_depth <= 96  # within every volume
    assert "spacing (median, z, y, x): 4, 1, 1" in text


def test_2d_fingerprints_keep_the_2d_plan():
    from test_plan import _hand_made as hand_made_2d

    values, _ = plan_config(hand_made_2d(), GPU)
    assert "tile_depth" not in values["data"] and "spatial_dims" not in values["model"]
    assert "z_pools" not in values["model"] and values["model"]["preset"] == "padded"


# ---------------------------------------------------------------- the 3-D cost arithmetic


@pytest.mark.parametrize(("shape", "depth", "z_pools"), [((8, 32, 32), 2, 1), ((16, 32, 32), 2, None)])
def test_3d_flops_and_parameters_by_arithmetic_equal_the_model_s(shape, depth, z_pools):
    from unetdist.flops import training_flops_per_sample
    from unetdist.model import build_unet

    model = build_unet("padded", 2, 3, 4, depth, norm="instance", spatial_dims=3, z_pools=z_pools)
    assert costs.training_flops(shape, depth, 2, 3, 4, z_pools) == training_flops_per_sample(model, (2, *shape))
    parameters = sum(p.numel() for p in model.parameters())
    assert costs.parameter_count(depth, 2, 3, 4, spatial_dims=3, z_pools=z_pools) == parameters
    net = Net(shape[1], depth, 2, 3, 4, tile_depth=shape[0], z_pools=z_pools)
    assert net.tile_elements == math.prod(shape) and net.flops == costs.training_flops(shape, depth, 2, 3, 4, z_pools)


@pytest.mark.parametrize(("shape", "depth", "z_pools"), [((8, 64, 64), 3, 1), ((1, 64, 64), 3, 0)])
def test_3d_activation_elements_track_what_autograd_keeps(shape, depth, z_pools):
    import torch

    from unetdist.model import build_unet

    model = build_unet("padded", 1, 3, 8, depth, spatial_dims=3, z_pools=z_pools).train()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage().data_ptr() not in parameters:
            kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(torch.randn(2, 1, *shape))
    assert 0.9 < sum(kept.values()) / (2 * 4 * costs.activation_elements(shape, depth, 1, 3, 8, z_pools)) <= 1.0


def test_a_3d_conv_costs_three_times_the_taps_of_a_2d_one():
    # one slice that never pools z: the same net as 2-D but 27 taps for 9 in every 3x3 conv
    flat, planar = Net(64, 3, 1, 2, tile_depth=1, z_pools=0), Net(64, 3, 1, 2)
    assert 2.5 < flat.flops / planar.flops <= 3.0
    assert flat.memory_bytes(0, "bf16") > planar.memory_bytes(0, "bf16")  # 3x the conv weights


# ---------------------------------------------------------------- the CLI on a store


def test_the_cli_plans_volumes_that_train_loads(stores, tmp_path, capsys):
    out = tmp_path / "plan.yaml"
    assert main([str(stores["anisotropic"]), "--out", str(out), "--steps", "20", "--gpu-memory-gb", "80"]) == 0
    assert "tile 24x64x64 (z_pools 1)" in capsys.readouterr().out
    config = load_config([out])
    assert config.model.spatial_dims == 3 and config.data.format == "zarr" and config.data.root == str(stores["anisotropic"])
    # 24 x 64 x 64 fits whole: depth 3 in-plane (bottom 8 px); z pools at the deepest level only
    assert (config.data.tile_depth, config.data.tile_size, config.model.depth, config.model.z_pools) == (24, 64, 3, 1)
    assert config.loss.target == "boundary" and config.model.norm == "instance"
    text = out.read_text()
    assert "median extent 3 x 1" in text and "z 4x the in-plane" in text
    replanned = tmp_path / "again" / "plan.yaml"  # from the fingerprint alone: the same bytes
    assert main([str(fingerprint_path(out)), "--out", str(replanned), "--steps", "20", "--gpu-memory-gb", "80"]) == 0
    assert replanned.read_text() == text
    spec = tmp_path / "data.yaml"  # a config naming the store: the same fingerprint
    spec.write_text(json.dumps({"data": {"root": str(stores["anisotropic"]), "format": "zarr", "tile_size": 32},
                                "model": {"spatial_dims": 3}}))  # fmt: skip
    assert read_fingerprint(str(spec)) == read_fingerprint(str(stores["anisotropic"]))
    iso = plan_config(read_fingerprint(str(stores["isotropic"])), GPU)[0]
    assert (iso["data"]["tile_depth"], iso["data"]["tile_size"], iso["model"]["z_pools"]) == (64, 64, 3)
