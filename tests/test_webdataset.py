"""Shard loader: exact rank/worker split, val split, decode-time checks, aligned augmentation."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from unetdist.data import transforms
from unetdist.data.prepare import prepare_dataset, write_synthetic
from unetdist.data.webdataset import (
    TileChecks,
    TrainTileStream,
    ValTileStream,
    assign_shards,
    build_train_loader,
    build_val_loader,
    list_shards,
    make_loader,
)

TILE = 32
CHECKS = TileChecks(tile_size=TILE, in_channels=1, num_classes=2, use_weight_map=True)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """6 synthetic 96x96 images -> 9 tiles each; 5 train images in 8 shards, 1 val image in 2."""
    out = tmp_path_factory.mktemp("shards")
    images, masks = write_synthetic(out, count=6, image_size=96, seed=0)
    prepare_dataset(images, masks, out, tile_size=TILE, shard_size=6, val_fraction=0.2, seed=0)
    return out


def write_shards(folder: Path, samples: list[dict], per_shard: int = 2) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    pattern = str(folder / "s-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as writer:
        for sample in samples:
            writer.write(sample)
    return sorted(str(path) for path in folder.glob("s-*.tar"))


def hand_sample(key: str, channels: int = 1, size: int = TILE, label: int = 1, weight: bool = True) -> dict:
    mask = np.zeros((size, size), np.uint8)
    mask[: size // 2] = label
    sample = {"__key__": key, "image.npy": np.ones((channels, size, size), np.uint8), "mask.npy": mask}
    if weight:
        sample["weight.npy"] = np.ones((size, size), np.float32)
    return sample


def read_keys(dataset, num_workers: int) -> list[str]:
    loader = make_loader(
        dataset, micro_batch_size=3, num_workers=num_workers, pin_memory=False, drop_last=False
    )
    return [key for batch in loader for key in batch["key"]]


@pytest.mark.parametrize(
    ("world_size", "num_workers", "num_shards"), [(1, 0, 1), (2, 2, 4), (2, 2, 9), (3, 4, 13)]
)
def test_assign_shards_is_an_exact_seeded_partition(world_size, num_workers, num_shards):
    shards = [f"s{i}" for i in range(num_shards)]
    workers = max(1, num_workers)
    orders = []
    for epoch in range(3):
        slots = [
            assign_shards(shards, epoch, 5, rank, world_size, worker, num_workers)
            for rank, worker in itertools.product(range(world_size), range(workers))
        ]
        assert sorted(itertools.chain(*slots)) == sorted(shards)
        assert min(map(len, slots)) >= num_shards // (world_size * workers)
        assert slots == [
            assign_shards(shards, epoch, 5, rank, world_size, worker, num_workers)
            for rank, worker in itertools.product(range(world_size), range(workers))
        ]
        orders.append(list(itertools.chain(*slots)))
    if num_shards >= 4:
        assert len({tuple(order) for order in orders}) > 1, (
            "the shard permutation should change with the epoch"
        )


def test_too_few_shards_for_readers_is_an_error(prepared: Path):
    shards = list_shards(str(prepared), "train")[:3]
    with pytest.raises(
        ValueError, match=r"3 train shard\(s\) for 2 rank\(s\) x 2 data worker\(s\) = 4 readers"
    ):
        TrainTileStream(shards, checks=CHECKS, rank=0, world_size=2, num_workers=2, seed=0, augment=False)


def test_two_ranks_two_workers_read_every_train_tile_once_per_epoch(prepared: Path):
    shards = list_shards(str(prepared), "train")
    assert len(shards) == 8
    for epoch in (0, 1):
        per_rank = [
            read_keys(
                TrainTileStream(
                    shards,
                    checks=CHECKS,
                    rank=rank,
                    world_size=2,
                    num_workers=2,
                    seed=1,
                    augment=True,
                    shuffle_buffer=8,
                    epochs=1,
                    start_epoch=epoch,
                ),
                num_workers=2,
            )
            for rank in (0, 1)
        ]
        counts = Counter(per_rank[0] + per_rank[1])
        assert len(counts) == 45 and set(counts.values()) == {1}
        assert not set(per_rank[0]) & set(per_rank[1])
    again = TrainTileStream(
        shards, checks=CHECKS, rank=0, world_size=2, num_workers=0, seed=1, augment=True, epochs=1
    )
    first, second = list(again), list(again)
    assert [s["key"] for s in first] == [s["key"] for s in second]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, second, strict=True))


def test_train_loader_repeats_forever_with_batch_format(prepared: Path):
    loader = build_train_loader(
        list_shards(str(prepared), "train"),
        tile_size=24,
        micro_batch_size=4,
        num_workers=2,
        rank=1,
        world_size=2,
        seed=0,
        in_channels=1,
        num_classes=2,
        use_weight_map=True,
        augment=True,
        shuffle_buffer=16,
    )
    batches = list(itertools.islice(loader, 12))  # 48 samples > this rank's ~23 per epoch
    batch = batches[-1]
    assert batch["image"].dtype == torch.float32 and batch["image"].shape == (4, 1, 24, 24)
    assert batch["mask"].dtype == torch.int64 and batch["mask"].shape == (4, 24, 24)
    assert batch["weight"].dtype == torch.float32 and batch["weight"].shape == (4, 24, 24)
    assert isinstance(batch["key"], list) and len(batch["key"]) == 4
    flat = batch["image"].flatten(1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(flat.std(1, correction=0), torch.ones(4), atol=1e-3, rtol=0)


def test_val_split_over_two_ranks_and_two_workers_is_exact(prepared: Path):
    shards = list_shards(str(prepared), "val")
    assert len(shards) == 2  # fewer val shards than the 4 readers
    seen = []
    for rank in (0, 1):
        keys = read_keys(ValTileStream(shards, checks=CHECKS, rank=rank, world_size=2, num_workers=2), 2)
        seen += keys
        assert abs(len(keys) - 9 / 2) <= 0.5
    assert sorted(seen) == sorted(
        read_keys(ValTileStream(shards, checks=CHECKS, rank=0, world_size=1, num_workers=0), 0)
    )
    assert len(seen) == len(set(seen)) == 9
    loader = build_val_loader(
        shards,
        tile_size=24,
        micro_batch_size=4,
        num_workers=0,
        rank=0,
        world_size=1,
        in_channels=1,
        num_classes=2,
        use_weight_map=False,
    )
    batches = list(loader)
    assert [len(b["key"]) for b in batches] == [4, 4, 1] and "weight" not in batches[0]


def test_list_shards_pattern_and_errors(prepared: Path, tmp_path: Path):
    root_list = list_shards(str(prepared), "train")
    assert list_shards(None, "train", str(prepared / "train-{000000..000007}.tar")) == root_list
    with pytest.raises(ValueError, match="do not exist"):
        list_shards(None, "train", str(prepared / "train-{000000..000009}.tar"))
    with pytest.raises(ValueError, match=str(tmp_path / "dataset.json")):
        list_shards(str(tmp_path), "train")


@pytest.mark.parametrize(
    ("bad", "checks", "message"),
    [
        (
            hand_sample("bad_label", label=3),
            CHECKS,
            r"sample bad_label: mask label 3 out of range for num_classes=2",
        ),
        (
            hand_sample("rgb", channels=3),
            CHECKS,
            r"sample rgb: image shape \(3, 32, 32\), expected \[1, H, W\]",
        ),
        (hand_sample("no_w", weight=False), CHECKS, r"sample no_w: missing \['weight.npy'\]"),
        (
            hand_sample("small", size=16),
            CHECKS,
            r"sample small: tile \(16, 16\) is smaller than data.tile_size=32",
        ),
    ],
)
def test_bad_samples_are_errors_naming_shard_and_key(tmp_path: Path, bad, checks, message):
    shards = write_shards(tmp_path, [hand_sample("good_a"), hand_sample("good_b"), bad])
    stream = TrainTileStream(
        shards, checks=checks, rank=0, world_size=1, num_workers=0, seed=0, augment=False, epochs=1
    )
    with pytest.raises(ValueError, match=message) as info:
        list(stream)
    assert f"shard {shards[1]}" in str(info.value)


def test_weight_not_required_without_weight_map(tmp_path: Path):
    shards = write_shards(tmp_path, [hand_sample("a", weight=False), hand_sample("b", weight=False)])
    checks = TileChecks(tile_size=TILE, in_channels=1, num_classes=2, use_weight_map=False)
    items = list(ValTileStream(shards, checks=checks, rank=0, world_size=1, num_workers=0))
    assert [item["key"] for item in items] == ["a", "b"] and "weight" not in items[0]


def test_transforms_keep_image_mask_weight_aligned():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(2, 40, 36), dtype=np.uint16)
    threshold = 128
    mask = (image[0] > threshold).astype(np.uint8)
    weight = image[1].astype(np.float32)
    for _ in range(16):
        cropped = transforms.random_crop(image, mask, weight, 24, rng)
        out_image, out_mask, out_weight = transforms.random_flip_rot90(*cropped, rng)
        assert out_image.shape == (2, 24, 24)
        np.testing.assert_array_equal(out_mask, out_image[0] > threshold)
        np.testing.assert_array_equal(out_weight, out_image[1])
    centre = transforms.center_crop(image, mask, None, 24)
    np.testing.assert_array_equal(centre[0], image[:, 8:32, 6:30])
    assert centre[2] is None
    normalised = transforms.zscore_per_channel(image)
    assert normalised.dtype == np.float32
    np.testing.assert_allclose(normalised.mean(axis=(1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(normalised.std(axis=(1, 2)), 1, atol=1e-4)


def test_stream_augmentation_keeps_alignment(tmp_path: Path):
    rng = np.random.default_rng(1)
    samples = []
    for index in range(4):
        image = rng.integers(0, 256, size=(1, 40, 40)).astype(np.uint8)
        samples.append(
            {
                "__key__": f"t{index}",
                "image.npy": image,
                "mask.npy": (image[0] > 100).astype(np.uint8),
                "weight.npy": image[0].astype(np.float32),  # a copy of the image to follow it through
            }
        )
    shards = write_shards(tmp_path, samples)
    stream = TrainTileStream(
        shards, checks=CHECKS, rank=0, world_size=1, num_workers=0, seed=0, augment=True, epochs=3
    )
    for item in stream:
        assert torch.equal(item["mask"], (item["weight"] > 100).long())
        expected = torch.from_numpy(transforms.zscore_per_channel(item["weight"].numpy()[None]))
        torch.testing.assert_close(item["image"], expected)
