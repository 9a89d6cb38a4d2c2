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
    assert meta["mask_kind"] == "instances" and "val_regions" not in meta  # 6 images: split by image
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
                assert sample["mask.npy"].dtype == np.uint16 and sample["mask.npy"].shape == (TILE, TILE)
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
            np.testing.assert_array_equal(sample["mask.npy"], instances[window])  # the ids, not 0/1
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


# ---------------------------------------------------------------- re-running, and bad input named


def _cells_folders(folder: Path, count: int, size: int = 64) -> tuple[Path, Path]:
    """``count`` copies of one synthetic cell image and its instance mask, as TIFFs."""
    image, instances = synthetic_cells(size, np.random.default_rng(5))
    images, masks = folder / "images", folder / "masks"
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        _write_pair(images, masks, f"cells_{index:03d}", image, instances)
    return images, masks


def _hashes(folder: Path) -> dict[str, str]:
    import hashlib

    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _leftovers(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*")) + sorted(out.glob(f".{out.name}.*"))


@pytest.mark.parametrize(("first", "second"), [("webdataset", "zarr"), ("zarr", "webdataset")])
def test_failed_rerun_keeps_the_old_data_set_byte_identical(tmp_path: Path, capsys, first, second):
    images, masks = _cells_folders(tmp_path, 3)
    out = tmp_path / "out"
    argv = ["--images", str(images), "--masks", str(masks), "--out", str(out), "--tile", "32"]
    assert main([*argv, "--format", first, "--shard-size", "2"]) == 0
    (out / "notes.txt").write_text("the user's own file\n")
    before = _hashes(out)
    assert "dataset.json" in before and len(before) > 3
    _write_pair(images, masks, "cells_bad", np.zeros((64, 64), np.uint8), np.zeros((64, 60), np.uint16))
    capsys.readouterr()

    assert main([*argv, "--format", second]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prepare: error: ") and "cells_bad.tif" in err.splitlines()[0]
    assert "Traceback" not in err
    assert _hashes(out) == before and not _leftovers(out)

    # a good re-run replaces prepare's own output, in another format, and keeps the rest
    (images / "cells_bad.tif").unlink()
    (masks / "cells_bad.tif").unlink()
    assert main([*argv, "--format", second]) == 0
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["format"] == second and (out / "notes.txt").read_text() == "the user's own file\n"
    assert (out / "data.zarr").is_dir() == (second == "zarr")
    shards = sorted(meta["train_shards"] + meta["val_shards"])
    assert sorted(path.name for path in out.glob("*.tar")) == shards
    assert not _leftovers(out)


@pytest.mark.slow
@pytest.mark.parametrize(("signal_name", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_interrupted_prepare_keeps_the_old_data_set(tmp_path: Path, signal_name: str, code: int):
    import os
    import signal
    import subprocess
    import sys
    import time

    images, masks = _cells_folders(tmp_path / "old", 2)
    out = tmp_path / "out"
    prepare_dataset(images, masks, out, tile_size=32, shard_size=4)
    before = _hashes(out)
    images, masks = _cells_folders(tmp_path / "new", 60, size=128)  # seconds of work to interrupt
    argv = ["--images", str(images), "--masks", str(masks), "--out", str(out), "--tile", "32"]
    process = subprocess.Popen(
        [sys.executable, "-m", "unetdist.prepare", *argv],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + 60
    while not any(tmp_path.glob(".out.partial-*/*")) and time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.01)
    process.send_signal(getattr(signal, signal_name))
    _, err = process.communicate(timeout=60)
    assert process.returncode == code, err
    assert err.startswith("prepare: interrupted") and str(out) in err and "Traceback" not in err
    assert _hashes(out) == before and not _leftovers(out)


def test_huge_instance_ids_give_the_weights_of_sequential_ids(tmp_path: Path):
    """uint32 instance masks with ids near 1e9 (as some tools write them) are renumbered first."""
    image, instances = synthetic_cells(64, np.random.default_rng(2))
    huge = np.where(instances > 0, instances.astype(np.uint32) * 1_000_003 + 1_000_000_000, 0)
    huge = huge.astype(np.uint32)
    _write_pair(tmp_path / "images", tmp_path / "masks", "huge", image, huge)
    out = tmp_path / "out"
    argv = ["--images", str(tmp_path / "images"), "--masks", str(tmp_path / "masks"), "--out", str(out)]
    assert main([*argv, "--tile", "32", "--val-fraction", "0"]) == 0
    samples = read_shard(out / json.loads((out / "dataset.json").read_text())["train_shards"][0])
    expected = border_weight_map(instances)
    for top in (0, 32):
        for left in (0, 32):
            window = (slice(top, top + 32), slice(left, left + 32))
            np.testing.assert_array_equal(samples[f"huge_y{top}_x{left}"]["weight.npy"], expected[window])
            # stored renumbered 1..K in their order: the synthetic ids again, and uint16
            stored = samples[f"huge_y{top}_x{left}"]["mask.npy"]
            assert stored.dtype == np.uint16 and np.array_equal(stored, instances[window])


def test_more_than_65535_cells_are_stored_as_uint32_and_widen_the_zarr_mask(tmp_path: Path):
    """One image of uint16 ids, then one of 256 x 288 = 73,728 cells: the Zarr mask array, made
    uint16 for the first, is rewritten as uint32 and keeps the first image's tiles."""
    import zarr

    rng = np.random.default_rng(4)
    few = synthetic_cells(64, rng)[1]
    many = (np.arange(256 * 288, dtype=np.uint32) + 1).reshape(256, 288)
    _write_pair(tmp_path / "images", tmp_path / "masks", "a", np.zeros((64, 64), np.uint8), few)
    _write_pair(tmp_path / "images", tmp_path / "masks", "b", np.zeros((256, 288), np.uint8), many)
    meta = prepare_dataset(tmp_path / "images", tmp_path / "masks", tmp_path / "out", tile_size=32, val_fraction=0,
                           weight_map=False, output_format="zarr")  # fmt: skip
    group = zarr.open_group(str(tmp_path / "out" / "data.zarr"), mode="r", path="train")
    assert meta["mask_kind"] == "instances" and group["mask"].dtype == np.uint32
    raw = {"a": few, "b": many}
    for (image, top, left), mask in zip(group["origin"][...].tolist(), group["mask"][...], strict=True):
        stem = group.attrs["images"][image]
        np.testing.assert_array_equal(mask, raw[stem][top : top + 32, left : left + 32])


def test_binary_255_masks_need_mask_kind_binary(tmp_path: Path, capsys):
    images, masks = tmp_path / "images", tmp_path / "masks"
    _, instances = synthetic_cells(64, np.random.default_rng(3))
    binary = np.where(instances > 0, 255, 0).astype(np.uint8)
    _write_pair(images, masks, "binary", np.zeros((64, 64), np.uint8), binary, ".png")
    argv = ["--images", str(images), "--masks", str(masks), "--out", str(tmp_path / "out"), "--tile", "32"]
    assert main([*argv, "--mask-kind", "classes"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"prepare: error: {masks / 'binary.png'}: labels 0/255, a binary mask: as class ids they would "
        "make 256 classes; binary masks are 0/1, and --mask-kind binary maps 255 -> 1\n"
    )
    assert main([*argv, "--mask-kind", "binary", "--val-fraction", "0"]) == 0
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert meta["num_classes"] == 2 and not meta["has_weight_map"] and meta["source"]["mask_kind"] == "binary"
    assert meta["mask_kind"] == "binary"
    sample = read_shard(tmp_path / "out" / meta["train_shards"][0])["binary_y0_x0"]
    np.testing.assert_array_equal(sample["mask.npy"], binary[:32, :32] // 255)


def test_unlabelled_planes_are_taken_as_channels_with_a_warning(tmp_path: Path, caplog):
    images, masks = tmp_path / "images", tmp_path / "masks"
    mask = np.zeros((64, 64), np.uint16)
    _write_pair(images, masks, "stack", np.zeros((64, 64), np.uint8), mask)
    tifffile.imwrite(images / "stack.tif", np.zeros((3, 64, 64), np.uint16), metadata={"axes": "QYX"})
    with caplog.at_level("WARNING", logger="unetdist.data.imageio"):
        meta = prepare_dataset(images, masks, tmp_path / "out", tile_size=32, val_fraction=0)
    assert meta["in_channels"] == 3
    (warning,) = caplog.messages
    assert warning.startswith(f"{images / 'stack.tif'}: a stack of 3 planes (shape (3, 64, 64)")
    assert "model.in_channels=3" in warning and "--spatial-dims 3" in warning
    caplog.clear()
    tifffile.imwrite(images / "stack.tif", np.zeros((3, 64, 64), np.uint16), metadata={"axes": "CYX"})
    with caplog.at_level("WARNING", logger="unetdist.data.imageio"):
        meta = prepare_dataset(images, masks, tmp_path / "out", tile_size=32, val_fraction=0)
    assert meta["in_channels"] == 3
    assert not caplog.messages  # channels, not planes


def test_a_failed_swap_moves_the_old_data_set_back(tmp_path: Path, capsys):
    images, masks = _cells_folders(tmp_path, 2)
    out = tmp_path / "out"
    argv = ["--images", str(images), "--masks", str(masks), "--out", str(out), "--tile", "32"]
    assert main([*argv, "--val-fraction", "0"]) == 0
    (out / "val-000000.tar").mkdir()  # not prepare's (a folder): the new val shard cannot move in
    before = _hashes(out)
    capsys.readouterr()
    assert main([*argv, "--val-fraction", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prepare: error: ") and f"{out / 'val-000000.tar'}'" in err and err.count("\n") == 1
    assert _hashes(out) == before and (out / "val-000000.tar").is_dir() and not _leftovers(out)


def test_a_failed_first_run_leaves_no_output_folder(tmp_path: Path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    _write_pair(images, masks, "bad", np.zeros((64, 64), np.uint8), np.zeros((64, 60), np.uint16))
    with pytest.raises(PrepareError, match="bad.tif"):
        prepare_dataset(images, masks, tmp_path / "out", tile_size=32)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["images", "masks"]
