"""prepare with few images: a held-out region of each image validates, half a tile away from training.

Tile origins are read back from what prepare wrote (shard keys, the Zarr origin table, the
whole-image offsets), independently of the loader, and checked against dataset.json's regions
and the raw images; a real ``python -m unetdist.train`` then trains and validates on one image.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from conftest import train_tiny_on

from unetdist.data.prepare import prepare_dataset
from unetdist.data.splits import MIN_IMAGES_TO_SPLIT_BY_IMAGE, RegionTooSmall, gap_px, holdout_regions
from unetdist.data.synthetic import write_synthetic
from unetdist.prepare import main
from unetdist.weight_map import border_weight_map

TILE = 32
KEY = re.compile(r"^(?P<stem>.+)_y(?P<top>\d+)_x(?P<left>\d+)$")


def shard_tiles(root: Path, split: str) -> dict[str, dict[str, np.ndarray]]:
    """{key: {field: array}} of a split's shards, read with tarfile."""
    meta = json.loads((root / "dataset.json").read_text())
    tiles: dict[str, dict[str, np.ndarray]] = {}
    for name in meta[f"{split}_shards"]:
        with tarfile.open(root / name) as tar:
            for member in tar.getmembers():
                key, field = member.name.split(".", 1)
                tiles.setdefault(key, {})[field] = np.load(io.BytesIO(tar.extractfile(member).read()))
    return tiles


def origin(key: str) -> tuple[str, int, int]:
    match = KEY.match(key)
    assert match, key
    return match["stem"], int(match["top"]), int(match["left"])


def inside(region: list[int], top: int, left: int, size: int) -> bool:
    y0, y1, x0, x1 = region
    return y0 <= top and top + size <= y1 and x0 <= left and left + size <= x1


@pytest.fixture(scope="module")
def one_image(tmp_path_factory) -> tuple[Path, Path]:
    """One synthetic 128x96 image (taller than wide: the regions are cut across its rows)."""
    folder = tmp_path_factory.mktemp("one")
    images, masks = write_synthetic(folder, count=1, image_size=128, seed=2)
    for path in (images / "cells_0000.tif", masks / "cells_0000.tif"):
        tifffile.imwrite(path, tifffile.imread(path)[:, :96])
    return images, masks


# ---------------------------------------------------------------- the regions, as a pure function


def test_regions_cut_the_longer_axis_with_a_half_tile_gap_and_a_tile_at_least():
    tall = holdout_regions(200, 100, tile_size=32, val_fraction=0.1)
    assert tall.axis == "rows" and tall.val == (168, 200, 0, 100)  # round(0.1 * 200) = 20 < a tile: 32
    assert tall.train == (0, 200 - 32 - gap_px(32), 0, 100) and gap_px(32) == 16
    wide = holdout_regions(100, 400, tile_size=32, val_fraction=0.25)
    assert wide.axis == "columns" and wide.val == (0, 100, 300, 400) and wide.train == (0, 100, 0, 284)
    assert gap_px(33) == 17  # at least half a tile
    assert holdout_regions(96, 96, tile_size=32, val_fraction=0.1).axis == "rows"  # square: rows
    with pytest.raises(RegionTooSmall, match=r"image 64x64 is too small .* tile size 32: its height 64 px must "
                                             r"hold 32 px to train, a 16 px gap and 32 px to validate \(80 px\)"):
        holdout_regions(64, 64, tile_size=32, val_fraction=0.1)


# ---------------------------------------------------------------- one image, every format


def test_one_image_webdataset_val_tiles_only_from_the_held_out_region(one_image, tmp_path: Path):
    images, masks = one_image
    meta = prepare_dataset(images, masks, tmp_path / "out", tile_size=TILE, shard_size=4, val_fraction=0.1)
    assert meta["mask_kind"] == "instances" and meta["train_images"] == meta["val_images"] == ["cells_0000"]
    # 128 rows: the last 32 validate (a tile > 0.1 * 128), 16 rows of gap, the first 80 train
    assert meta["val_regions"] == {"cells_0000": [96, 128, 0, 96]}
    assert meta["train_regions"] == {"cells_0000": [0, 80, 0, 96]}
    image, ids = tifffile.imread(images / "cells_0000.tif"), tifffile.imread(masks / "cells_0000.tif")
    weight = border_weight_map(ids, w0=10.0, sigma=5.0)  # of the whole image, then cropped
    keys = []
    for split in ("train", "val"):
        tiles = shard_tiles(tmp_path / "out", split)
        assert len(tiles) == meta[f"num_{split}_tiles"] > 0
        region = meta[f"{split}_regions"]["cells_0000"]
        for key, tile in tiles.items():
            stem, top, left = origin(key)
            assert stem == "cells_0000" and inside(region, top, left, TILE), (split, key)
            window = (slice(top, top + TILE), slice(left, left + TILE))
            np.testing.assert_array_equal(tile["image.npy"][0], image[window])
            np.testing.assert_array_equal(tile["mask.npy"], ids[window])  # the ids, at their place
            np.testing.assert_allclose(tile["weight.npy"], weight[window], rtol=1e-6)
        keys += tiles
    trained_rows = {origin(key)[1] for key in shard_tiles(tmp_path / "out", "train")}
    assert max(trained_rows) + TILE == 80  # no training tile reaches into the gap (rows 80-95) or beyond
    assert len(keys) == len(set(keys))


def test_one_image_zarr_tiles_and_whole_images_hold_the_regions(one_image, tmp_path: Path):
    images, masks = one_image
    ids = tifffile.imread(masks / "cells_0000.tif")
    tiles = prepare_dataset(images, masks, tmp_path / "tiles", tile_size=TILE, output_format="zarr")
    store = zarr.open_group(str(tmp_path / "tiles" / "data.zarr"), mode="r")
    for split in ("train", "val"):
        group = store[split]
        assert group.attrs["images"] == ["cells_0000"] and group["mask"].dtype == np.uint16
        origins, stored = group["origin"][...], group["mask"][...]
        assert len(origins) == tiles[f"num_{split}_tiles"]
        for (_, top, left), mask in zip(origins.tolist(), stored, strict=True):
            assert inside(tiles[f"{split}_regions"]["cells_0000"], top, left, TILE), (split, top, left)
            np.testing.assert_array_equal(mask, ids[top : top + TILE, left : left + TILE])

    whole = prepare_dataset(images, masks, tmp_path / "whole", tile_size=TILE, output_format="zarr",
                            whole_images=True)  # fmt: skip
    store = zarr.open_group(str(tmp_path / "whole" / "data.zarr"), mode="r")
    for split in ("train", "val"):
        y0, y1, x0, x1 = whole[f"{split}_regions"]["cells_0000"]
        group = store[split]
        assert group.attrs["offsets"] == [[y0, x0]] and group.attrs["shapes"] == [[1, y1 - y0, x1 - x0]]
        np.testing.assert_array_equal(group["masks"]["0"][...], ids[y0:y1, x0:x1])
    assert whole["num_val_tiles"] == 3  # the 32 x 96 validation region: a grid of 1 x 3 tiles


def test_too_small_one_image_is_one_line_naming_it_its_size_and_the_tile(tmp_path: Path, capsys):
    images, masks = write_synthetic(tmp_path, count=1, image_size=64, seed=0)
    argv = ["--images", str(images), "--masks", str(masks), "--out", str(tmp_path / "out"), "--tile", "32"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"prepare: error: {images / 'cells_0000.tif'}: image 64x64 is too small to hold out a "
                          "validation region with tile size 32")  # fmt: skip
    assert main([*argv, "--val-fraction", "0"]) == 0  # no validation: nothing to hold out


def test_few_images_each_give_a_region_and_five_split_by_image(tmp_path: Path):
    images, masks = write_synthetic(tmp_path / "four", count=MIN_IMAGES_TO_SPLIT_BY_IMAGE - 1, image_size=96, seed=1)
    four = prepare_dataset(images, masks, tmp_path / "four-out", tile_size=TILE, val_fraction=0.2)
    stems = [f"cells_{i:04d}" for i in range(4)]
    assert four["train_images"] == four["val_images"] == stems
    assert four["val_regions"] == {stem: [64, 96, 0, 96] for stem in stems}  # round(0.2 * 96) = 19: a tile
    images, masks = write_synthetic(tmp_path / "five", count=MIN_IMAGES_TO_SPLIT_BY_IMAGE, image_size=96, seed=1)
    five = prepare_dataset(images, masks, tmp_path / "five-out", tile_size=TILE, val_fraction=0.2)
    assert "val_regions" not in five and len(five["val_images"]) == 1 and len(five["train_images"]) == 4
    # several images, one too small for a region: whole images are held out, as before region splits
    images, masks = write_synthetic(tmp_path / "small", count=3, image_size=64, seed=1)
    small = prepare_dataset(images, masks, tmp_path / "small-out", tile_size=TILE, val_fraction=0.2)
    assert "val_regions" not in small and len(small["val_images"]) == 1 and len(small["train_images"]) == 2
    assert sorted(path.name for path in (tmp_path / "small-out").iterdir()) == [
        "dataset.json", "train-000000.tar", "train-000000.tar.index.json", "val-000000.tar",
        "val-000000.tar.index.json",
    ]  # fmt: skip


@pytest.mark.slow
def test_train_trains_and_validates_on_one_image(one_image, tmp_path: Path):
    images, masks = one_image
    out = tmp_path / "one"
    assert main(["--images", str(images), "--masks", str(masks), "--out", str(out), "--tile", str(TILE)]) == 0
    done = train_tiny_on([f"data.root={out}"], tmp_path / "run", "train.max_steps=4", "train.val_every=2",
                         "train.device=cpu")  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert "masks: instance ids, trained as background / foreground" in done.stderr
    assert "data.mask_kind=auto: instances, from" in done.stderr
    assert re.search(r"step 2 val loss", done.stderr) and re.search(r"step 4 val loss", done.stderr), done.stderr[-3000:]
