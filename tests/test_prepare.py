"""prepare: folders -> shards + dataset.json, the synthetic generator, and input errors."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from unetdist.data.imageio import PrepareError
from unetdist.data.layout import sample_key, tile_origins
from unetdist.data.prepare import prepare_dataset, split_by_image
from unetdist.data.synthetic import synthetic_cells
from unetdist.prepare import main
from unetdist.weight_map import border_weight_map

TILE = 40  # does not divide 96: the last row/column of tiles is shifted inwards


def read_shard(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """{key: {field: array}} of one shard, read with tarfile (independently of the loader)."""
    samples: dict[str, dict[str, np.ndarray]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, field = member.name.split(".", 1)
            samples.setdefault(key, {})[field] = np.load(io.BytesIO(tar.extractfile(member).read()))
    return samples


@pytest.fixture(scope="module")
def synthetic_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    argv = ["--synthetic", "6", "--image-size", "96", "--tile", str(TILE), "--shard-size", "5"]
    assert main([*argv, "--val-fraction", "0.34", "--seed", "3", "--out", str(out)]) == 0
    return out


def test_synthetic_cells_is_seeded_and_plausible():
    image, instances = synthetic_cells(128, np.random.default_rng(7))
    again, _ = synthetic_cells(128, np.random.default_rng(7))
    assert (
        image.dtype == np.uint8
        and instances.dtype == np.uint16
        and image.shape == instances.shape == (128, 128)
    )
    np.testing.assert_array_equal(image, again)
    cells = instances > 0
    assert 0.25 < cells.mean() < 0.75
    assert np.array_equal(np.unique(instances)[1:], np.arange(1, instances.max() + 1))  # consecutive ids
    assert image[cells].mean() > image[~cells].mean() + 30
    best_threshold_accuracy = max(((image > t) == cells).mean() for t in range(256))
    assert best_threshold_accuracy < 0.97, "a global threshold should not solve the task"
    touching = (instances[:, 1:] != instances[:, :-1]) & (instances[:, 1:] > 0) & (instances[:, :-1] > 0)
    assert touching.sum() > 20, "many cells should touch"


def test_tile_origins_cover_and_end_at_edge():
    assert tile_origins(96, 32) == [0, 32, 64]
    assert tile_origins(96, 40) == [0, 40, 56]
    assert tile_origins(40, 40) == [0]
    with pytest.raises(ValueError):
        tile_origins(30, 40)


def test_split_by_image_is_seeded_and_disjoint():
    stems = [f"s{i}" for i in range(10)]
    train, val = split_by_image(stems, 0.2, seed=1)
    assert sorted(train + val) == stems and len(val) == 2
    assert split_by_image(stems, 0.2, seed=1) == (train, val)
    assert split_by_image(stems, 0.2, seed=2) != (train, val)
    assert len(split_by_image(stems[:2], 0.1, seed=0)[1]) == 1  # at least one val image
    assert split_by_image(stems, 0.0, seed=0)[1] == []
    assert sample_key("a.b.c", 4, 8) == "a_b_c_y4_x8"


def test_synthetic_end_to_end_counts_dtypes_keys(synthetic_out: Path):
    meta = json.loads((synthetic_out / "dataset.json").read_text())
    assert meta["format"] == "webdataset" and meta["tile_size"] == TILE and meta["in_channels"] == 1
    assert meta["num_classes"] == 2 and meta["has_weight_map"] and meta["image_dtype"] == "uint8"
    assert len(meta["val_images"]) == 2 and not set(meta["val_images"]) & set(meta["train_images"])
    tiles_per_image = len(tile_origins(96, TILE)) ** 2
    all_keys: list[str] = []
    for split in ("train", "val"):
        keys = []
        for name in meta[f"{split}_shards"]:
            samples = read_shard(synthetic_out / name)
            assert 0 < len(samples) <= 5
            for sample in samples.values():
                assert sample["image.npy"].dtype == np.uint8 and sample["image.npy"].shape == (1, TILE, TILE)
                assert sample["mask.npy"].dtype == np.uint8 and sample["mask.npy"].shape == (TILE, TILE)
                assert sample["weight.npy"].dtype == np.float32 and sample["weight.npy"].shape == (TILE, TILE)
            keys += samples
        assert len(keys) == meta[f"num_{split}_tiles"] == tiles_per_image * len(meta[f"{split}_images"])
        assert {key.rsplit("_y", 1)[0] for key in keys} == set(meta[f"{split}_images"])  # split by image
        all_keys += keys
    assert len(all_keys) == len(set(all_keys))


def test_shard_tiles_are_crops_of_whole_image_weight_map(synthetic_out: Path):
    meta = json.loads((synthetic_out / "dataset.json").read_text())
    samples = {k: v for name in meta["train_shards"] for k, v in read_shard(synthetic_out / name).items()}
    stem = meta["train_images"][0]
    image = tifffile.imread(synthetic_out / "raw" / "images" / f"{stem}.tif")
    instances = tifffile.imread(synthetic_out / "raw" / "masks" / f"{stem}.tif")
    assert instances.dtype == np.uint16
    weight = border_weight_map(instances, w0=10.0, sigma=5.0)
    for top in tile_origins(96, TILE):
        for left in tile_origins(96, TILE):
            sample = samples[f"{stem}_y{top}_x{left}"]
            window = (slice(top, top + TILE), slice(left, left + TILE))
            np.testing.assert_array_equal(sample["image.npy"][0], image[window])
            np.testing.assert_array_equal(sample["mask.npy"], instances[window] > 0)
            np.testing.assert_allclose(sample["weight.npy"], weight[window], rtol=1e-6)


def _write_pair(
    images: Path, masks: Path, stem: str, image: np.ndarray, mask: np.ndarray, suffix=".tif"
) -> None:
    images.mkdir(exist_ok=True)
    masks.mkdir(exist_ok=True)
    for folder, array in ((images, image), (masks, mask)):
        if suffix == ".png":
            Image.fromarray(array).save(folder / f"{stem}.png")
        else:
            tifffile.imwrite(folder / f"{stem}{suffix}", array)


def test_class_masks_rgb_png_and_dotted_stems(tmp_path: Path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    rng = np.random.default_rng(0)
    for stem in ("plate.1", "plate.2"):
        rgb = rng.integers(0, 255, size=(50, 60, 3), dtype=np.uint8)
        _write_pair(images, masks, stem, rgb, rng.integers(0, 4, size=(50, 60), dtype=np.uint8), ".png")
    meta = prepare_dataset(
        images, masks, tmp_path / "out", mask_kind="classes", tile_size=32, val_fraction=0.5
    )
    assert meta["in_channels"] == 3 and meta["num_classes"] == 4 and not meta["has_weight_map"]
    samples = read_shard(tmp_path / "out" / meta["train_shards"][0])
    stem = meta["train_images"][0]
    key = f"{stem.replace('.', '_')}_y18_x28"
    assert samples[key]["image.npy"].shape == (3, 32, 32) and "weight.npy" not in samples[key]
    rgb = np.asarray(Image.open(images / f"{stem}.png"))
    np.testing.assert_array_equal(samples[key]["image.npy"], rgb[18:50, 28:60].transpose(2, 0, 1))


def test_unmatched_stems_listed_for_both_folders(tmp_path: Path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    square = np.zeros((64, 64), np.uint16)
    _write_pair(images, masks, "both", square, square)
    tifffile.imwrite(images / "only_image.tif", square)
    tifffile.imwrite(masks / "only_mask.tif", square)
    with pytest.raises(PrepareError, match="only_image.tif") as info:
        prepare_dataset(images, masks, tmp_path / "out", tile_size=32)
    assert "only_mask.tif" in str(info.value) and "'both.tif'" not in str(info.value)


def test_size_mismatch_and_too_small_name_the_file(tmp_path: Path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    _write_pair(images, masks, "odd", np.zeros((64, 64), np.uint8), np.zeros((64, 60), np.uint16))
    with pytest.raises(PrepareError, match="odd.tif"):
        prepare_dataset(images, masks, tmp_path / "out", tile_size=32)
    with pytest.raises(PrepareError, match=r"odd.tif.*smaller than the tile"):
        _write_pair(images, masks, "odd", np.zeros((64, 60), np.uint8), np.zeros((64, 60), np.uint16))
        prepare_dataset(images, masks, tmp_path / "out", tile_size=62)


def test_main_reports_one_line_error_and_returns_2(tmp_path: Path, capsys):
    images, masks = tmp_path / "images", tmp_path / "masks"
    square = np.zeros((64, 64), np.uint16)
    _write_pair(images, masks, "a", square, square)
    tifffile.imwrite(images / "b.tif", square)
    code = main(
        ["--images", str(images), "--masks", str(masks), "--out", str(tmp_path / "out"), "--tile", "32"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("prepare: error:") and "b.tif" in err and err.count("\n") == 1
    assert "Traceback" not in err
