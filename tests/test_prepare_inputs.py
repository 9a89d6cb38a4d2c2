"""prepare's other inputs (unetdist/data/inputs.py): the user's WebDataset shards, OME-Zarr images with
a label image, OME-TIFF files in the image folders; and their one-line errors."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from unetdist.data.prepare import prepare_dataset
from unetdist.data.synthetic import synthetic_cells
from unetdist.prepare import main
from unetdist.weight_map import border_weight_map

TILE = 32
SIZE = 64
COMMON = ["--tile", str(TILE), "--shard-size", "3", "--val-fraction", "0.34", "--seed", "1"]


def read_prepared(out: Path) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """(dataset.json, {key: {field: array}} of every tile of both splits)."""
    meta = json.loads((out / "dataset.json").read_text())
    samples: dict[str, dict[str, np.ndarray]] = {}
    for name in meta["train_shards"] + meta["val_shards"]:
        with tarfile.open(out / name) as tar:
            for member in tar.getmembers():
                key, field = member.name.split(".", 1)
                samples.setdefault(key, {})[field] = np.load(io.BytesIO(tar.extractfile(member).read()))
    return meta, samples


def _cells(count: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{stem: (uint8 image, uint16 instance ids)}."""
    return {f"cells_{i}": synthetic_cells(SIZE, np.random.default_rng(10 + i)) for i in range(count)}


# the three conventions: (member suffixes, options, mask kind, image and mask as stored)
CONVENTIONS = {
    "instances": (("png", "seg.png"), ["--image-key", "png", "--mask-key", "seg.png"], "instances"),
    "classes": (("tif", "mask.tif"), ["--image-key", "tif"], "classes"),
    "binary": (("npy", "mask.npy"), ["--image-key", "npy", "--mask-key", "mask.npy"], "binary"),
}


def _stored(kind: str, image: np.ndarray, instances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if kind == "classes":  # 16-bit image, class ids 0-3
        return image.astype(np.uint16) * 200, (instances % 4).astype(np.uint8)
    if kind == "binary":  # 0/255
        return image, np.where(instances > 0, 255, 0).astype(np.uint8)
    return image, instances


def _encode(suffix: str, array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    if suffix.endswith("png"):
        Image.fromarray(array).save(buffer, format="PNG")
    elif suffix.endswith("tif"):
        tifffile.imwrite(buffer, array)
    else:
        np.save(buffer, array)
    return buffer.getvalue()


def _write_shards(folder: Path, samples: dict[str, dict[str, bytes]], maxcount: int = 2) -> str:
    """The samples as webdataset.ShardWriter writes them; returns the shards' brace pattern."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / "user-%06d.tar"), maxcount=maxcount, verbose=0, encoder=False) as writer:
        for key, members in samples.items():
            writer.write({"__key__": key, **members})
    count = len(list(folder.glob("user-*.tar")))
    return str(folder / f"user-{{000000..{count - 1:06d}}}.tar")


@pytest.mark.parametrize("kind", list(CONVENTIONS))
def test_user_shards_prepare_like_the_same_images_as_tiff_folders(tmp_path: Path, kind: str):
    (image_member, mask_member), options, mask_kind = CONVENTIONS[kind]
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    shard_samples = {}
    for stem, (image, instances) in _cells(4).items():
        image, mask = _stored(kind, image, instances)
        tifffile.imwrite(images / f"{stem}.tif", image)
        tifffile.imwrite(masks / f"{stem}.tif", mask)
        shard_samples[stem] = {image_member: _encode(image_member, image), mask_member: _encode(mask_member, mask)}
    pattern = _write_shards(tmp_path / "user", shard_samples)

    out = tmp_path / "from-shards"
    assert main(["--from-shards", pattern, *options, "--mask-kind", mask_kind, *COMMON, "--out", str(out)]) == 0
    settings = {"mask_kind": mask_kind, "tile_size": TILE, "shard_size": 3, "val_fraction": 0.34, "seed": 1}
    prepare_dataset(images, masks, tmp_path / "from-folders", **settings)

    meta, samples = read_prepared(out)
    reference_meta, reference = read_prepared(tmp_path / "from-folders")
    for field in ("train_images", "val_images", "num_train_tiles", "num_val_tiles", "num_classes", "in_channels",
                  "image_dtype", "has_weight_map"):  # fmt: skip
        assert meta[field] == reference_meta[field], field
    assert len(samples) == 4 * 4 and sorted(samples) == sorted(reference)
    for key, sample in samples.items():
        assert sorted(sample) == sorted(reference[key])
        for field, array in sample.items():
            np.testing.assert_array_equal(array, reference[key][field], err_msg=f"{key} {field}")
        if kind != "instances":  # instance masks are stored as the ids
            assert set(np.unique(sample["mask.npy"])) <= ({0, 1, 2, 3} if kind == "classes" else {0, 1})
        assert ("weight.npy" in sample) == (kind == "instances")
    mask_key = options[options.index("--mask-key") + 1] if "--mask-key" in options else "mask"
    assert meta["source"]["shards"] == pattern and meta["source"]["mask_key"] == mask_key


def test_a_sample_without_the_named_members_names_shard_key_members_and_options(tmp_path: Path, capsys):
    image, instances = synthetic_cells(SIZE, np.random.default_rng(0))
    pattern = _write_shards(tmp_path / "user", {"cell_7": {"png": _encode("png", image),
                                                           "seg.png": _encode("png", instances)}})  # fmt: skip
    assert main(["--from-shards", pattern, "--out", str(tmp_path / "out"), "--tile", str(TILE)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"prepare: error: {tmp_path / 'user' / 'user-000000.tar'} sample cell_7: no member for --image-key image "
        "(image.npy, image.png, image.tif, image.tiff) or --mask-key mask (mask.npy, mask.png, mask.tif, "
        "mask.tiff); it has ['png', 'seg.png']: set --image-key and --mask-key to the image's and the mask's "
        "names after the key (e.g. --image-key png --mask-key seg.png)\n"
    )
    assert not (tmp_path / "out").exists()

    # the same key in two shards, and a shard that is not there
    again = {"cell_7": {"png": b"", "seg.png": b""}, "cell_8": {"png": b"", "seg.png": b""}}
    pattern = _write_shards(tmp_path / "twice", again, maxcount=1)
    (tmp_path / "twice" / "user-000001.tar").write_bytes((tmp_path / "twice" / "user-000000.tar").read_bytes())
    argv = ["--image-key", "png", "--mask-key", "seg.png", "--out", str(tmp_path / "out")]
    assert main(["--from-shards", pattern, *argv]) == 2
    err = capsys.readouterr().err
    assert "user-000001.tar sample cell_7: the key 'cell_7' of a sample in" in err and err.count("\n") == 1
    assert main(["--from-shards", str(tmp_path / "user" / "user-{000000..000001}.tar"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"prepare: error: {tmp_path / 'user' / 'user-000001.tar'}: no such shard") and err.count("\n") == 1


# ---------------------------------------------------------------- OME-Zarr


@pytest.fixture(scope="module")
def ngff_images(tmp_path_factory) -> tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Two NGFF images written by ome-zarr-py: c=2, z=2, 64x64 uint16 with labels/cells (z, y, x),
    levels 0 and 1 (2x down in y, x); {url: (image czyx, labels zyx)}."""
    pytest.importorskip("ome_zarr")
    import zarr
    from ome_zarr.writer import write_image, write_labels

    folder = tmp_path_factory.mktemp("ngff")
    written = {}
    for index, name in enumerate(("a", "b")):
        rng = np.random.default_rng(index)
        cells = [synthetic_cells(SIZE, rng) for _ in range(2)]
        image = np.stack([np.stack([plane.astype(np.uint16) * 10, 1000 - plane.astype(np.uint16)]) for plane, _ in cells], axis=1)
        labels = np.stack([ids for _, ids in cells]).astype(np.uint32)
        url = str(folder / f"{name}.ome.zarr")
        root = zarr.open_group(url, mode="w")
        write_image(image, root, axes="czyx", scale_factors=[{"y": 2, "x": 2}])
        write_labels(labels, root, name="cells", axes="zyx", scale_factors=[{"y": 2, "x": 2}])
        written[url] = (image, labels)
    return list(written), written


def test_ome_zarr_planes_with_their_labels(tmp_path: Path, ngff_images):
    urls, arrays = ngff_images
    out = tmp_path / "out"
    assert main(["--from-ome-zarr", *urls, "--labels", "cells", "--tile", str(TILE), "--val-fraction", "0.5",
                 "--out", str(out)]) == 0  # fmt: skip
    meta, samples = read_prepared(out)
    assert meta["in_channels"] == 2 and meta["image_dtype"] == "uint16" and meta["has_weight_map"]
    planes = {"a": ["a_t0_z0", "a_t0_z1"], "b": ["b_t0_z0", "b_t0_z1"]}
    assert sorted([meta["train_images"], meta["val_images"]]) == [planes["a"], planes["b"]]  # a stack in one split
    assert len(samples) == 4 * 4 == meta["num_train_tiles"] + meta["num_val_tiles"]
    image, labels = arrays[urls[1]]
    sample = samples["b_t0_z1_y32_x0"]
    np.testing.assert_array_equal(sample["image.npy"], image[:, 1, 32:, :32])
    np.testing.assert_array_equal(sample["mask.npy"], labels[1, 32:, :32])
    np.testing.assert_allclose(sample["weight.npy"], border_weight_map(labels[1])[32:, :32], rtol=1e-6)
    assert meta["source"]["ome_zarr"] == urls and meta["source"]["labels"] == "cells"

    # one channel, at level 1 (the labels' level of the same scale)
    assert main(["--from-ome-zarr", urls[0], "--labels", "cells", "--level", "1", "--channels", "1", "--tile", "16",
                 "--val-fraction", "0", "--out", str(out)]) == 0  # fmt: skip
    meta, samples = read_prepared(out)
    assert meta["in_channels"] == 1 and meta["train_images"] == planes["a"] and len(samples) == 2 * 4
    import zarr

    from unetdist.data.ngff import read_image

    stored = zarr.open_group(urls[0], mode="r")[read_image(urls[0]).levels[1]]  # the writer's own 2x down
    assert stored.shape == (2, 2, 32, 32)
    np.testing.assert_array_equal(samples["a_t0_z0_y16_x0"]["image.npy"], stored[1:2, 0, 16:, :16])


def test_ome_zarr_errors_name_the_url_and_what_to_set(tmp_path: Path, ngff_images, capsys):
    urls, _ = ngff_images
    out = ["--out", str(tmp_path / "out"), "--tile", str(TILE)]
    cases = {
        ("--labels", "nuclei"): f"ome-zarr {urls[0]}: no label image 'nuclei'; its labels/ lists ['cells']: set "
        "--labels NAME to one of them",
        (): f"ome-zarr {urls[0]}: no --labels; its labels/ lists ['cells']: set --labels NAME to one of them",
        ("--labels", "cells", "--channels", "2"): f"ome-zarr {urls[0]}: --channels [2] out of range; it has 2 "
        "channel(s), 0-1",
        ("--labels", "cells", "--level", "2"): f"ome-zarr {urls[0]}: --level 2; it has levels 0-1",
    }
    for options, message in cases.items():
        assert main(["--from-ome-zarr", urls[0], *options, *out]) == 2
        assert capsys.readouterr().err == f"prepare: error: {message}\n"
    missing = str(tmp_path / "none.ome.zarr")
    assert main(["--from-ome-zarr", missing, "--labels", "cells", *out]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"prepare: error: ome-zarr {missing}: not found") and err.count("\n") == 1
    assert main(["--from-ome-zarr", urls[0], "--images", str(tmp_path), "--labels", "cells", *out]) == 2
    assert capsys.readouterr().err == "prepare: error: give one input, not --images/--masks and --from-ome-zarr\n"
    assert main(["--images", str(tmp_path), "--masks", str(tmp_path), "--image-key", "png", *out]) == 2
    assert capsys.readouterr().err == "prepare: error: --image-key goes with --from-shards\n"


# ---------------------------------------------------------------- OME-TIFF


@pytest.mark.parametrize(("axes", "shape"), [("CYX", (3, SIZE, SIZE)), ("YXS", (SIZE, SIZE, 3))])
def test_ome_tiff_channels_by_its_axes_and_stem_without_ome(tmp_path: Path, axes: str, shape: tuple):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    data = np.random.default_rng(0).integers(0, 255, size=shape, dtype=np.uint8)
    photometric = "rgb" if axes == "YXS" else "minisblack"
    tifffile.imwrite(images / "x.ome.tif", data, ome=True, photometric=photometric, metadata={"axes": axes})
    _, instances = synthetic_cells(SIZE, np.random.default_rng(1))
    tifffile.imwrite(masks / "x.tif", instances)
    out = tmp_path / "out"
    assert main(["--images", str(images), "--masks", str(masks), "--out", str(out), "--tile", str(TILE),
                 "--val-fraction", "0"]) == 0  # fmt: skip
    meta, samples = read_prepared(out)
    assert meta["in_channels"] == 3 and meta["train_images"] == ["x"] and len(samples) == 4
    chw = data if axes == "CYX" else data.transpose(2, 0, 1)
    np.testing.assert_array_equal(samples["x_y32_x0"]["image.npy"], chw[:, 32:, :32])


def test_ome_tiff_planes_are_images_of_one_split_and_a_2d_mask_is_refused(tmp_path: Path, capsys):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    stacks = {}
    for index, stem in enumerate(("s", "t")):
        cells = [synthetic_cells(SIZE, np.random.default_rng(20 + 2 * index + z)) for z in range(2)]
        stack = np.stack([np.stack([plane, 255 - plane]) for plane, _ in cells])  # ZCYX
        tifffile.imwrite(images / f"{stem}.ome.tif", stack, ome=True, metadata={"axes": "ZCYX"})
        labels = np.stack([ids for _, ids in cells])
        tifffile.imwrite(masks / f"{stem}.ome.tif", labels, ome=True, metadata={"axes": "ZYX"})
        stacks[stem] = (stack, labels)
    out = tmp_path / "out"
    argv = ["--images", str(images), "--masks", str(masks), "--out", str(out), "--tile", str(TILE)]
    assert main([*argv, "--val-fraction", "0.5"]) == 0
    meta, samples = read_prepared(out)
    assert meta["in_channels"] == 2 and len(samples) == 4 * 4
    assert sorted([meta["train_images"], meta["val_images"]]) == [["s_t0_z0", "s_t0_z1"], ["t_t0_z0", "t_t0_z1"]]
    stack, labels = stacks["t"]
    np.testing.assert_array_equal(samples["t_t0_z1_y0_x32"]["image.npy"], stack[1, :, :32, 32:])
    np.testing.assert_array_equal(samples["t_t0_z1_y0_x32"]["mask.npy"], labels[1, :32, 32:])

    (masks / "t.ome.tif").unlink()
    tifffile.imwrite(masks / "t.tif", labels[0])
    capsys.readouterr()
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"prepare: error: {masks / 't.tif'}: shape (64, 64), for t.ome.tif of T=1 x Z=2 planes of 64x64 (axes "
        "ZCYX); expected one HxW mask plane per image plane (e.g. ZYX [2, 64, 64]): each plane is prepared as "
        "its own 2-D image\n"
    )


# ---------------------------------------------------------------- at URLs


def test_shards_and_ome_zarr_at_urls_prepare_like_local_ones(tmp_path: Path, s3, ngff_images):
    from unetdist.data import remote

    bucket = "unetdist-prepare-inputs"
    s3.create_bucket(bucket)
    samples = {stem: {"png": _encode("png", image), "seg.png": _encode("png", ids)}
               for stem, (image, ids) in _cells(3).items()}  # fmt: skip
    pattern = _write_shards(tmp_path / "user", samples)
    urls, _ = ngff_images
    for folder in (tmp_path / "user", Path(urls[0])):  # s3://BUCKET/user/..., s3://BUCKET/a.ome.zarr/...
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                remote.upload_file(path, f"s3://{bucket}/{path.relative_to(folder.parent)}")
    inputs = {
        "shards": (["--from-shards", pattern, "--image-key", "png", "--mask-key", "seg.png"],
                   ["--from-shards", f"s3://{bucket}/user/user-{{000000..000001}}.tar", "--image-key", "png", "--mask-key", "seg.png"]),
        "ome-zarr": (["--from-ome-zarr", urls[0], "--labels", "cells"],
                     ["--from-ome-zarr", f"s3://{bucket}/a.ome.zarr", "--labels", "cells"]),
    }  # fmt: skip
    for name, (local, at_url) in inputs.items():
        # one 64-px image (its two planes are one stack) holds no held-out region of a 32-px tile
        split = ["--val-fraction", "0"] if name == "ome-zarr" else []
        assert main([*local, *COMMON, *split, "--out", str(tmp_path / "local")]) == 0
        assert main([*at_url, *COMMON, *split, "--out", str(tmp_path / "remote")]) == 0
        meta, tiles = read_prepared(tmp_path / "remote")
        local_meta, local_tiles = read_prepared(tmp_path / "local")
        assert meta["train_images"] == local_meta["train_images"] and sorted(tiles) == sorted(local_tiles)
        for key, sample in tiles.items():
            for field, array in sample.items():
                np.testing.assert_array_equal(array, local_tiles[key][field])
    assert meta["source"]["ome_zarr"] == [f"s3://{bucket}/a.ome.zarr"]
