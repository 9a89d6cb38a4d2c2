"""Start-up checks of the data layout: the topology line, and the layouts that cannot run, refused by name."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from unetdist.config import ConfigError, DataConfig
from unetdist.data import build_train_loader, build_val_loader
from unetdist.data.prepare import prepare_dataset
from unetdist.data.synthetic import write_synthetic

TILE = 32
MODEL = dict(in_channels=1, num_classes=2, use_weight_map=True)


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    """Six 32x32 images, one tile each: 5 train tiles in tar shards of 2, 1 val tile; the same as Zarr."""
    out = tmp_path_factory.mktemp("preflight")
    images, masks = write_synthetic(out, count=6, image_size=TILE, seed=0)
    common = dict(tile_size=TILE, val_fraction=0.2, seed=0)
    prepare_dataset(images, masks, out / "tar", shard_size=2, **common)
    prepare_dataset(images, masks, out / "zarr", output_format="zarr", **common)
    return {"webdataset": out / "tar", "zarr": out / "zarr"}


def test_topology_line_names_ranks_workers_and_units(roots, caplog):
    data = DataConfig(root=str(roots["webdataset"]), tile_size=TILE, num_workers=1)
    with caplog.at_level(logging.INFO, logger="unetdist.data.preflight"):
        build_train_loader(data, rank=0, world_size=2, seed=0, global_batch_size=4, micro_batch_size=2, **MODEL)
    assert "data: 2 rank(s) x 1 worker(s) x 3 shard(s) (webdataset, 5 train samples" in caplog.text
    assert "hands over 2 micro-batches at a time" in caplog.text
    caplog.clear()
    zarr = DataConfig(format="zarr", root=str(roots["zarr"]), tile_size=TILE, num_workers=0)
    with caplog.at_level(logging.INFO, logger="unetdist.data.preflight"):
        build_train_loader(zarr, rank=0, world_size=1, seed=0, micro_batch_size=2, **MODEL)
    assert "data: 1 rank(s) x 1 worker(s) x 1 array(s) (zarr, 5 train samples" in caplog.text


def test_refuses_an_epoch_without_a_step(roots):
    data = DataConfig(root=str(roots["webdataset"]), tile_size=TILE, num_workers=0, epoch_end="drop")
    with pytest.raises(ValueError, match=r"data\.epoch_end=drop with 5 training samples and train\.global_batch_size=8"):
        build_train_loader(data, rank=0, world_size=2, seed=0, global_batch_size=8, micro_batch_size=4, **MODEL)
    padded = DataConfig(root=str(roots["webdataset"]), tile_size=TILE, num_workers=0, epoch_end="pad")
    loader = build_train_loader(padded, rank=0, world_size=2, seed=0, global_batch_size=8, micro_batch_size=4, **MODEL)
    assert loader.steps_per_epoch == 1  # 5 samples padded to one step of 8


@pytest.mark.parametrize("fmt", ["webdataset", "zarr"])
def test_refuses_a_tile_size_larger_than_the_stored_tiles(roots, fmt):
    data = DataConfig(format=fmt, root=str(roots[fmt]), tile_size=TILE + 16, num_workers=1)
    with pytest.raises(ConfigError, match=rf"data\.tile_size={TILE + 16} is larger than the {TILE}x{TILE} tiles.*--tile"):
        build_train_loader(data, rank=0, world_size=1, seed=0, micro_batch_size=2, **MODEL)
    smaller = DataConfig(format=fmt, root=str(roots[fmt]), tile_size=TILE - 16, num_workers=0)
    batch = next(iter(build_train_loader(smaller, rank=0, world_size=1, seed=0, micro_batch_size=2, **MODEL)))
    assert tuple(batch["image"].shape) == (2, 1, TILE - 16, TILE - 16)


def test_refuses_fewer_validation_samples_than_ranks(roots):
    data = DataConfig(root=str(roots["webdataset"]), tile_size=TILE, num_workers=1)
    with pytest.raises(ConfigError, match=r"validation split has 1 sample\(s\) for 2 ranks.*--val-fraction.*data\.val_shards"):
        build_val_loader(data, rank=0, world_size=2, micro_batch_size=2, **MODEL)
    alone = build_val_loader(data, rank=0, world_size=1, micro_batch_size=2, **MODEL)
    assert sum(len(batch["key"]) for batch in alone) == 1
