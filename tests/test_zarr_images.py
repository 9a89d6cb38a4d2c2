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
from unetdist.data.prepare import main as prepare_main
from unetdist.data.prepare import write_synthetic

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
    assert mask.dtype == np.uint8 and weight.dtype == np.float32 and mask.shape == weight.shape == (SIZE, SIZE)


def test_train_tiles_are_sampled_windows_independent_of_ranks_and_workers(root):
    data = config(root)
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
            assert np.array_equal(mask.numpy(), full_mask[top : top + TILE, left : left + TILE])
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
    from unetdist.data.zarr_images import ZarrImages, ZarrImageWriter

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
