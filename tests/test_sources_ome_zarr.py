"""OME-Zarr images with label images as a data source: NGFF 0.4 and 0.5 written by ome-zarr-py itself,
read by unetdist.data.ngff and the ome-zarr source (windows, grids, splits, levels, channels, errors, S3)."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import REPO_ROOT
from ome_zarr.format import FormatV04, FormatV05
from ome_zarr.writer import write_image, write_labels, write_multiscale_labels

from unetdist.config import DataConfig
from unetdist.data import build_train_loader, build_val_loader, remote
from unetdist.data.augment import sample_words
from unetdist.data.ngff import label_image, read_image
from unetdist.data.samples import Sample, SampleChecks
from unetdist.data.sources import ome_zarr
from unetdist.data.sources.ome_zarr import open_ome_zarr
from unetdist.data.synthetic import synthetic_cells

TILE, GLOBAL, MICRO, SIZE = 32, 8, 2, 100  # 100 = 3 * 32 + 4: the grid's last row/col is shifted inwards
ARGS = dict(seed=5, global_batch_size=GLOBAL, micro_batch_size=MICRO, num_classes=2, use_weight_map=False)
VAL_ARGS = dict(num_classes=2, use_weight_map=False)
KEY = re.compile(r"^(?P<stem>.+?)(?:_t(?P<t>\d+))?(?:_z(?P<z>\d+))?_y(?P<top>\d+)_x(?P<left>\d+)$")
FORMATS = {"0.4": (FormatV04, 2), "0.5": (FormatV05, 3)}


def write_ngff(path: Path, image: np.ndarray, labels: np.ndarray | None, version: str, axes: str,
               label_axes: str = "", name: str = "cells") -> str:
    """An NGFF image (and its label image ``labels/name``) as ome-zarr-py writes them, 5 levels each."""
    fmt, zarr_format = FORMATS[version]
    group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    chunks = tuple(1 if axis in "tcz" else 32 for axis in axes)  # 2-D chunks: a window touches a few
    write_image(image, group, fmt=fmt(), axes=axes, storage_options={"chunks": chunks})
    if labels is not None:
        write_labels(labels, group, name=name, fmt=fmt(), axes=label_axes or axes.replace("c", ""))
    return str(path)


def cells(size: int, seed: int, channels: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """uint16 [C, H, W] pixels and uint32 instance ids (offset past uint16's range: ids must survive)."""
    picture, instances = synthetic_cells(size, np.random.default_rng(seed))
    pixels = np.stack([picture.astype(np.uint16) * (c + 1) for c in range(channels)])
    return pixels, np.where(instances > 0, instances.astype(np.uint32) + 70_000, 0).astype(np.uint32)


def stored(url: str, level: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The image's and its label image's arrays at ``level`` (paths as the writer named them)."""
    group, path = zarr.open_group(url, mode="r"), read_image(url).levels[level]
    return group[path][...], group[f"labels/cells/{path}"][...]


def config(images: list[str], **changes) -> DataConfig:
    base = DataConfig(format="ome-zarr", images=images, labels="cells", mask_kind="instances", tile_size=TILE,
                      num_workers=0, tiles_per_image=6, augment=True, augment_on="device")
    return dataclasses.replace(base, **changes)


def checks(in_channels: int = 2) -> SampleChecks:
    return SampleChecks(TILE, in_channels, 2, False, mask_kind="instances")


def global_steps(
    data: DataConfig, world_size: int, steps: int, in_channels: int, start_sample: int = 0
) -> list[dict]:
    """Per global step: keys, images and masks of all ranks' micro-batches, in rank order."""
    iterators = [
        iter(build_train_loader(data, rank=rank, world_size=world_size, in_channels=in_channels,
                                start_sample=start_sample, **ARGS))
        for rank in range(world_size)
    ]
    per_rank = [[[next(batches) for _ in range(GLOBAL // world_size // MICRO)] for _ in range(steps)]
                for batches in iterators]
    out = []
    for step in range(steps):
        micro = [batch for rank in range(world_size) for batch in per_rank[rank][step]]
        out.append({"key": [k for b in micro for k in b["key"]],
                    **{name: torch.cat([b[name] for b in micro]) for name in ("image", "mask")}})
    return out


def assert_same(a: list[dict], b: list[dict]) -> None:
    for x, y in zip(a, b, strict=True):
        assert x["key"] == y["key"]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])


def window(key: str) -> tuple[str, int, int, int, int]:
    """(stem, t, z, top, left) of a sample key."""
    match = KEY.match(key)
    return match["stem"], int(match["t"] or 0), int(match["z"] or 0), int(match["top"]), int(match["left"])


@pytest.fixture(scope="module", params=["0.4", "0.5"])
def cyx(request, tmp_path_factory) -> list[str]:
    """Three 2-channel cyx images with instance labels, in one NGFF version."""
    out = tmp_path_factory.mktemp(f"cyx{request.param}")
    return [write_ngff(out / f"img{i}.ome.zarr", *cells(SIZE, i), request.param, "cyx") for i in range(3)]


@pytest.fixture(scope="module")
def tczyx(tmp_path_factory) -> str:
    """One NGFF 0.5 image with 2 time points and 3 z planes: 6 units."""
    planes = [cells(96, seed=10 + p, channels=1) for p in range(6)]
    pixels = np.stack([p for p, _ in planes]).reshape(2, 3, 1, 96, 96).transpose(0, 2, 1, 3, 4)  # t c z y x
    labels = np.stack([labels for _, labels in planes]).reshape(2, 3, 96, 96)  # t z y x
    path = tmp_path_factory.mktemp("tczyx") / "stack.ome.zarr"
    return write_ngff(path, pixels, labels, "0.5", "tczyx", "tzyx")


# ---------------------------------------------------------------- metadata


def test_read_image_and_its_label_image_in_both_versions(cyx):
    image = read_image(cyx[0])
    version = "0.4" if (Path(cyx[0]) / ".zattrs").exists() else "0.5"
    assert image.version == version and image.url == cyx[0]
    assert image.axes == ("c", "y", "x") and image.axis_types == ("channel", "space", "space")
    assert image.shape == (2, SIZE, SIZE) and image.dtype == "uint16" and image.labels == ("cells",)
    assert len(image.levels) == len(image.scales) == 5 and image.scales[1] == (1.0, 2.0, 2.0)
    label = label_image(image, "cells")
    assert label.axes == ("y", "x") and label.dtype == "uint32" and label.shape == (SIZE, SIZE)


# ---------------------------------------------------------------- training and validation windows


@pytest.mark.parametrize("channels", [[], [1], [1, 0]])
def test_train_windows_are_the_stored_pixels_alike_at_one_and_two_ranks(cyx, channels):
    in_channels = len(channels) or 2
    data = config(cyx, channels=channels)  # val_fraction 0.1 of 3 images: the last one is held out
    reference = global_steps(data, 1, 3, in_channels)
    pictures = {Path(url).name.removesuffix(".ome.zarr"): stored(url) for url in cyx}
    origins = set()
    for step in reference:
        for key, tile, mask in zip(step["key"], step["image"], step["mask"], strict=True):
            stem, _, _, top, left = window(key)
            assert stem in ("img0", "img1")
            pixels, labels = pictures[stem]
            rows, cols = slice(top, top + TILE), slice(left, left + TILE)
            assert tile.dtype == torch.uint16
            assert np.array_equal(tile.numpy(), pixels[channels or [0, 1], rows, cols])
            assert np.array_equal(mask.numpy(), labels[rows, cols] != 0)  # instance ids -> 0/1 (mask_kind)
            origins.add((stem, top, left))
    assert len(origins) > 12  # random windows, not a grid
    assert_same(reference, global_steps(dataclasses.replace(data, num_workers=2), 2, 3, in_channels))
    # resumed after the first step, on another number of ranks: the rest of the same sequence
    assert_same(reference[1:], global_steps(data, 2, 2, in_channels, start_sample=GLOBAL))


def test_val_grid_covers_each_held_out_image_once_across_two_ranks(cyx):
    data = config(cyx, val_fraction=0.5, num_workers=2)  # ceil(0.5 * 3) = 2 held-out images
    seen = []
    for rank in range(2):
        loader = build_val_loader(data, rank=rank, world_size=2, micro_batch_size=3, in_channels=2,
                                  **VAL_ARGS)
        for batch in loader:
            for key, tile in zip(batch["key"], batch["image"], strict=True):
                stem, _, _, top, left = window(key)
                pixels, _ = stored(cyx[int(stem[-1])])
                assert np.array_equal(tile.numpy(), pixels[:, top : top + TILE, left : left + TILE])
                seen.append(key)
    assert len(seen) == len(set(seen)) == 2 * 16  # img1 and img2, a 4 x 4 grid each
    assert {window(key)[0] for key in seen} == {"img1", "img2"}
    assert sorted({window(key)[3] for key in seen}) == [0, 32, 64, SIZE - TILE]


def test_planes_of_t_and_z_are_units_and_the_one_image_splits_by_rows(tczyx):
    # 96 rows: the bottom 32 (>= a tile) are val, the 16 above them (half a tile) a gap, 48 train
    data = config([tczyx], val_fraction=0.25, tiles_per_image=2)
    train, val = (open_ome_zarr(data, split, checks(1)) for split in ("train", "val"))
    assert len(train.counts) == len(val.counts) == 6 and train.counts == [2] * 6
    assert [(p.t, p.z, p.row0, p.height) for p in train.planes[:2]] == [(0, 0, 0, 48), (0, 1, 0, 48)]
    assert [(p.row0, p.height) for p in val.planes] == [(64, 32)] * 6 and val.counts == [3] * 6
    pixels, labels = stored(tczyx)
    loader = build_train_loader(data, rank=0, world_size=1, in_channels=1, **ARGS)
    assert loader.samples_per_epoch == 16  # 6 planes x 2, padded to a multiple of 8
    keys = set()
    for batch, _ in zip(loader, range(8), strict=False):
        for key, tile, mask in zip(batch["key"], batch["image"], batch["mask"], strict=True):
            _, t, z, top, left = window(key)
            rows, cols = slice(top, top + TILE), slice(left, left + TILE)
            assert top + TILE <= 48  # training windows stay above the gap and the validation rows
            assert np.array_equal(tile.numpy(), pixels[t, :, z, rows, cols])
            assert np.array_equal(mask.numpy(), labels[t, z, rows, cols] != 0)
            keys.add(key)
    assert {(window(k)[1], window(k)[2]) for k in keys} == {(t, z) for t in range(2) for z in range(3)}
    val_loader = build_val_loader(data, rank=0, world_size=1, micro_batch_size=4, in_channels=1, **VAL_ARGS)
    val_keys = [key for batch in val_loader for key in batch["key"]]
    assert len(val_keys) == len(set(val_keys)) == 6 * 3 and {window(k)[3] for k in val_keys} == {64}


def test_one_image_region_split_keeps_training_windows_off_the_validation_rows(tmp_path):
    pixels, labels = cells(160, seed=4, channels=1)
    url = write_ngff(tmp_path / "one.ome.zarr", pixels, labels, "0.4", "cyx")
    # round(0.25 * 160) = 40 rows held out, 16 (half a tile) above them a gap: 104 rows train
    data = config([url], val_fraction=0.25, foreground_fraction=0.5)
    train = open_ome_zarr(data, "train", checks(1))
    units = np.zeros(400, np.int64)
    tops = [top for top, _ in train.windows(units, sample_words(1, np.arange(400)))]
    assert max(tops) + TILE <= 104 and min(tops) == 0
    assert (train.foreground(0)[:, 0] < 104).all()
    val = open_ome_zarr(data, "val", checks(1))
    keys = [sample.key for sample in val.read(0, list(range(val.counts[0])))]
    assert sorted({window(k)[3] for k in keys}) == [120, 128] and len(keys) == 2 * 5
    without = dataclasses.replace(data, val_fraction=0.0)
    with pytest.raises(ValueError, match=r"no validation split: data.val_fraction=0"):
        open_ome_zarr(without, "val", checks(1))
    assert open_ome_zarr(without, "train", checks(1)).shapes == [(160, 160)]


def test_val_split_by_listed_images_or_the_last_of_the_given_order(cyx):
    def stems(data: DataConfig, split: str) -> list[str]:
        return [image.stem for image in open_ome_zarr(data, split, checks()).images]

    assert stems(config(cyx), "val") == ["img2"] and stems(config(cyx), "train") == ["img0", "img1"]
    listed = config(cyx, val_images=[cyx[0]])
    assert stems(listed, "val") == ["img0"] and stems(listed, "train") == ["img1", "img2"]
    pattern = config([str(Path(cyx[0]).parent / "img*.ome.zarr")], val_fraction=0.3)  # a glob, sorted
    assert stems(pattern, "train") == ["img0", "img1"] and stems(pattern, "val") == ["img2"]


# ---------------------------------------------------------------- levels, foreground, label ids


def test_a_coarser_level_reads_the_label_level_of_the_same_scale(tmp_path):
    pixels, labels = cells(128, seed=6, channels=1)
    url = write_ngff(tmp_path / "levels.ome.zarr", pixels, labels, "0.5", "cyx")
    source = open_ome_zarr(config([url], level=1, val_fraction=0.0), "train", checks(1))
    level_paths = read_image(url).levels
    assert source.shapes == [(64, 64)] and source.images[0].label_path == f"labels/cells/{level_paths[1]}"
    image_level, label_level = stored(url, 1)
    units, words = np.zeros(6, np.int64), sample_words(2, np.arange(6))
    samples = source.read_windows(units, units, words)
    for (top, left), sample in zip(source.windows(units, words), samples, strict=True):
        assert np.array_equal(sample.image, image_level[:, top : top + TILE, left : left + TILE])
        assert np.array_equal(sample.mask, label_level[top : top + TILE, left : left + TILE] != 0)
    # a label image downsampled by 4 at its level 1: nothing matches the image's level 1 (by 2)
    transforms = [[{"type": "scale", "scale": [1.0, 1.0]}], [{"type": "scale", "scale": [4.0, 4.0]}]]
    group = zarr.open_group(url, mode="a")
    write_multiscale_labels([labels, labels[::4, ::4]], group, "coarse", fmt=FormatV05(), axes="yx",
                            coordinate_transformations=transforms)
    with pytest.raises(ValueError, match=r"labels/coarse: no level downsampled like image level 1"):
        open_ome_zarr(config([url], labels="coarse", level=1, val_fraction=0.0), "train", checks(1))


def test_foreground_windows_come_from_a_coarse_label_level(tmp_path):
    labels = np.zeros((256, 256), np.int32)
    for index, (y, x) in enumerate([(40, 60), (200, 30), (128, 220)]):
        labels[y - 8 : y + 8, x - 8 : x + 8] = index + 1  # 16 x 16 cells: they survive downsampling by 8
    pixels = (labels > 0).astype(np.uint8)[None] * 200
    data = config([write_ngff(tmp_path / "sparse.ome.zarr", pixels, labels, "0.4", "cyx")], val_fraction=0.0,
                  foreground_fraction=1.0)
    source = open_ome_zarr(data, "train", checks(1))
    level_paths = read_image(data.images[0]).levels
    assert source.images[0].foreground_path == f"labels/cells/{level_paths[3]}"  # by 8 = tile_size / 4
    table = source.foreground(0)
    assert len(table) == 3 * 2 * 2  # 2 x 2 coarse pixels per cell, each within half a coarse pixel of it
    assert all(labels[max(y - 4, 0) : y + 5, max(x - 4, 0) : x + 5].any() for y, x in table)
    units, words = np.zeros(40, np.int64), sample_words(3, np.arange(40))
    centre = slice(TILE // 2 - 4, TILE // 2 + 5)
    assert all(sample.mask[centre, centre].any() for sample in source.read_windows(units, units, words))
    uniform = open_ome_zarr(dataclasses.replace(data, foreground_fraction=0.0), "train", checks(1))
    assert np.mean([sample.mask.mean() for sample in uniform.read_windows(units, units, words)]) < 0.1


def test_label_ids_reach_check_sample_as_stored(tmp_path, monkeypatch):
    masks = []

    def recording(key, where, image, mask, weight, checks):
        masks.append(mask)
        return Sample(key, where, image, mask, weight)

    monkeypatch.setattr(ome_zarr, "check_sample", recording)
    for dtype, label_id in ((np.uint32, 100_000), (np.int64, 4_000_000_007)):
        labels = np.zeros((64, 64), dtype)
        labels[:, 32:] = label_id
        path = tmp_path / f"{np.dtype(dtype).name}.ome.zarr"
        url = write_ngff(path, np.ones((1, 64, 64), np.uint8), labels, "0.5", "cyx")
        open_ome_zarr(config([url], val_images=[url]), "val", checks(1)).read(0, [1])  # the window at (0, 32)
        assert masks[-1].dtype == dtype and masks[-1].max() == label_id


# ---------------------------------------------------------------- errors


def bad_layouts(root: Path) -> list[tuple[dict, str]]:
    pixels, labels = cells(64, seed=0)
    ok = write_ngff(root / "ok.ome.zarr", pixels, labels, "0.5", "cyx")
    unlabelled = write_ngff(root / "unlabelled.ome.zarr", pixels, None, "0.4", "cyx")
    small_labels = write_ngff(root / "small.ome.zarr", pixels, labels[:48], "0.5", "cyx")
    renamed = write_ngff(root / "renamed.ome.zarr", pixels, labels, "0.5", "cyx")
    reordered = write_ngff(root / "reordered.ome.zarr", pixels, labels, "0.4", "cyx")
    for url, change in ((renamed, lambda axes: [axes[0], {**axes[1], "name": "row"}, axes[2]]),
                        (reordered, lambda axes: axes[1:] + axes[:1])):  # the channel axis last
        attributes = zarr.open_group(url, mode="a").attrs
        ome = attributes["ome"] if "ome" in attributes else attributes.asdict()
        ome["multiscales"][0]["axes"] = change(ome["multiscales"][0]["axes"])
        attributes.update({"ome": ome} if "ome" in attributes else ome)
    zarr.create_array(str(root / "plain.zarr"), shape=(64, 64), dtype="uint8")
    zarr.open_group(str(root / "bare.zarr"), mode="w")
    zarr.open_group(str(root / "bare2.zarr"), mode="w", zarr_format=2)
    return [
        (dict(images=[unlabelled]), "unlabelled.ome.zarr: no labels/ group; expected labels/cells"),
        (dict(images=[ok], labels="nuclei"), r"ok.ome.zarr: labels/ lists \['cells'\], not 'nuclei'"),
        (dict(images=[renamed]), "renamed.ome.zarr: axes crowx; expected axes among t, c, z, y, x"),
        (dict(images=[reordered]), r"reordered.ome.zarr: axes \[y:space, x:space, c:channel\]; expected time "
                                   "first, then channel, then space"),
        (dict(images=[small_labels]), r"small.ome.zarr/labels/cells: shape \[48, 64\].*y size 48, the"),
        (dict(images=[ok], level=5), r"ok.ome.zarr: data.level=5 out of range: it has 5 level\(s\), 0..4"),
        (dict(images=[ok], channels=[0, 2]), r"data.channels=\[0, 2\]: channel 2 out of range for its 2"),
        (dict(images=[ok], channels=[1]), r"1 channel\(s\) chosen .* model.in_channels=2"),
        (dict(images=[f"{root}/plain.zarr"]), r"plain.zarr: a plain Zarr array \[64, 64\] uint8, not a"),
        (dict(images=[f"{root}/bare.zarr"]), "bare.zarr: a Zarr v3 group without attributes; expected"),
        (dict(images=[f"{root}/bare2.zarr"]), "bare2.zarr: a Zarr v2 group without .zattrs, no multiscales"),
        (dict(images=[f"{root}/nowhere.zarr"]), "nowhere.zarr: not found"),
        (dict(images=[f"{root}/none*.zarr"]), r"data.images: '.*none\*.zarr' matches nothing"),
        (dict(images=[ok], labels=""), "data.labels is empty"),
    ]


def test_bad_layouts_are_one_line_naming_the_store_and_what_was_expected(tmp_path):
    for changes, message in bad_layouts(tmp_path):
        with pytest.raises(ValueError, match=message) as caught:
            open_ome_zarr(config(**{"images": [], "val_fraction": 0.0, **changes}), "train", checks(2))
        assert "\n" not in str(caught.value)
    images = [write_ngff(tmp_path / f"two{i}.ome.zarr", *cells(64, seed=i), "0.5", "cyx") for i in range(2)]
    with pytest.raises(ValueError, match=r"data.val_fraction=0.6 of 2 images holds out 2: none is left"):
        open_ome_zarr(config(images, val_fraction=0.6), "train", checks(2))


# ---------------------------------------------------------------- remote and the real entry point


def test_images_on_s3_read_like_the_local_ones(s3, tmp_path):
    local = [write_ngff(tmp_path / f"img{i}.ome.zarr", *cells(64, seed=i), "0.5", "cyx") for i in range(2)]
    s3.create_bucket("unetdist-ngff")
    urls = []
    for path in map(Path, local):
        url = f"s3://unetdist-ngff/set/{path.name}"
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            remote.upload_file(file, f"{url}/{file.relative_to(path).as_posix()}")
        urls.append(url)
    data = config(local, val_fraction=0.5, readahead_mb=0.01)  # reading ahead one micro-batch, not 256 MB
    on_s3 = dataclasses.replace(data, images=urls)
    assert open_ome_zarr(on_s3, "train", checks()).remote
    assert_same(global_steps(data, 1, 2, 2), global_steps(on_s3, 1, 2, 2))
    val = build_val_loader(on_s3, rank=0, world_size=1, micro_batch_size=8, in_channels=2, **VAL_ARGS)
    assert sum(len(batch["key"]) for batch in val) == 4
    with pytest.raises(ValueError, match=r"s3://unetdist-ngff/set/missing.ome.zarr: not found"):
        open_ome_zarr(config(["s3://unetdist-ngff/set/missing.ome.zarr"], val_fraction=0), "train", checks())


@pytest.mark.slow
def test_train_runs_on_ome_zarr_images_at_two_ranks(tmp_path):
    for i in range(3):
        write_ngff(tmp_path / f"img{i}.ome.zarr", *cells(96, seed=i, channels=1), "0.5", "cyx")
    overrides = [
        "data.format=ome-zarr", f"data.images={tmp_path}/img*.ome.zarr", "data.labels=cells",
        "data.mask_kind=instances", "data.tile_size=32", "data.num_workers=0", "data.tiles_per_image=4",
        "data.val_fraction=0.3", "model.preset=padded", "model.base_width=4", "model.depth=2",
        "train.global_batch_size=4", "train.max_steps=3", "train.val_every=0", "train.progress=false",
        "train.device=cpu", "tracking.enabled=false", f"train.output_dir={tmp_path / 'run'}",
    ]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "unetdist.train", *overrides]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "2 rank(s) x 1 worker(s) x 2 plane(s) (ome-zarr, 8 train samples" in done.stderr  # 2 images x 4
    assert "step 3 val loss" in done.stderr and (tmp_path / "run" / "checkpoints" / "step-00000003").is_dir()
