"""WebDataset shards as users write them (webdataset's own ShardWriter, their member names and
mask conventions) train with key and mask-kind settings alone, without a copy."""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from unetdist.config import DataConfig
from unetdist.data import build_train_loader
from unetdist.data.samples import DataError, computed_weight_map
from unetdist.data.synthetic import synthetic_cells

TILE, SIZE, COUNT, GLOBAL = 32, 48, 12, 4
# (image member, mask member, how the mask is written, data.mask_kind)
CONVENTIONS = {
    "png+seg.png instances": ("png", "seg.png", "instances", "instances"),
    "tif+mask.tif classes": ("tif", "mask.tif", "classes", "classes"),
    "npy+mask.npy 0/255": ("npy", "mask.npy", "binary255", "binary"),
}


def cells(index: int) -> tuple[np.ndarray, np.ndarray]:
    return synthetic_cells(SIZE, np.random.default_rng(index))


def stored_mask(instances: np.ndarray, how: str) -> np.ndarray:
    if how == "instances":
        return instances  # uint16 ids: webdataset writes a 16-bit PNG
    if how == "classes":
        return (instances > 0).astype(np.uint8)
    return ((instances > 0) * 255).astype(np.uint8)


def write_user_shards(folder: Path, image_key: str, mask_key: str, how: str) -> str:
    """COUNT samples with webdataset.ShardWriter, 5 per shard; the brace pattern of the shards."""
    folder.mkdir()
    with wds.ShardWriter(str(folder / "part-%04d.tar"), maxcount=5, verbose=0) as sink:
        for index in range(COUNT):
            image, instances = cells(index)
            if image_key == "tif":
                image = image.astype(np.uint16) * 200  # a 16-bit microscope TIFF
            sink.write({"__key__": f"cell{index:03d}", image_key: image, mask_key: stored_mask(instances, how)})
    shards = sorted(folder.glob("part-*.tar"))
    return str(folder / f"part-{{0000..{len(shards) - 1:04d}}}.tar")


@pytest.fixture(scope="module")
def user_shards(tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("user-shards")
    return {name: write_user_shards(out / name.split()[0].replace("+", "_"), *spec[:3])
            for name, spec in CONVENTIONS.items()}


def config(pattern: str, image_key: str, mask_key: str, mask_kind: str, **changes) -> DataConfig:
    base = DataConfig(train_shards=pattern, image_key=image_key, mask_key=mask_key, mask_kind=mask_kind,
                      tile_size=TILE, num_workers=0, augment=False)
    return dataclasses.replace(base, **changes)


def one_epoch(data: DataConfig, use_weight_map: str = "auto") -> list[dict]:
    loader = build_train_loader(data, rank=0, world_size=1, seed=1, micro_batch_size=GLOBAL, in_channels=1,
                                num_classes=2, use_weight_map=use_weight_map, global_batch_size=GLOBAL)
    batches = iter(loader)
    return [next(batches) for _ in range(COUNT // GLOBAL)]


@pytest.mark.parametrize("name", list(CONVENTIONS))
def test_user_conventions_train_with_key_and_kind_settings(user_shards, name, caplog):
    image_key, mask_key, how, kind = CONVENTIONS[name]
    with caplog.at_level(logging.INFO, logger="unetdist.data.preflight"):
        batches = one_epoch(config(user_shards[name], image_key, mask_key, kind))
    keys = [key for batch in batches for key in batch["key"]]
    assert Counter(keys) == Counter(f"cell{i:03d}" for i in range(COUNT))  # each sample once per epoch
    masks = np.concatenate([batch["mask"].numpy() for batch in batches])
    assert set(np.unique(masks).tolist()) == {0, 1}  # instance ids and 0/255 became foreground 1
    assert all(batch["image"].dtype == batches[0]["image"].dtype for batch in batches)
    weights_line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("border weight maps"))
    if kind == "instances":  # loss.use_weight_map=auto: computed from the ids in the workers
        assert "computed from the instance masks" in weights_line
        batch = batches[0]
        whole = computed_weight_map(cells(int(batch["key"][0].removeprefix("cell")))[1])
        windows = np.lib.stride_tricks.sliding_window_view(whole, (TILE, TILE))  # the crop is random
        assert (windows == batch["weight"][0].numpy()).all(axis=(2, 3)).any()
        assert whole.max() > 3  # the border term is there: cells touch in these images
    else:  # class and binary masks: no weight map to compute, none stored: plain cross-entropy
        assert "none" in weights_line
        assert all("weight" not in batch for batch in batches)


def test_computed_weight_maps_are_cached_once_per_node_and_equal(user_shards, tmp_path, monkeypatch):
    from unetdist.data import weight_cache

    computed = []

    def counting(instances):
        computed.append(1)
        return computed_weight_map(instances)

    monkeypatch.setattr(weight_cache, "computed_weight_map", counting)
    image_key, mask_key, _, kind = CONVENTIONS["png+seg.png instances"]
    data = config(user_shards["png+seg.png instances"], image_key, mask_key, kind)
    uncached = one_epoch(data) + one_epoch(data)
    assert not computed  # without data.cache_dir: computed in check_sample each time
    cached = dataclasses.replace(data, cache_dir=str(tmp_path / "cache"))
    first, second = one_epoch(cached), one_epoch(cached)
    assert len(computed) == COUNT  # each sample's map computed once over two epochs
    for ours, theirs in zip(first + second, uncached, strict=True):
        assert ours["key"] == theirs["key"] and np.array_equal(ours["weight"].numpy(), theirs["weight"].numpy())


def test_mask_as_instance_ids_is_refused_as_classes_with_the_setting_to_change(user_shards):
    image_key, mask_key, _, _ = CONVENTIONS["png+seg.png instances"]
    data = config(user_shards["png+seg.png instances"], image_key, mask_key, "classes", on_error="skip")
    loader = build_train_loader(data, rank=0, world_size=1, seed=1, micro_batch_size=GLOBAL, in_channels=1,
                                num_classes=2, use_weight_map="auto", global_batch_size=GLOBAL)
    source = loader.stream.source
    result = source.read(0, [0])[0]
    assert isinstance(result, DataError)
    assert "part-0000.tar sample cell000: mask label" in str(result) and "set data.mask_kind=instances" in str(result)


def test_default_member_names_name_what_the_sample_has(user_shards):
    pattern = user_shards["png+seg.png instances"]
    data = config(pattern, "image", "mask", "instances", on_error="skip")
    loader = build_train_loader(data, rank=0, world_size=1, seed=1, micro_batch_size=GLOBAL, in_channels=1,
                                num_classes=2, use_weight_map="auto", global_batch_size=GLOBAL)
    result = loader.stream.source.read(0, [0])[0]
    assert isinstance(result, DataError)
    assert "sample cell000: no member for ['image', 'mask']" in str(result)
    assert "it has ['png', 'seg.png']: set data.image_key and data.mask_key" in str(result)


def test_weight_map_required_but_absent_names_the_settings(user_shards):
    image_key, mask_key, _, kind = CONVENTIONS["tif+mask.tif classes"]
    data = config(user_shards["tif+mask.tif classes"], image_key, mask_key, kind, on_error="skip")
    loader = build_train_loader(data, rank=0, world_size=1, seed=1, micro_batch_size=GLOBAL, in_channels=1,
                                num_classes=2, use_weight_map="true", global_batch_size=GLOBAL)
    result = loader.stream.source.read(0, [0])[0]
    assert isinstance(result, DataError) and "loss.use_weight_map=true" in str(result)
    assert "data.mask_kind=instances" in str(result)


@pytest.mark.slow
def test_real_training_run_on_user_shards(user_shards, tmp_path):
    """The entry point end to end on ShardWriter shards: only member keys and mask kind set."""
    from conftest import train_tiny_on

    pattern = user_shards["png+seg.png instances"]
    data = [f"data.train_shards={pattern}", f"data.val_shards={pattern}", "data.image_key=png",
            "data.mask_key=seg.png", "data.mask_kind=instances"]
    result = train_tiny_on(data, tmp_path / "run", "train.max_steps=30", "train.val_every=0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "border weight maps: computed from the instance masks" in result.stderr
    losses = [float(line.split(" loss ")[1].split()[0]) for line in result.stderr.splitlines() if " loss " in line]
    assert len(losses) >= 4 and losses[-1] < losses[0], losses
