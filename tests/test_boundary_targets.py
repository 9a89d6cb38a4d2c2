"""loss.target=boundary through the loader: the stored instance ids become background / interior /
boundary (:func:`unetdist.instance_targets.boundary_classes`), with their border weights beside;
refused at start-up for masks that hold no instance ids.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from unetdist.config import ConfigError, DataConfig
from unetdist.data import build_train_loader, build_val_loader
from unetdist.data.prepare import prepare_dataset
from unetdist.data.samples import SampleChecks
from unetdist.data.synthetic import write_synthetic
from unetdist.instance_targets import boundary_classes

TILE, WIDTH = 32, 2
BOUNDARY = dict(in_channels=1, num_classes=3, use_weight_map="auto", target="boundary", boundary_width_px=WIDTH)


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    """Six 64x64 images of touching cells, 32-px tiles (the loader's window is the whole tile)."""
    out = tmp_path_factory.mktemp("boundary")
    images, masks = write_synthetic(out, count=6, image_size=64, seed=4)
    common = dict(tile_size=TILE, val_fraction=0.2, seed=0)
    prepare_dataset(images, masks, out / "webdataset", shard_size=8, **common)
    prepare_dataset(images, masks, out / "zarr", output_format="zarr", **common)
    prepare_dataset(images, masks, out / "classes", mask_kind="binary", **common)
    return {"webdataset": out / "webdataset", "zarr": out / "zarr", "classes": out / "classes"}


def stored(root: Path, fmt: str, split: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{key: (instance ids, weight)} as prepare stored them, read without the loader."""
    out = {}
    if fmt == "zarr":
        group = zarr.open_group(str(root / "data.zarr"), mode="r", path=split)
        stems = group.attrs["images"]
        for (image, top, left), ids, weight in zip(group["origin"][...].tolist(), group["mask"][...],
                                                   group["weight"][...], strict=True):  # fmt: skip
            out[f"{stems[image]}_y{top}_x{left}"] = (ids, weight)
        return out
    for shard in sorted(root.glob(f"{split}-*.tar")):
        fields: dict[str, dict[str, np.ndarray]] = {}
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, field = member.name.split(".", 1)
                fields.setdefault(key, {})[field] = np.load(io.BytesIO(tar.extractfile(member).read()))
        out.update({key: (tile["mask.npy"], tile["weight.npy"]) for key, tile in fields.items()})
    return out


def data_config(root: Path, fmt: str, **changes) -> DataConfig:
    base = DataConfig(format=fmt, root=str(root), tile_size=TILE, num_workers=0, augment=False)
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize("fmt", ["webdataset", "zarr"])
def test_boundary_batches_are_the_boundary_classes_of_the_stored_ids(roots, fmt, caplog):
    truth = stored(roots[fmt], fmt, "train")
    with caplog.at_level(logging.INFO, logger="unetdist.data.preflight"):
        loader = build_train_loader(data_config(roots[fmt], fmt), rank=0, world_size=1, seed=1, micro_batch_size=4,
                                    **BOUNDARY)  # fmt: skip
    (line,) = [message for message in caplog.messages if message.startswith("masks:")]
    assert line.startswith("masks: instance ids, trained as background / interior / boundary with a 2 px rim")
    assert f"data.mask_kind=auto: instances, from {roots[fmt] / 'dataset.json'}" in line
    batches = iter(loader)
    values = set()
    for _ in range(6):
        batch = next(batches)
        assert "instances" not in batch  # training batches leave the ids out
        for key, mask, weight in zip(batch["key"], batch["mask"], batch["weight"], strict=True):
            ids, stored_weight = truth[key]
            assert torch.equal(mask, torch.from_numpy(boundary_classes(ids, WIDTH)).long()), key
            assert torch.equal(weight, torch.from_numpy(stored_weight))  # the border weights alongside
            values |= set(mask.unique().tolist())
    assert values == {0, 1, 2}


def test_boundary_validation_batches_carry_the_ids_beside_the_classes(roots):
    truth = stored(roots["webdataset"], "webdataset", "val")
    val = build_val_loader(data_config(roots["webdataset"], "webdataset", num_workers=1), rank=0, world_size=1,
                           micro_batch_size=3, **BOUNDARY)  # fmt: skip
    seen = 0
    for batch in val:
        for key, mask, instances in zip(batch["key"], batch["mask"], batch["instances"], strict=True):
            ids, _ = truth[key]
            assert instances.dtype == torch.int32 and torch.equal(instances, torch.from_numpy(ids.astype(np.int32)))
            assert torch.equal(mask, torch.from_numpy(boundary_classes(ids, WIDTH)).long())
            seen += 1
    assert seen == len(truth) > 0


def test_boundary_without_instance_ids_is_refused_at_start_up_in_one_line(roots):
    for data in (data_config(roots["classes"], "webdataset"),  # auto: its dataset.json says binary
                 data_config(roots["webdataset"], "webdataset", mask_kind="classes")):  # fmt: skip
        with pytest.raises(ConfigError) as caught:
            build_train_loader(data, rank=0, world_size=1, seed=0, micro_batch_size=2, **BOUNDARY)
        message = str(caught.value)
        assert "\n" not in message and "loss.target=boundary" in message and "data.mask_kind" in message
    with pytest.raises(ConfigError, match=r"loss.target=boundary .* data.mask_kind is binary"):
        build_val_loader(data_config(roots["classes"], "webdataset"), rank=0, world_size=1, micro_batch_size=2,
                         **BOUNDARY)  # fmt: skip
    with pytest.raises(ValueError, match="target=boundary needs instance ids"):
        SampleChecks(TILE, 1, 3, False, mask_kind="classes", target="boundary")
