"""OME-Zarr volumes (NGFF 0.4 and 0.5, written by ome-zarr-py itself): prepared into a whole-volume
store with their NGFF spacing, and read in place by the ome-zarr source with the same windows,
keys and validation grid as that store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import balls_on_noise, global_batches
from ome_zarr.format import FormatV04, FormatV05
from ome_zarr.writer import write_image, write_labels

from unetdist.config import ConfigError, DataConfig, load_config
from unetdist.data import build_val_loader
from unetdist.data.samples import SampleChecks
from unetdist.data.sources import open_source
from unetdist.data.sources.ome_zarr_volumes import OmeZarrVolumes
from unetdist.prepare import main as prepare_main

FORMATS = {"0.4": (FormatV04, 2), "0.5": (FormatV05, 3)}
SHAPE = (20, 40, 40)  # (z, y, x)
SCALE = (2.5, 0.5, 0.5)  # the NGFF scale of level 0 (z, y, x)
TILE = dict(tile_depth=8, tile_size=16)


def blob_volume(seed: int, shape: tuple[int, int, int] = SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """uint16 [2, Z, Y, X] pixels of bright balls on noise, and their instance ids (uint16)."""
    image, ids = balls_on_noise(seed, shape, cells=8, radii=(3, 6), dtype=np.uint16)
    return np.stack([image, image * 2]), ids


def write_volume(path: Path, version: str, seed: int, times: int = 1) -> str:
    """An NGFF image c(z)yx (tczyx with ``times`` > 1) and its label image ``labels/cells``, with z and
    y/x scales; ome-zarr-py downsamples y and x by 2 per level."""
    fmt, zarr_format = FORMATS[version]
    group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    pixels, ids = zip(*(blob_volume(seed + t) for t in range(times)), strict=True)
    image, labels = (np.stack(pixels), np.stack(ids)) if times > 1 else (pixels[0], ids[0])
    axes = "tczyx" if times > 1 else "czyx"
    scale = {**dict.fromkeys(axes[:-3], 1.0), **dict(zip("zyx", SCALE, strict=True))}
    levels = dict(scale_factors=(2, 4), method="nearest", axes_units=dict.fromkeys("zyx", "micrometer"))
    chunks = tuple(1 if axis in "tc" else 8 for axis in axes)
    write_image(image, group, fmt=fmt(), axes=axes, storage_options={"chunks": chunks}, scale=scale, **levels)
    label_axes = axes.replace("c", "")
    write_labels(labels, group, name="cells", fmt=fmt(), axes=label_axes, **levels,
                 scale={axis: scale[axis] for axis in label_axes})  # fmt: skip
    return str(path)


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> dict[str, list[str]]:
    """Two volumes per NGFF version."""
    out = tmp_path_factory.mktemp("ngff-volumes")
    return {version: [write_volume(out / f"v{version[-1]}{i}.ome.zarr", version, seed=10 * i)
                      for i in range(2)] for version in FORMATS}  # fmt: skip


def prepare(out: Path, images: list[str], *extra: str) -> dict:
    code = prepare_main(["--spatial-dims", "3", "--from-ome-zarr", *images, "--labels", "cells", "--out", str(out),
                         "--format", "zarr", "--whole-images", "--tile", "16", "--tile-depth", "8", *extra])  # fmt: skip
    assert code == 0
    return json.loads((out / "dataset.json").read_text())


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ngff_volumes_prepare_with_their_scale_as_spacing(volumes, version, tmp_path):
    meta = prepare(tmp_path / "out", volumes[version], "--val-fraction", "0")
    assert meta["spatial_dims"] == 3 and meta["spacing"] == list(SCALE) and meta["in_channels"] == 2
    group = zarr.open_group(str(tmp_path / "out" / "data.zarr"), mode="r", path="train")
    assert group.attrs["spacing"] == [list(SCALE)] * 2
    stems = list(group.attrs["images"])
    assert sorted(stems) == sorted(Path(url).name.removesuffix(".ome.zarr") for url in volumes[version])
    for index, stem in enumerate(stems):
        pixels, ids = blob_volume(10 * int(stem[-1]))
        assert np.array_equal(group["images"][str(index)][...], pixels)
        assert np.array_equal(group["masks"][str(index)][...], ids)
    # level 1: y and x twice as coarse, and one channel
    meta = prepare(tmp_path / "coarse", volumes[version][:1], "--level", "1", "--channels", "1", "--tile", "8")
    assert meta["spacing"] == [SCALE[0], SCALE[1] * 2, SCALE[2] * 2] and meta["in_channels"] == 1


def test_time_points_are_volumes_of_one_group(tmp_path):
    url = write_volume(tmp_path / "movie.ome.zarr", "0.5", seed=3, times=2)
    meta = prepare(tmp_path / "out", [url])  # one image: a region of each of its volumes validates
    assert sorted(meta["train_images"]) == ["movie_t0", "movie_t1"] == sorted(meta["val_images"])


def test_a_plane_image_is_refused_as_a_volume(tmp_path, capsys):
    fmt, zarr_format = FORMATS["0.5"]
    group = zarr.open_group(str(tmp_path / "flat.ome.zarr"), mode="w", zarr_format=zarr_format)
    write_image(np.zeros((32, 32), np.uint8), group, fmt=fmt(), axes="yx")
    write_labels(np.zeros((32, 32), np.uint8), group, name="cells", fmt=fmt(), axes="yx")
    assert prepare_main(["--spatial-dims", "3", "--from-ome-zarr", str(tmp_path / "flat.ome.zarr"), "--labels",
                         "cells", "--out", str(tmp_path / "out"), "--format", "zarr", "--whole-images"]) == 2  # fmt: skip
    assert "flat.ome.zarr: axes without z" in capsys.readouterr().err


# ---------------------------------------------------------------- training in place


def store_config(store: Path, **changes) -> DataConfig:
    return DataConfig(**{**dict(format="zarr", zarr_store=str(store), tiles_per_image=6, num_workers=0,
                                augment=True, mask_kind="instances", **TILE), **changes})  # fmt: skip


def ngff_config(images: list[str], **changes) -> DataConfig:
    return DataConfig(**{**dict(format="ome-zarr", images=images, labels="cells", tiles_per_image=6, num_workers=0,
                                augment=True, mask_kind="instances", **TILE), **changes})  # fmt: skip


def assert_same(a: list[dict], b: list[dict]) -> None:
    for one, other in zip(a, b, strict=True):
        assert one["key"] == other["key"]
        assert torch.equal(one["image"], other["image"]) and torch.equal(one["mask"], other["mask"])


@pytest.fixture(scope="module")
def prepared(volumes, tmp_path_factory) -> tuple[Path, list[str]]:
    """The 0.5 volumes prepared whole (all training), and the images in the store's order."""
    out = tmp_path_factory.mktemp("prepared")
    prepare(out, volumes["0.5"], "--val-fraction", "0")
    stems = list(zarr.open_group(str(out / "data.zarr"), mode="r", path="train").attrs["images"])
    by_stem = {Path(url).name.removesuffix(".ome.zarr"): url for url in volumes["0.5"]}
    return out / "data.zarr", [by_stem[stem] for stem in stems]


def test_training_windows_in_place_equal_the_prepared_store_at_any_ranks_and_workers(prepared):
    store, images = prepared
    from_store = global_batches(store_config(store), 1, 0, 3, in_channels=2)
    in_place = global_batches(ngff_config(images, val_fraction=0.0), 1, 0, 3, in_channels=2)
    assert from_store[0]["image"].shape == (8, 2, 8, 16, 16) and from_store[0]["mask"].shape == (8, 8, 16, 16)
    assert all("_z" in key for batch in in_place for key in batch["key"])
    assert_same(in_place, from_store)
    assert_same(global_batches(ngff_config(images, val_fraction=0.0), 2, 2, 3, in_channels=2), from_store)


def test_foreground_windows_come_from_a_coarse_level(prepared):
    _, images = prepared
    checks = SampleChecks(16, 2, 2, False, mask_kind="instances", spatial_dims=3, tile_depth=8)
    source = open_source(ngff_config(images, val_fraction=0.0, foreground_fraction=1.0), "train", checks)
    assert isinstance(source, OmeZarrVolumes) and source.images[0].foreground_path.endswith("/s2")  # y, x 4x coarser: 16 / 4
    table = source.foreground(0)
    coarse = zarr.open_group(images[0], mode="r")["labels/cells/s2"][...]
    assert table.shape[1] == 3 and len(table)  # every point the centre of a foreground voxel of level s2
    assert (coarse[table[:, 0], table[:, 1] // 4, table[:, 2] // 4] > 0).all()
    batch = global_batches(ngff_config(images, val_fraction=0.0, foreground_fraction=1.0), 1, 0, 1, in_channels=2)[0]
    centres = batch["mask"][:, 4, 8, 8]  # each window centred on a foreground voxel (to a coarse voxel)
    assert (centres > 0).float().mean() >= 0.5


def test_validation_reads_each_grid_window_once_across_ranks(volumes):
    images = volumes["0.4"]
    keys = []
    for rank in range(2):
        loader = build_val_loader(ngff_config(images, val_images=images[1:]), rank=rank, world_size=2,
                                  micro_batch_size=2, in_channels=2, num_classes=2, use_weight_map="false",
                                  spatial_dims=3)  # fmt: skip
        keys += [key for batch in loader for key in batch["key"]]
    # 20x40x40 with 8x16x16 tiles: 3 x 3 x 3 windows (the last of each axis moved inwards)
    assert len(keys) == len(set(keys)) == 27 and "v41_z12_y24_x24" in keys


def test_one_volume_validates_on_the_region_that_prepare_holds_out(volumes, tmp_path):
    image = volumes["0.5"][:1]
    meta = prepare(tmp_path / "out", image)  # one volume: its last part along the axis of most tiles
    stem = Path(image[0]).name.removesuffix(".ome.zarr")
    store_keys, ngff_keys = [], []
    for data, keys in ((store_config(tmp_path / "out" / "data.zarr"), store_keys), (ngff_config(image), ngff_keys)):
        loader = build_val_loader(data, rank=0, world_size=1, micro_batch_size=2, in_channels=2, num_classes=2,
                                  use_weight_map="false", spatial_dims=3)  # fmt: skip
        keys += [key for batch in loader for key in batch["key"]]
    assert ngff_keys == store_keys and ngff_keys
    checks = SampleChecks(16, 2, 2, False, mask_kind="instances", spatial_dims=3, tile_depth=8)
    train = open_source(ngff_config(image), "train", checks)
    (z0, z1, y0, y1, x0, x1), = [tuple(meta["train_regions"][stem])]  # fmt: skip
    assert train.planes[0].box == (z0, z1, y0, y1, x0, x1)


def test_config_allows_ome_zarr_volumes(tmp_path):
    args = ["model.spatial_dims=3", "data.tile_depth=8", "data.tile_size=16", "model.depth=2"]
    config = load_config((), ["data.format=ome-zarr", "data.images=[a.ome.zarr]", "data.labels=cells", *args])
    assert config.model.spatial_dims == 3
    with pytest.raises(ConfigError, match="data.tile_depth x tile_size=9x16"):  # a z size the net cannot pool
        load_config((), ["data.format=ome-zarr", "data.images=[a.ome.zarr]", "data.labels=cells", *args,
                         "data.tile_depth=9"])  # fmt: skip
