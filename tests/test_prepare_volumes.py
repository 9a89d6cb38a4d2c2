"""prepare --spatial-dims 3 (unetdist/data/volumes.py and the volume paths of prepare): TIFF stacks and
.npy volumes -> a whole-volume Zarr store with the voxel spacing, region splits of few volumes, the
synthetic volumes, one-line errors; and 2-D prepare refusing a z-stack.

Stores are read back with zarr and tifffile, independently of the loader.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from unetdist.data.splits import gap_px, holdout_box
from unetdist.data.synthetic import synthetic_volume
from unetdist.prepare import main

VOLUME = ["--spatial-dims", "3", "--format", "zarr", "--whole-images"]
TILE, DEPTH = 16, 8


def _volume(shape=(20, 40, 48), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 image, uint16 instance ids) of a synthetic volume."""
    return synthetic_volume(shape, np.random.default_rng(seed))


def _folders(tmp_path: Path) -> tuple[Path, Path]:
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(exist_ok=True)
    masks.mkdir(exist_ok=True)
    return images, masks


def _prepare(images: Path, masks: Path, out: Path, *options: str) -> int:
    argv = ["--images", str(images), "--masks", str(masks), "--out", str(out), *VOLUME]
    return main([*argv, "--tile", str(TILE), "--tile-depth", str(DEPTH), *options])


def _read(out: Path) -> tuple[dict, zarr.Group]:
    return json.loads((out / "dataset.json").read_text()), zarr.open_group(str(out / "data.zarr"), mode="r")


def _error(capsys) -> str:
    """The one error line on stderr (warnings aside: a volume without a z spacing logs one)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("WARNING ")]
    assert len(lines) == 1 and lines[0].startswith("prepare: error: "), lines
    return lines[0] + "\n"


# ---------------------------------------------------------------- the store and the spacing


def test_imagej_zcyx_stack_prepares_to_a_whole_volume_store_with_its_spacing(tmp_path: Path):
    images, masks = _folders(tmp_path)
    image, ids = _volume()
    stack = np.stack([image.astype(np.uint16) * 4, 1000 - image.astype(np.uint16)], axis=1)  # ZCYX
    ij = {"resolution": (2.0, 2.0), "metadata": {"axes": "ZCYX", "spacing": 2.5, "unit": "um"}}  # 0.5 um pixels
    tifffile.imwrite(images / "nuclei.tif", stack, imagej=True, **ij)
    tifffile.imwrite(masks / "nuclei.tif", ids, imagej=True, metadata={"axes": "ZYX"})
    out = tmp_path / "out"
    assert _prepare(images, masks, out, "--val-fraction", "0") == 0

    meta, store = _read(out)
    assert meta["spatial_dims"] == 3 and meta["spacing"] == [2.5, 0.5, 0.5]
    assert meta["tile_size"] == TILE and meta["tile_depth"] == DEPTH and meta["layout"] == "whole-images"
    assert meta["in_channels"] == 2 and meta["image_dtype"] == "uint16" and meta["mask_kind"] == "instances"
    assert not meta["has_weight_map"] and meta["train_images"] == ["nuclei"] and meta["val_images"] == []
    assert meta["num_train_tiles"] == 3 * 3 * 3  # the grid: origins (0, 8, 12) x (0, 16, 24) x (0, 16, 32)
    train = store["train"]
    assert train.attrs["spatial_dims"] == 3 and train.attrs["spacing"] == [[2.5, 0.5, 0.5]]
    assert train.attrs["shapes"] == [[2, 20, 40, 48]] and train.attrs["offsets"] == [[0, 0, 0]]
    np.testing.assert_array_equal(train["images"]["0"][...], stack.transpose(1, 0, 2, 3))
    stored = train["masks"]["0"][...]
    assert stored.dtype == np.uint16 and np.array_equal(stored, ids)
    points = train["foreground"]["0"][...]
    assert points.shape[1] == 3 and np.all(ids[tuple(points.T)] > 0)
    assert "weights" not in train

    # --spacing wins over the file's
    assert _prepare(images, masks, out, "--val-fraction", "0", "--spacing", "3,1,1") == 0
    meta, store = _read(out)
    assert meta["spacing"] == [3.0, 1.0, 1.0] and store["train"].attrs["spacing"] == [[3.0, 1.0, 1.0]]


@pytest.mark.parametrize("kind", ["ome", "npy", "plain"])
def test_ome_tiff_npy_and_plain_stacks_and_where_their_spacing_comes_from(tmp_path: Path, kind: str, capsys):
    images, masks = _folders(tmp_path)
    image, ids = _volume(seed=1)
    if kind == "ome":
        sizes = {"PhysicalSizeZ": 2.0, "PhysicalSizeY": 0.25, "PhysicalSizeX": 0.25}
        tifffile.imwrite(images / "a.ome.tif", image, ome=True, metadata={"axes": "ZYX", **sizes})
        tifffile.imwrite(masks / "a.ome.tif", ids, ome=True, metadata={"axes": "ZYX"})
        expected = [2.0, 0.25, 0.25]
    elif kind == "npy":
        np.save(images / "a.npy", image[:, None])  # (z, c, y, x)
        np.save(masks / "a.npy", ids)
        expected = [1.0, 1.0, 1.0]
    else:
        tifffile.imwrite(images / "a.tif", image)  # tifffile's own stack: no voxel size
        tifffile.imwrite(masks / "a.tif", ids)
        expected = [1.0, 1.0, 1.0]
    assert _prepare(images, masks, tmp_path / "out", "--val-fraction", "0") == 0
    meta, store = _read(tmp_path / "out")
    assert meta["spacing"] == expected and meta["train_images"] == ["a"] and meta["in_channels"] == 1
    np.testing.assert_array_equal(store["train"]["images"]["0"][0], image)
    warned = [line for line in capsys.readouterr().err.splitlines() if "no voxel size" in line]
    assert len(warned) == (kind != "ome") and all("--spacing z,y,x" in line for line in warned)


# ---------------------------------------------------------------- splits


def test_holdout_box_cuts_the_axis_of_most_tiles_with_half_a_tile_gap():
    deep = holdout_box((48, 32, 32), (8, 16, 16), val_fraction=0.2)  # 6 tiles along z, 2 in-plane
    assert deep.axis == "planes" and deep.val == (38, 48, 0, 32, 0, 32)  # round(0.2 * 48) = 10 planes
    assert deep.train == (0, 48 - 10 - gap_px(8), 0, 32, 0, 32)
    flat = holdout_box((12, 32, 80), (8, 16, 16), val_fraction=0.1)  # a thin stack: cut across x
    assert flat.axis == "columns" and flat.val == (0, 12, 0, 32, 64, 80) and flat.train == (0, 12, 0, 32, 0, 56)
    with pytest.raises(ValueError, match=r"volume 12x16x16 is too small .* tile size 8x16x16: its depth 12 voxels"):
        holdout_box((12, 16, 16), (8, 16, 16), val_fraction=0.1)


def test_one_volume_trains_and_validates_on_regions_half_a_tile_apart(tmp_path: Path, capsys):
    images, masks = _folders(tmp_path)
    image, ids = _volume((48, 32, 40), seed=2)
    tifffile.imwrite(images / "v.tif", image, imagej=True, metadata={"axes": "ZYX", "spacing": 2.0})
    tifffile.imwrite(masks / "v.tif", ids, imagej=True, metadata={"axes": "ZYX"})
    out = tmp_path / "out"
    assert _prepare(images, masks, out, "--val-fraction", "0.2") == 0
    assert "v: validates on planes 38-47, rows 0-31, columns 0-39, trains on planes 0-33" in capsys.readouterr().out
    meta, store = _read(out)
    assert meta["train_images"] == meta["val_images"] == ["v"]
    train, val = meta["train_regions"]["v"], meta["val_regions"]["v"]
    assert train == [0, 34, 0, 32, 0, 40] and val == [38, 48, 0, 32, 0, 40]
    assert val[0] - train[1] >= DEPTH / 2  # the gap along the cut axis (z): half a tile depth
    for split, region in (("train", train), ("val", val)):
        z0, z1, y0, y1, x0, x1 = region
        group = store[split]
        assert group.attrs["offsets"] == [[z0, y0, x0]] and group.attrs["shapes"] == [[1, z1 - z0, y1 - y0, x1 - x0]]
        np.testing.assert_array_equal(group["images"]["0"][0], image[z0:z1, y0:y1, x0:x1])
        np.testing.assert_array_equal(group["masks"]["0"][...], ids[z0:z1, y0:y1, x0:x1])
    assert meta["num_val_tiles"] == 2 * 2 * 3  # 10 planes, 32 rows, 40 columns of 8x16x16 tiles

    # too small to hold both: one line naming the volume and what it needs
    tifffile.imwrite(images / "v.tif", image[:12], imagej=True, metadata={"axes": "ZYX"})
    tifffile.imwrite(masks / "v.tif", ids[:12], imagej=True, metadata={"axes": "ZYX"})
    assert _prepare(images, masks, out, "--val-fraction", "0.2", "--tile-depth", "12", "--tile", "32") == 2
    err = _error(capsys)
    assert f"{images / 'v.tif'}: volume 12x32x40 is too small to hold out a validation region" in err
    assert "--tile or --tile-depth" in err


# ---------------------------------------------------------------- synthetic volumes


def test_synthetic_volume_is_seeded_fast_touching_and_squashed_by_a_coarse_z():
    start = time.perf_counter()
    image, ids = synthetic_volume((48, 64, 64), np.random.default_rng(7))
    assert time.perf_counter() - start < 2.0  # about 0.4 s here; generous for a loaded machine
    again, _ = synthetic_volume((48, 64, 64), np.random.default_rng(7))
    np.testing.assert_array_equal(image, again)
    assert image.dtype == np.uint8 and ids.dtype == np.uint16 and image.shape == ids.shape == (48, 64, 64)
    assert np.array_equal(np.unique(ids)[1:], np.arange(1, ids.max() + 1)) and ids.max() > 20
    cells = ids > 0
    assert 0.2 < cells.mean() < 0.7 and image[cells].mean() > image[~cells].mean() + 30
    touching = (ids[..., 1:] != ids[..., :-1]) & (ids[..., 1:] > 0) & (ids[..., :-1] > 0)
    assert touching.sum() > 100

    from scipy import ndimage

    def extents(labels: np.ndarray, axis: int) -> float:
        return float(np.median([box[axis].stop - box[axis].start for box in ndimage.find_objects(labels)]))

    _, coarse = synthetic_volume((24, 64, 64), np.random.default_rng(7), spacing=(4.0, 1.0, 1.0))
    assert extents(coarse, 0) < 0.5 * extents(coarse, 1)  # a cell spans few planes of 4 um
    assert 0.7 < extents(ids, 0) / extents(ids, 1) < 1.4  # isotropic: round


def test_synthetic_volumes_prepare_split_by_volume_and_are_seeded(tmp_path: Path):
    argv = ["--synthetic", "5", *VOLUME, "--image-size", "32", "--depth-size", "12", "--tile", "16",
            "--tile-depth", "8", "--spacing", "4,1,1", "--seed", "3"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    meta, store = _read(tmp_path / "a")
    assert meta["spacing"] == [4.0, 1.0, 1.0] and meta["spatial_dims"] == 3 and "val_regions" not in meta
    assert len(meta["train_images"]) == 4 and len(meta["val_images"]) == 1  # five volumes: whole ones
    assert meta["source"]["synthetic"] == {"count": 5, "image_size": 32, "depth_size": 12, "spacing": [4.0, 1.0, 1.0]}
    assert store["val"].attrs["shapes"] == [[1, 12, 32, 32]]
    raw = tmp_path / "a" / "raw" / "volumes" / "images"
    with tifffile.TiffFile(raw / "volume_0000.tif") as tiff:
        assert tiff.series[0].axes == "ZYX" and tiff.imagej_metadata["spacing"] == 4.0

    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    for name in sorted(path.name for path in raw.iterdir()):
        again = tmp_path / "b" / "raw" / "volumes" / "images" / name
        assert np.array_equal(tifffile.imread(raw / name), tifffile.imread(again)), name


# ---------------------------------------------------------------- errors and refusals


def test_bad_volumes_are_one_line_naming_the_file_and_shapes(tmp_path: Path, capsys):
    images, masks = _folders(tmp_path)
    image, ids = _volume()
    out = tmp_path / "out"
    cases = [
        (image[0], ids, "a.tif", "image shape (40, 48) (TIFF axes YX) is a 2-D image, but its mask a.tif is a volume of shape "
                                 "(20, 40, 48); --spatial-dims 3 needs (z, y, x) or (z, c, y, x) images"),
        (image, ids[:, :, :40], "a.tif", "image shape (20, 40, 48) (TIFF axes QYX) does not match its mask a.tif "
                                         "of shape (20, 40, 40); expected (z, y, x) or (z, c, y, x) of the mask's "
                                         "z, y and x"),
        (image, ids[0], "a.tif", "mask shape (40, 48); a volume (--spatial-dims 3) needs a single-channel "
                                 "(z, y, x) label volume"),
    ]  # fmt: skip
    for volume, mask, name, expected in cases:
        tifffile.imwrite(images / name, volume)
        tifffile.imwrite(masks / name, mask)
        assert _prepare(images, masks, out, "--val-fraction", "0") == 2
        err = _error(capsys)
        where = masks if "mask shape" in expected else images
        assert err == f"prepare: error: {where / name}: {expected}\n"
    assert not out.exists()

    assert main(["--synthetic", "1", "--spatial-dims", "3", "--format", "zarr", "--out", str(out)]) == 2
    assert "--spatial-dims 3 needs --format webdataset (3-D tiles) or --format zarr --whole-images" in _error(capsys)
    assert not out.exists()  # refused before any synthetic volume was written
    assert main(["--from-shards", "x-{0..1}.tar", *VOLUME, "--out", str(out)]) == 2
    assert "not --from-shards yet" in _error(capsys)
    assert main(["--synthetic", "1", *VOLUME, "--spacing", "4,1", "--out", str(out)]) == 2
    assert "--spacing 4,1: expected three positive voxel sizes z,y,x" in _error(capsys)
    assert main(["--synthetic", "1", "--tile-depth", "8", "--out", str(out)]) == 2
    assert "--tile-depth goes with --spatial-dims 3" in _error(capsys)


def test_a_failed_volume_rerun_keeps_the_old_data_set(tmp_path: Path, capsys):
    images, masks = _folders(tmp_path)
    image, ids = _volume()
    tifffile.imwrite(images / "a.tif", image, imagej=True, metadata={"axes": "ZYX"})
    tifffile.imwrite(masks / "a.tif", ids, imagej=True, metadata={"axes": "ZYX"})
    out = tmp_path / "out"
    assert _prepare(images, masks, out, "--val-fraction", "0") == 0

    def hashes() -> dict[str, str]:
        return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.is_file()}

    before = hashes()
    tifffile.imwrite(images / "b.tif", image)
    tifffile.imwrite(masks / "b.tif", ids[:5])
    assert _prepare(images, masks, out, "--val-fraction", "0") == 2
    assert "b.tif" in _error(capsys)
    assert hashes() == before


@pytest.mark.parametrize(("axes", "planes"), [("ZYX", 3), ("QYX", 6)])
def test_2d_prepare_refuses_a_z_stack_with_the_spatial_dims_hint(tmp_path: Path, capsys, axes: str, planes: int):
    images, masks = _folders(tmp_path)
    stack = np.zeros((planes, 64, 64), np.uint16)
    tifffile.imwrite(images / "stack.tif", stack, **({"metadata": {"axes": axes}} if axes != "QYX" else {}))
    tifffile.imwrite(masks / "stack.tif", np.zeros((64, 64), np.uint16))
    argv = ["--images", str(images), "--masks", str(masks), "--out", str(tmp_path / "out"), "--tile", "32"]
    assert main([*argv, "--val-fraction", "0"]) == 2
    err = _error(capsys)
    assert err.startswith(f"prepare: error: {images / 'stack.tif'}: a z-stack of {planes} planes (shape "
                          f"({planes}, 64, 64), TIFF axes {axes}) with a 2-D mask")  # fmt: skip
    assert "--spatial-dims 3" in err and "TIFF axes CYX" in err


@pytest.mark.parametrize(("axes", "warned"), [("CYX", False), ("QYX", True)])
def test_2d_prepare_still_takes_a_few_planes_or_channels_as_channels(tmp_path: Path, capsys, axes, warned):
    images, masks = _folders(tmp_path)
    tifffile.imwrite(images / "rgb.tif", np.zeros((3, 64, 64), np.uint16), metadata={"axes": axes})
    tifffile.imwrite(masks / "rgb.tif", np.zeros((64, 64), np.uint16))
    argv = ["--images", str(images), "--masks", str(masks), "--out", str(tmp_path / "out"), "--tile", "32"]
    assert main([*argv, "--val-fraction", "0"]) == 0
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["in_channels"] == 3
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("WARNING")]
    assert bool(warnings) == warned
    assert all("a stack of 3 planes" in line and "--spatial-dims 3" in line for line in warnings)
