"""Volumes train like images: 3-D windows from a whole-volume Zarr store, the same exact global
sequence at any number of ranks and workers, a 2-rank torchrun run that learns, and resumes that
continue it bitwise (same ranks) or with the same samples (2 -> 1 rank)."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from conftest import balls_on_noise, global_batches, recorded_keys
from test_resume import assert_same_model, final_model, train

from unetdist.config import DataConfig
from unetdist.data import build_val_loader
from unetdist.data.writers import ZarrImageWriter

SHAPE = (24, 40, 40)  # (z, y, x) of each volume
TILE = ("data.tile_depth=8", "data.tile_size=16")


def blob_volume(seed: int, shape: tuple[int, int, int] = SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """A uint8 volume of touching bright balls on noise, and its instance ids (uint16)."""
    image, ids = balls_on_noise(seed, shape, cells=10, radii=(3.5, 6.5), dtype=np.uint8)
    return image[None], ids


@pytest.fixture(scope="module")
def volume_store(tmp_path_factory) -> Path:
    """A whole-volume store: 3 training volumes, 1 validation volume."""
    store = tmp_path_factory.mktemp("volumes") / "data.zarr"
    for split, seeds in (("train", (0, 1, 2)), ("val", (3,))):
        writer = ZarrImageWriter(store, split)
        for seed in seeds:
            image, mask = blob_volume(seed)
            writer.write_image(f"vol{seed}", image, mask, None, spacing=(2.0, 1.0, 1.0))
        writer.close()
    return store


def data_config(store: Path, **changes) -> DataConfig:
    settings = dict(format="zarr", zarr_store=str(store), tile_size=16, tile_depth=8, tiles_per_image=8,
                    num_workers=0, foreground_fraction=0.5, augment=True, augment_elastic=True,
                    mask_kind="instances")  # fmt: skip
    return DataConfig(**{**settings, **changes})


def test_volume_windows_are_the_same_global_sequence_at_any_ranks_and_workers(volume_store):
    single = global_batches(data_config(volume_store), 1, 0, 4)
    spread = global_batches(data_config(volume_store), 2, 2, 4)
    assert single[0]["image"].shape == (8, 1, 8, 16, 16) and single[0]["mask"].shape == (8, 8, 16, 16)
    for one, many in zip(single, spread, strict=True):
        assert one["key"] == many["key"]
        assert torch.equal(one["image"], many["image"]) and torch.equal(one["mask"], many["mask"])
    keys = [key for batch in single for key in batch["key"]]
    assert all("_z" in key for key in keys)
    # an epoch is 3 volumes x 8 windows: the first 3 batches hold each volume's 8 windows once
    first_epoch = [key.split("_z")[0] for batch in single[:3] for key in batch["key"]]
    assert sorted(first_epoch) == sorted(["vol0", "vol1", "vol2"] * 8)
    # half the windows are centred on foreground: well above the volumes' foreground share
    share = np.mean([(blob_volume(seed)[1] > 0).mean() for seed in (0, 1, 2)])
    assert torch.cat([batch["mask"] for batch in single]).float().mean() > 1.4 * share


def test_validation_reads_each_grid_window_once_across_ranks(volume_store):
    keys = []
    for rank in range(2):
        loader = build_val_loader(data_config(volume_store), rank=rank, world_size=2, micro_batch_size=2,
                                  in_channels=1, num_classes=2, use_weight_map="false", spatial_dims=3)  # fmt: skip
        keys += [key for batch in loader for key in batch["key"]]
    # the grid over 24x40x40 with 8x16x16 tiles: 3 x 3 x 3 windows (the last of each axis moved inwards)
    assert len(keys) == len(set(keys)) == 27
    assert "vol3_z16_y24_x24" in keys


def test_a_2d_model_on_a_volume_store_is_refused_by_name(volume_store):
    with pytest.raises(ValueError, match=r"holds 3-D volumes: set model.spatial_dims=3"):
        build_val_loader(data_config(volume_store, tile_depth=0), rank=0, world_size=1, micro_batch_size=2,
                         in_channels=1, num_classes=2, use_weight_map="false")  # fmt: skip


MAX_STEPS = 24


def overrides(store: Path, output_dir: Path, tracking: str) -> list[str]:
    return [
        "data.format=zarr", f"data.zarr_store={store}", *TILE, "data.tiles_per_image=16", "data.num_workers=2",
        "data.foreground_fraction=0.3", "data.mask_kind=instances", "loss.use_weight_map=false", "model.spatial_dims=3", "model.base_width=4", "model.depth=2",
        "model.norm=instance", "optim.lr=0.01", "optim.schedule=constant", "train.global_batch_size=4",
        "train.val_every=0", "train.log_every=4", "train.progress=false", "train.record_samples=true",
        "checkpoint.every=12", f"train.output_dir={output_dir}", f"tracking.tracking_uri={tracking}",
        "tracking.experiment=tests", "tracking.log_model=false", "tracking.image_every=1",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(volume_store, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("volume-run")
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    result = train([*overrides(volume_store, root / "run", tracking), f"train.max_steps={MAX_STEPS}",
                    "train.val_at_start=true"])  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    client = mlflow.MlflowClient(tracking)
    run = client.search_runs([client.get_experiment_by_name("tests").experiment_id])[0]
    dice = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/fg_dice"))
    ap50 = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/ap50"))
    panels = sorted((root / "run" / "val_panels").rglob("*.png"))
    return {"model": final_model(root / "run"), "keys": recorded_keys(root / "run"), "dice": dice, "run": root / "run",
            "panels": panels, "log": result.stderr, "ap50": ap50,
            "tuned": run.data.metrics.get("val/tuned_ap50")}  # fmt: skip


def test_a_two_rank_volume_run_learns_and_logs_orthogonal_panels(uninterrupted):
    (first_step, first), (last_step, last) = uninterrupted["dice"][0], uninterrupted["dice"][-1]
    assert (first_step, last_step) == (0, MAX_STEPS)
    assert last > 0.7 and last > first + 0.2, uninterrupted["dice"]
    # instance ids: the balls are decoded (3-D seeded watershed) and matched, and the decoding tuned
    assert [step for step, _ in uninterrupted["ap50"]] == [0, MAX_STEPS] and uninterrupted["tuned"] is not None
    from PIL import Image

    assert uninterrupted["panels"], "no validation panels were written"
    with Image.open(uninterrupted["panels"][-1]) as panel:  # xy, xz and yz slices: taller than one row of tiles
        assert panel.height > panel.width / 5, panel.size
    assert sorted(uninterrupted["keys"]) == list(range(1, MAX_STEPS + 1))


def test_stopped_volume_run_resumes_bitwise_and_on_one_rank_with_the_same_samples(uninterrupted, volume_store, tmp_path):
    """Each leg restarts from the uninterrupted run's step-12 checkpoint, as a run stopped there would
    (the checkpoint is the whole state at step 12: model, optimizer, the sequence's position)."""
    for nproc in (2, 1):
        copy = tmp_path / f"resumed-{nproc}"
        shutil.copytree(uninterrupted["run"], copy, ignore=shutil.ignore_patterns("step-00000024", "samples"))
        (copy / "checkpoints" / "latest").write_text("step-00000012")
        args = [*overrides(volume_store, copy, ""), "tracking.enabled=false", f"train.max_steps={MAX_STEPS}",
                "train.val_at_start=true"]
        resumed = train([*args, "--resume", "auto"], nproc=nproc)
        assert resumed.returncode == 0, resumed.stderr[-4000:]
        assert "resuming from" in resumed.stderr
        assert recorded_keys(copy) == {step: keys for step, keys in uninterrupted["keys"].items() if step > 12}
        if nproc == 2:  # the same ranks: the same sums in the same order
            assert_same_model(final_model(copy), uninterrupted["model"])
