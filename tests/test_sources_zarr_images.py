"""Zarr stores of whole images: prepare --whole-images, sampled training tiles, a fixed validation grid."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from unetdist.config import DataConfig
from unetdist.data import build_train_loader, build_val_loader
from unetdist.data.synthetic import write_synthetic
from unetdist.prepare import main as prepare_main

TILE, GLOBAL, MICRO, SIZE = 32, 8, 2, 100  # 100 = 3 * 32 + 4: the grid's last row/col is shifted inwards
ARGS = dict(seed=5, global_batch_size=GLOBAL, micro_batch_size=MICRO, in_channels=1, num_classes=2, use_weight_map=True)
KEY = re.compile(r"^(?P<stem>.+)_y(?P<top>\d+)_x(?P<left>\d+)$")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole")
    images, masks = write_synthetic(out, count=5, image_size=SIZE, seed=1)
    code = prepare_main(["--images", str(images), "--masks", str(masks), "--out", str(out / "prepared"),
                         "--format", "zarr", "--whole-images", "--tile", str(TILE), "--val-fraction", "0.4"])
    assert code == 0
    return out / "prepared"


def config(root: Path, **changes) -> DataConfig:
    base = DataConfig(format="zarr", root=str(root), tile_size=TILE, num_workers=0, tiles_per_image=6,
                      augment=True, augment_on="device")
    return dataclasses.replace(base, **changes)


def stored(root: Path, split: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    group = zarr.open_group(str(root / "data.zarr"), mode="r", path=split)
    return {stem: (group["images"][str(i)][...], group["masks"][str(i)][...])
            for i, stem in enumerate(group.attrs["images"])}


def global_steps(data: DataConfig, world_size: int, steps: int, start_sample: int = 0) -> list[dict]:
    per_rank = []
    for rank in range(world_size):
        loader = build_train_loader(data, rank=rank, world_size=world_size, start_sample=start_sample, **ARGS)
        batches = iter(loader)
        per_rank.append([[next(batches) for _ in range(GLOBAL // world_size // MICRO)] for _ in range(steps)])
    out = []
    for step in range(steps):
        micro = [batch for rank in range(world_size) for batch in per_rank[rank][step]]
        out.append({"key": [k for b in micro for k in b["key"]], "image": torch.cat([b["image"] for b in micro]),
                    "mask": torch.cat([b["mask"] for b in micro]),
                    "augment": [b["augment"][1] for b in micro]})
    return out


def test_prepare_writes_whole_images_in_2d_chunks(root):
    group = zarr.open_group(str(root / "data.zarr"), mode="r", path="train")
    assert group.attrs["layout"] == "whole-images"
    assert len(group.attrs["images"]) == 3 and group.attrs["shapes"][0] == [1, SIZE, SIZE]
    image, mask, weight = group["images"]["0"], group["masks"]["0"], group["weights"]["0"]
    assert image.shape == (1, SIZE, SIZE) and image.chunks == (1, SIZE, SIZE)  # images < one 256 chunk
    # instance ids stored as ids (uint16), beside the border weights of the whole image
    assert mask.dtype == np.uint16 and weight.dtype == np.float32 and mask.shape == weight.shape == (SIZE, SIZE)
    assert int(mask[...].max()) > 1


@pytest.mark.parametrize("foreground_fraction", [0.0, 0.5])
def test_train_tiles_are_sampled_windows_independent_of_ranks_and_workers(root, foreground_fraction):
    data = config(root, foreground_fraction=foreground_fraction)
    reference = global_steps(data, 1, 3)
    images = stored(root, "train")
    origins = set()
    for step in reference:
        assert step["image"].shape == (GLOBAL, 1, TILE, TILE)
        for key, tile, mask in zip(step["key"], step["image"], step["mask"], strict=True):
            match = KEY.match(key)
            top, left = int(match["top"]), int(match["left"])
            image, full_mask = images[match["stem"]]
            assert np.array_equal(tile.numpy(), image[:, top : top + TILE, left : left + TILE])
            ids = full_mask[top : top + TILE, left : left + TILE]  # stored instance ids: trained as foreground
            assert np.array_equal(mask.numpy(), ids > 0)
            origins.add((top, left))
    assert len(origins) > 12  # random positions, not a grid
    other = global_steps(dataclasses.replace(data, num_workers=2), 2, 3)
    for a, b in zip(reference, other, strict=True):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])
        for pa, pb in zip(a["augment"], b["augment"], strict=True):
            assert np.array_equal(pa, pb)


def test_each_image_gets_tiles_per_image_samples_and_epochs_differ(root):
    data = config(root)
    loader = build_train_loader(data, rank=0, world_size=1, **ARGS)
    assert loader.samples_per_epoch == 24  # 3 images x 6, padded to a multiple of 8
    steps = global_steps(data, 1, 6)
    first = [k for s in steps[:3] for k in s["key"]][:18]
    second = [k for s in steps[3:] for k in s["key"]][:18]
    stems = [KEY.match(k)["stem"] for k in first]
    assert sorted(set(stems.count(s) for s in stems)) == [6]
    assert first != second  # other windows in the next epoch


def test_resume_at_start_sample_gives_the_same_next_samples(root):
    data = config(root)
    straight = global_steps(data, 2, 4)
    resumed = global_steps(data, 1, 2, start_sample=2 * GLOBAL)
    for a, b in zip(straight[2:], resumed, strict=True):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])
    loader = build_train_loader(data, rank=0, world_size=2, **ARGS)
    batches = iter(loader)
    for _ in range(2 * GLOBAL // 2 // MICRO):
        next(batches)
    state = loader.state_dict()
    assert state["start_sample"] == 2 * GLOBAL
    again = build_train_loader(data, rank=0, world_size=2, **ARGS)
    again.load_state_dict(state)
    assert next(iter(again))["key"] == straight[2]["key"][:MICRO]


def test_val_grid_covers_each_image_once_across_two_ranks(root):
    data = config(root, num_workers=2)
    images = stored(root, "val")
    seen: list[str] = []
    for rank in range(2):
        loader = build_val_loader(data, rank=rank, world_size=2, micro_batch_size=3, in_channels=1, num_classes=2,
                                  use_weight_map=True)
        for batch in loader:
            for key, tile in zip(batch["key"], batch["image"], strict=True):
                match = KEY.match(key)
                top, left = int(match["top"]), int(match["left"])
                assert np.array_equal(tile.numpy(), images[match["stem"]][0][:, top : top + TILE, left : left + TILE])
                seen.append(key)
    assert len(seen) == len(set(seen)) == 2 * 16  # 2 val images, a 4 x 4 grid each
    for stem in images:
        covered = np.zeros((SIZE, SIZE), np.int32)
        grid = [KEY.match(k) for k in seen if KEY.match(k)["stem"] == stem]
        for match in grid:
            covered[int(match["top"]) : int(match["top"]) + TILE, int(match["left"]) : int(match["left"]) + TILE] += 1
        assert covered.min() >= 1  # union == image
        assert sorted({int(m["top"]) for m in grid}) == [0, 32, 64, SIZE - TILE]


def test_tile_reads_touch_only_overlapped_chunks_and_bad_chunks_are_named(tmp_path):
    from unetdist.data.samples import DataError, SampleChecks
    from unetdist.data.sources.zarr_images import ZarrImages
    from unetdist.data.writers import ZarrImageWriter

    store = tmp_path / "data.zarr"
    writer = ZarrImageWriter(store, "val", chunk=32)
    image = np.arange(96 * 96, dtype=np.uint16).reshape(1, 96, 96)
    writer.write_image("big", image, np.zeros((96, 96), np.uint8), None)
    writer.close()
    chunk_files = sorted(p for p in (store / "val" / "images" / "0").rglob("*") if p.is_file() and p.name != "zarr.json")
    assert len(chunk_files) == 9  # 3 x 3 chunks of 32 x 32
    (store / "val" / "images" / "0" / "c" / "0" / "2" / "2").write_bytes(b"not zstd")  # the bottom-right chunk
    source = ZarrImages(store, "val", SampleChecks(TILE, 1, 2, False), tiles_per_image=1)
    assert source.counts == [9]
    samples = source.read(0, list(range(9)))
    assert all(not isinstance(s, DataError) for s in samples[:8])
    assert np.array_equal(samples[0].image, image[:, :32, :32])
    assert isinstance(samples[8], DataError) and "big_y64_x64: cannot decode" in str(samples[8])


# ---------------------------------------------------------------- foreground oversampling


SPARSE_H, SPARSE_W = 160, 224


def cells(centres: list[tuple[int, int]]) -> np.ndarray:
    """A sparse mask: 3 x 3 cells (class 1) around ``centres``, background elsewhere."""
    mask = np.zeros((SPARSE_H, SPARSE_W), np.uint8)
    for y, x in centres:
        mask[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2] = 1
    return mask


SPARSE = [cells([(40, 50), (100, 170), (120, 60)]),  # away from the edges: centred tiles are not clamped
          cells([(1, 1), (SPARSE_H - 2, SPARSE_W - 2)])]  # in the corners: clamped to the image


def write_store(store: Path, masks: list[np.ndarray], **writer_args) -> None:
    from unetdist.data.writers import ZarrImageWriter

    writer = ZarrImageWriter(store, "train", **writer_args)
    for i, mask in enumerate(masks):
        image = (mask * 200 + i).astype(np.uint8)[None]
        writer.write_image(f"sparse{i}", image, mask, np.ones(mask.shape, np.float32))
    writer.close()


def images_source(store: Path, foreground_fraction: float):
    from unetdist.data.samples import SampleChecks
    from unetdist.data.sources.zarr_images import ZarrImages

    return ZarrImages(store, "train", SampleChecks(TILE, 1, 2, True), tiles_per_image=6, sampled=True,
                      foreground_fraction=foreground_fraction)


def random_words(count: int, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    from unetdist.data.augment import sample_words

    units = np.arange(count) % len(SPARSE)
    return units, sample_words(seed, np.arange(count))


@pytest.fixture(scope="module")
def sparse(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sparse")
    write_store(out / "data.zarr", SPARSE)
    return out


def test_writer_keeps_every_foreground_pixel_in_raster_order_up_to_the_cap(sparse, tmp_path):
    from unetdist.data.layout import FOREGROUND_CAP, foreground_points

    group = zarr.open_group(str(sparse / "data.zarr"), mode="r", path="train")
    assert group.attrs["foreground"] == {"cap": FOREGROUND_CAP, "seed": 0, "counts": [27, 18]}
    for i, mask in enumerate(SPARSE):
        table = group["foreground"][str(i)][...]
        assert table.dtype == np.int32 and np.array_equal(table, np.argwhere(mask > 0))
    block = np.zeros((64, 64), np.uint8)
    block[10:30, 20:40] = 2  # 400 foreground pixels, any class
    capped = foreground_points(block, cap=50)
    assert capped.shape == (50, 2) and len({tuple(p) for p in capped}) == 50
    assert (block[capped[:, 0], capped[:, 1]] > 0).all()
    assert (np.diff(capped[:, 0] * 64 + capped[:, 1]) > 0).all()  # raster order
    write_store(tmp_path / "a.zarr", [block], foreground_cap=50)
    write_store(tmp_path / "b.zarr", [block], foreground_cap=50)
    tables = [zarr.open_array(str(tmp_path / name), mode="r", path="train/foreground/0")[...]
              for name in ("a.zarr", "b.zarr")]
    assert np.array_equal(tables[0], capped) and np.array_equal(tables[1], capped)  # a fixed seed


def test_foreground_fraction_one_centres_every_training_tile_on_foreground(sparse):
    source = images_source(sparse / "data.zarr", 1.0)
    units, words = random_words(40)
    samples = source.read_windows(units, np.zeros_like(units), words)
    for unit, window, sample in zip(units, source.windows(units, words), samples, strict=True):
        top, left = window
        assert np.array_equal(sample.mask, SPARSE[unit][top : top + TILE, left : left + TILE])
        assert sample.mask.any()
        if unit == 0:
            assert sample.mask[TILE // 2, TILE // 2] == 1  # the tile's centre pixel is a foreground pixel
    loader_data = config(sparse, foreground_fraction=1.0)
    for step in global_steps(loader_data, 1, 2):  # through open_source and the loader
        assert all(mask.any() for mask in step["mask"])


def test_windows_match_crop_windows_on_the_whole_mask(sparse):
    from unetdist.data.augment import crop_windows

    for fraction in (0.0, 0.5, 1.0):
        units, words = random_words(64, seed=int(fraction * 10))
        windows = images_source(sparse / "data.zarr", fraction).windows(units, words)
        assert windows == crop_windows([SPARSE[u] for u in units], TILE, words, fraction)


def test_foreground_share_without_oversampling_is_the_images(sparse):
    def share(fraction: float) -> float:
        source = images_source(sparse / "data.zarr", fraction)
        units, words = random_words(4000)
        tiles = [SPARSE[u][top : top + TILE, left : left + TILE] for u, (top, left) in
                 zip(units, source.windows(units, words), strict=True)]
        return float(np.mean([tile.mean() for tile in tiles]))

    image_share = float(np.mean([mask.mean() for mask in SPARSE]))
    assert 0.5 * image_share < share(0.0) < 2 * image_share
    assert share(1.0) > 10 * image_share and share(0.5) > 5 * image_share


def test_an_image_without_foreground_gets_uniform_windows(tmp_path):
    write_store(tmp_path / "data.zarr", [np.zeros((SPARSE_H, SPARSE_W), np.uint8)] * 2)
    group = zarr.open_group(str(tmp_path / "data.zarr"), mode="r", path="train")
    assert group.attrs["foreground"]["counts"] == [0, 0] and group["foreground"]["0"].shape == (0, 2)
    units, words = random_words(32)
    assert images_source(tmp_path / "data.zarr", 1.0).windows(units, words) == \
        images_source(tmp_path / "data.zarr", 0.0).windows(units, words)


def test_a_store_without_foreground_tables_loads_and_warns(tmp_path, caplog):
    import shutil

    store = tmp_path / "data.zarr"
    write_store(store, SPARSE)
    del zarr.open_group(str(store), mode="a", path="train").attrs["foreground"]  # as written before the tables
    shutil.rmtree(store / "train" / "foreground")
    with caplog.at_level("WARNING", logger="unetdist.data.sources.zarr_images"):
        source = images_source(store, 0.5)
    assert str(store) in caplog.text and "re-run" in caplog.text
    units, words = random_words(32)
    assert source.windows(units, words) == images_source(store, 0.0).windows(units, words)
    samples = source.read_windows(units, np.zeros_like(units), words)
    assert [s.mask.shape for s in samples] == [(TILE, TILE)] * 32
    assert len([r for r in caplog.records if r.name == "unetdist.data.sources.zarr_images"]) == 1  # one warning
