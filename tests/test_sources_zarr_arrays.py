"""A Zarr store of the user's own arrays (zarr.create_array, v2 or v3, any paths) trains in place."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import train_tiny_on

from unetdist.config import DataConfig
from unetdist.data import build_train_loader, build_val_loader
from unetdist.data.loader import sample_checks
from unetdist.data.sources import open_source
from unetdist.data.synthetic import synthetic_cells

N, SIZE, TILE = 20, 48, 32


def write_pair(store: Path, zarr_format: int, image_path: str, mask_path: str, channel_axis: bool) -> None:
    """Images and masks written by zarr itself, as a user would: chunked by sample and by space."""
    pairs = [synthetic_cells(SIZE, np.random.default_rng(i)) for i in range(N)]
    images = np.stack([image.astype(np.uint16) * 100 for image, _ in pairs])
    masks = np.stack([(instances > 0).astype(np.uint8) for _, instances in pairs])
    if channel_axis:
        images = images[:, None]
    image = zarr.create_array(str(store), name=image_path, shape=images.shape, dtype=images.dtype,
                              chunks=(4,) + images.shape[1:-2] + (24, 24), zarr_format=zarr_format)
    image[...] = images
    mask = zarr.create_array(str(store), name=mask_path, shape=masks.shape, dtype=masks.dtype,
                             chunks=(4, SIZE, SIZE), zarr_format=zarr_format)
    mask[...] = masks


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[int, Path]:
    out = tmp_path_factory.mktemp("own-zarr")
    write_pair(out / "v3.zarr", 3, "raw/images", "raw/masks", channel_axis=True)
    write_pair(out / "v2.zarr", 2, "images", "labels", channel_axis=False)
    return {3: out / "v3.zarr", 2: out / "v2.zarr"}


def data_config(stores, version: int, **changes) -> DataConfig:
    paths = {3: ("raw/images", "raw/masks"), 2: ("images", "labels")}[version]
    settings = dict(format="zarr", zarr_store=str(stores[version]), image_array=paths[0], mask_array=paths[1],
                    tile_size=TILE, num_workers=0, val_fraction=0.2)
    return DataConfig(**{**settings, **changes})


@pytest.mark.parametrize("version", [3, 2])
def test_own_arrays_split_by_rows_each_sample_once(stores, version):
    data = data_config(stores, version)
    loader = build_train_loader(data, rank=0, world_size=1, seed=0, micro_batch_size=4, in_channels=1,
                                num_classes=2, use_weight_map="auto", global_batch_size=4)
    batches = iter(loader)
    keys = [key for _ in range(4) for key in next(batches)["key"]]  # one epoch: 16 training rows
    assert Counter(keys) == Counter(f"#{row}" for row in range(16))
    val = build_val_loader(data, rank=0, world_size=1, micro_batch_size=4, in_channels=1, num_classes=2,
                           use_weight_map="auto")
    val_keys = [key for batch in val for key in batch["key"]]
    assert val_keys == [f"#{row}" for row in range(16, 20)]  # the last val_fraction of the rows
    sample = open_source(data, "val", sample_checks(data, 1, 2, "auto")).read(0, [0])[0]
    expected = synthetic_cells(SIZE, np.random.default_rng(16))[0].astype(np.uint16) * 100
    assert sample.key == "#16" and sample.image.dtype == np.uint16  # stored dtype kept
    np.testing.assert_array_equal(sample.image, expected[None])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(image_array="raw/imgs"), r"v3.zarr: no array 'raw/imgs' \(data.image_array\); it holds "
                                       r".*raw/images \[20, 1, 48, 48\] uint16.*expected data.image_array"),
        (dict(mask_array="raw/images"), r"v3.zarr: arrays image \[20, 1, 48, 48\]; mask \[20, 1, 48, 48\]; expected"),
    ],
)
def test_bad_own_layout_is_one_line_naming_the_store(stores, changes, message):
    data = data_config(stores, 3, **changes)
    with pytest.raises(ValueError, match=message) as caught:
        open_source(data, "train", sample_checks(data, 1, 2, "auto"))
    assert "\n" not in str(caught.value)


def test_prepared_layout_expected_names_the_own_arrays_keys(stores):
    data = DataConfig(format="zarr", zarr_store=str(stores[3]), tile_size=TILE)
    with pytest.raises(ValueError, match="no group 'train'.*set data.image_array and data.mask_array"):
        open_source(data, "train", sample_checks(data, 1, 2, "auto"))


@pytest.mark.slow
def test_real_training_run_on_own_arrays(stores, tmp_path):
    data = ["data.format=zarr", f"data.zarr_store={stores[3]}", "data.image_array=raw/images",
            "data.mask_array=raw/masks", "data.val_fraction=0.2"]
    result = train_tiny_on(data, tmp_path / "run", "train.max_steps=20", "train.val_every=10")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "16 train samples" in result.stderr and "border weight maps: none" in result.stderr
