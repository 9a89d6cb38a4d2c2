"""Volumes as WebDataset shards of 3-D tiles (issue 19): ``prepare --spatial-dims 3`` (format
webdataset, the default) writes a grid of (tile_depth, tile, tile) tiles as .npy members keyed
{stem}_z_y_x, and training reads them as the same exact global sequence at any ranks and workers."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from conftest import global_batches

from unetdist.config import ConfigError, DataConfig, load_config
from unetdist.data import build_train_loader, build_val_loader
from unetdist.data.layout import grid_corners, sample_key
from unetdist.data.preflight import check_tile_size
from unetdist.data.samples import DataError
from unetdist.data.synthetic import synthetic_volume
from unetdist.prepare import main

SHAPE = (30, 40, 44)  # (z, y, x) of each volume: no axis a multiple of its tile's
TILE, DEPTH = 20, 10  # stored tiles; training crops 8x16x16 windows from them


def _members(shard: Path) -> dict[str, dict[str, np.ndarray]]:
    """key -> {member suffix: array} of a tar shard."""
    samples: dict[str, dict[str, np.ndarray]] = {}
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            key, _, suffix = member.name.partition(".")
            samples.setdefault(key, {})[suffix] = np.load(io.BytesIO(tar.extractfile(member).read()))
    return samples


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Two ImageJ stacks (z, c, y, x) of two uint16 channels with their spacing, prepared to shards:
    fewer than five volumes, so each one's last part along its axis of most tiles validates."""
    root = tmp_path_factory.mktemp("wds_volumes")
    images, masks, out = root / "images", root / "masks", root / "out"
    images.mkdir()
    masks.mkdir()
    for seed in range(2):
        image, ids = synthetic_volume(SHAPE, np.random.default_rng(seed))
        stack = np.stack([image.astype(np.uint16) * 3, 255 - image.astype(np.uint16)], axis=1)  # z, c, y, x
        tifffile.imwrite(images / f"cells{seed}.tif", stack, imagej=True, resolution=(1 / 0.5, 1 / 0.5),
                         metadata={"axes": "ZCYX", "spacing": 2.0})  # fmt: skip
        tifffile.imwrite(masks / f"cells{seed}.tif", ids)
    argv = ["--images", str(images), "--masks", str(masks), "--out", str(out), "--spatial-dims", "3",
            "--tile", str(TILE), "--tile-depth", str(DEPTH), "--shard-size", "7"]  # fmt: skip
    assert main(argv) == 0
    return out


def test_prepare_writes_3d_npy_tiles_keyed_by_their_corner_with_the_volume_metadata(shards: Path):
    meta = json.loads((shards / "dataset.json").read_text())
    assert meta["format"] == "webdataset" and meta["spatial_dims"] == 3 and meta["tile_depth"] == DEPTH
    assert meta["tile_size"] == TILE and meta["spacing"] == [2.0, 0.5, 0.5]
    assert meta["in_channels"] == 2 and meta["image_dtype"] == "uint16" and not meta["has_weight_map"]
    for split in ("train", "val"):
        samples: dict[str, dict[str, np.ndarray]] = {}
        for name, count in zip(meta[f"{split}_shards"], meta[f"{split}_counts"], strict=True):
            assert (shards / f"{name}.index.json").exists()
            got = _members(shards / name)
            assert len(got) == count
            samples.update(got)
        assert len(samples) == meta[f"num_{split}_tiles"]
        expected = []
        for stem, region in meta[f"{split}_regions"].items():
            starts, stops = region[0::2], region[1::2]
            shape = tuple(stop - start for start, stop in zip(starts, stops, strict=True))
            expected += [sample_key(stem, *(a + b for a, b in zip(corner, starts, strict=True)))
                         for corner in grid_corners(shape, (DEPTH, TILE, TILE))]  # fmt: skip
        assert sorted(samples) == sorted(expected)
        for sample in samples.values():
            assert set(sample) == {"image.npy", "mask.npy"}
            assert sample["image.npy"].shape == (2, DEPTH, TILE, TILE) and sample["image.npy"].dtype == np.uint16
            assert sample["mask.npy"].shape == (DEPTH, TILE, TILE) and sample["mask.npy"].dtype == np.uint16
    # a tile is the volume's voxels at its corner: the last one of an axis moved inwards to end at the edge
    image, ids = synthetic_volume(SHAPE, np.random.default_rng(1))
    z0 = meta["val_regions"]["cells1"][0]
    z, y, x = z0, SHAPE[1] - TILE, SHAPE[2] - TILE
    tile = next(_members(shards / name).get(sample_key("cells1", z, y, x)) for name in meta["val_shards"]
                if sample_key("cells1", z, y, x) in _members(shards / name))  # fmt: skip
    assert np.array_equal(tile["mask.npy"], ids[z : z + DEPTH, y:, x:])
    assert np.array_equal(tile["image.npy"][1], 255 - image[z : z + DEPTH, y:, x:].astype(np.uint16))


def data_config(root: Path, **changes) -> DataConfig:
    settings = dict(format="webdataset", root=str(root), tile_size=16, tile_depth=8, num_workers=0,
                    foreground_fraction=0.5, augment=True, mask_kind="instances")  # fmt: skip
    return DataConfig(**{**settings, **changes})


def test_the_shards_train_as_the_same_global_sequence_at_any_ranks_and_workers(shards: Path):
    single = global_batches(data_config(shards), 1, 0, 3, in_channels=2, seed=3)
    spread = global_batches(data_config(shards), 2, 2, 3, in_channels=2, seed=3)
    assert single[0]["image"].shape == (8, 2, 8, 16, 16) and single[0]["mask"].shape == (8, 8, 16, 16)
    for one, many in zip(single, spread, strict=True):
        assert one["key"] == many["key"]
        assert torch.equal(one["image"], many["image"]) and torch.equal(one["mask"], many["mask"])


def test_validation_reads_each_stored_tile_once_across_ranks(shards: Path):
    meta = json.loads((shards / "dataset.json").read_text())
    stored = {key for name in meta["val_shards"] for key in _members(shards / name)}
    keys = []
    for rank in range(2):
        loader = build_val_loader(data_config(shards), rank=rank, world_size=2, micro_batch_size=2,
                                  in_channels=2, num_classes=2, use_weight_map="false", spatial_dims=3)  # fmt: skip
        for batch in loader:
            assert batch["image"].shape[1:] == (2, 8, 16, 16)
            keys += batch["key"]
    assert len(keys) == len(set(keys)) == meta["num_val_tiles"] and set(keys) == stored


def test_a_2d_model_on_3d_shards_is_one_line_naming_shard_key_and_spatial_dims(shards: Path):
    loader = build_train_loader(data_config(shards, tile_depth=0), rank=0, world_size=1, seed=3, micro_batch_size=2,
                                in_channels=2, num_classes=2, use_weight_map="false")  # fmt: skip
    with pytest.raises(DataError) as caught:
        next(iter(loader))
    line = str(caught.value)
    assert "\n" not in line and "shard " in line and ".tar sample cells" in line, line
    assert "a 3-D tile (a volume's), image shape (2, 10, 20, 20), but model.spatial_dims=2; set " \
           "model.spatial_dims=3" in line, line  # fmt: skip


def test_preflight_and_config_of_3d_shards(shards: Path):
    with pytest.raises(ConfigError, match=r"data.tile_depth=12 is deeper than the 10-plane tiles stored in"):
        check_tile_size(data_config(shards, tile_depth=12), spatial_dims=3)
    with pytest.raises(ConfigError, match=r"data.tile_depth=0 \(0: data.tile_size\) is deeper .* --tile-depth 16"):
        check_tile_size(data_config(shards, tile_depth=0), spatial_dims=3)
    with pytest.raises(ConfigError, match=r"data.tile_size=24 is larger than the 20x20 tiles"):
        check_tile_size(data_config(shards, tile_size=24), spatial_dims=3)
    check_tile_size(data_config(shards), spatial_dims=3)
    check_tile_size(data_config(shards, tile_size=24), spatial_dims=2)  # left to the sample's one line
    config = load_config(overrides=["data.format=webdataset", f"data.root={shards}", "model.spatial_dims=3",
                                    "data.tile_size=16", "data.tile_depth=8", "model.depth=2"])  # fmt: skip
    assert config.model.spatial_dims == 3 and config.data.format == "webdataset"


def test_3d_prepare_refusals_name_the_flags(tmp_path: Path, capsys):
    out = tmp_path / "out"
    for options, expected in (
        (["--format", "zarr"], "--spatial-dims 3 needs --format webdataset (3-D tiles) or --format zarr --whole-images"),
        (["--context-for", "paper"], "--context-for goes with --spatial-dims 2"),
    ):
        assert main(["--synthetic", "1", "--spatial-dims", "3", "--out", str(out), *options]) == 2
        assert expected in capsys.readouterr().err
        assert not out.exists()  # refused before any synthetic volume was written
