"""Pre-tiled Zarr stores: every codec reads back exactly (directly and in fork/spawn workers), bad chunks are named."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader, IterableDataset

from unetdist.data.layout import CODECS
from unetdist.data.samples import DataError, SampleChecks
from unetdist.data.sources.zarr_tiles import ZarrTiles
from unetdist.data.synthetic import write_synthetic
from unetdist.data.writers import ZarrWriter
from unetdist.prepare import main as prepare_main

TILE, TILES, CHUNK = 32, 10, 4  # 10 tiles in chunks of 4: the last chunk is partly filled
DTYPES = ("uint8", "uint16", "float32")


def _tiles(dtype: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if dtype == "float32":
        images = rng.normal(size=(TILES, 1, TILE, TILE)).astype(np.float32)
    else:
        images = rng.integers(0, np.iinfo(dtype).max, size=(TILES, 1, TILE, TILE), endpoint=True, dtype=dtype)
    masks = rng.integers(0, 2, size=(TILES, TILE, TILE), dtype=np.uint8)
    weights = rng.random((TILES, TILE, TILE), dtype=np.float32)
    return images, masks, weights


def _store(folder: Path, codec: str, dtype: str) -> Path:
    store = folder / f"{codec}-{dtype}.zarr"
    writer = ZarrWriter(store, "train", chunk_tiles=CHUNK, codec=codec)
    for index, (image, mask, weight) in enumerate(zip(*_tiles(dtype), strict=True)):
        writer.write(f"img.{index // 4}", 0, TILE * index, image, mask, weight)
    writer.close()
    return store


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("codec", CODECS)
def test_every_codec_reads_back_the_stored_dtype_exactly(tmp_path: Path, codec: str, dtype: str):
    store = _store(tmp_path, codec, dtype)
    assert bool(zarr.open_array(str(store / "train" / "image")).compressors) == (codec != "none")
    tiles = ZarrTiles(store, "train", SampleChecks(TILE, 1, 2, True))
    tiles._open()
    assert all(files is not None for files in tiles._chunk_files.values())  # the direct path, not zarr's
    images, masks, weights = _tiles(dtype)
    order = [9, 0, 3, 4, 5, 8, 1]  # across chunk borders, into the partly filled last chunk
    for index, sample in zip(order, tiles.read(0, order), strict=True):
        assert sample.image.dtype == np.dtype(dtype) and np.array_equal(sample.image, images[index])
        assert np.array_equal(sample.mask, masks[index]) and np.array_equal(sample.weight, weights[index])
        assert sample.key == f"img_{index // 4}_y0_x{TILE * index}"
    runs = [(0, 3), (3, 9), (9, 10)]
    names = ["image", "mask", "weight"]
    for direct, through_zarr in zip(tiles._read_runs(runs), tiles._read_runs_with_zarr(runs, names), strict=True):
        for name in [*names, "origin"]:
            assert direct[name].dtype == through_zarr[name].dtype
            assert np.array_equal(direct[name], through_zarr[name])


class _ReadInWorker(IterableDataset):
    """Every tile of a store read in a DataLoader worker, with whether Blosc may use threads there."""

    def __init__(self, tiles: ZarrTiles) -> None:
        self.tiles = tiles

    def __iter__(self):
        import numcodecs.blosc

        samples = self.tiles.read(0, list(range(TILES)))
        images = np.stack([sample.image for sample in samples])
        yield torch.from_numpy(images), numcodecs.blosc._get_use_threads()


@pytest.mark.parametrize("context", ["fork", "spawn"])
@pytest.mark.parametrize("codec", CODECS)
def test_every_codec_reads_in_fork_and_spawn_workers_with_single_threaded_blosc(tmp_path: Path, codec, context,
                                                                                 monkeypatch):
    import numcodecs.blosc

    monkeypatch.setattr(numcodecs.blosc, "use_threads", None)  # numcodecs' default, restored afterwards
    store = _store(tmp_path, codec, "uint16")
    tiles = ZarrTiles(store, "train", SampleChecks(TILE, 1, 2, False))
    tiles.read(0, [0, 5])  # the parent has read too (opened, decoded) before the workers start
    if codec == "lz4":  # the direct path never starts Blosc's thread pool, in the parent either
        assert numcodecs.blosc._get_use_threads() is False
    loader = DataLoader(_ReadInWorker(tiles), batch_size=None, num_workers=1, multiprocessing_context=context)
    (images, blosc_threads), = list(loader)
    assert images.dtype == torch.uint16 and np.array_equal(images.numpy(), _tiles("uint16")[0])
    assert blosc_threads is False


@pytest.mark.parametrize("codec", CODECS)
def test_a_corrupt_chunk_is_a_named_data_error_and_spares_the_other_chunks(tmp_path: Path, codec: str):
    store = _store(tmp_path, codec, "uint16")
    chunk = store / "train" / "image" / "c" / "1" / "0" / "0" / "0"  # tiles 4..7
    chunk.write_bytes(chunk.read_bytes()[:100])  # cut short (an uncompressed chunk has no checksum to fail)
    tiles = ZarrTiles(store, "train", SampleChecks(TILE, 1, 2, False))
    results = tiles.read(0, list(range(TILES)))
    for index, result in enumerate(results):
        if 4 <= index < 8:
            assert isinstance(result, DataError)
            assert re.match(rf"zarr store {re.escape(str(store))}/train sample #{index} \(chunk 1\): cannot decode", str(result))
        else:
            assert np.array_equal(result.image, _tiles("uint16")[0][index])


def test_prepare_zarr_codec_option(tmp_path: Path):
    images, masks = write_synthetic(tmp_path, count=2, image_size=64, seed=0)
    common = ["--images", str(images), "--masks", str(masks), "--tile", str(TILE), "--format", "zarr"]
    assert prepare_main([*common, "--out", str(tmp_path / "default")]) == 0
    assert prepare_main([*common, "--out", str(tmp_path / "lz4"), "--zarr-codec", "lz4"]) == 0
    for name in ("image", "mask", "weight"):
        assert zarr.open_array(str(tmp_path / "default" / "data.zarr" / "train" / name)).compressors == ()
        (blosc,) = zarr.open_array(str(tmp_path / "lz4" / "data.zarr" / "train" / name)).compressors
        assert blosc.cname.value == "lz4"
    assert prepare_main([*common, "--out", str(tmp_path / "whole"), "--whole-images", "--zarr-codec", "zstd"]) == 2


def _other_layouts(folder: Path) -> dict[str, tuple[Path, str]]:
    """Stores that are not what prepare writes, and what the refusal must say about each."""
    ome = zarr.open_group(str(folder / "ome.zarr"), mode="w")  # e.g. an OME-Zarr image: arrays at the root
    ome.create_array("0", shape=(1, 64, 64), dtype="uint16")
    flat = zarr.open_group(str(folder / "flat.zarr"), mode="w")
    split = flat.create_group("train")
    split.create_array("image", shape=(4, TILE, TILE), dtype="uint8")  # no channel axis
    split.create_array("mask", shape=(4, TILE, TILE), dtype="float32")
    (folder / "plain").mkdir()
    return {
        "ome": (folder / "ome.zarr", r": no group 'train'; it holds \['0'\]"),
        "flat": (folder / "flat.zarr", r"/train: image \[4, 32, 32\] uint8 has 3 dimensions, expected 4; "
                                       r"mask \[4, 32, 32\] float32 has an unexpected dtype"),
        "plain": (folder / "plain", r": no zarr\.json, not a Zarr v3 store"),
    }


@pytest.mark.parametrize("case", ["ome", "flat", "plain"])
def test_a_store_of_another_layout_says_what_was_expected(tmp_path: Path, case: str):
    from unetdist.config import DataConfig
    from unetdist.data.sources import open_source

    store, found = _other_layouts(tmp_path)[case]
    data = DataConfig(format="zarr", zarr_store=str(store), tile_size=TILE)
    with pytest.raises(ValueError) as caught:
        open_source(data, "train", SampleChecks(TILE, 1, 2, False))
    message = str(caught.value)
    assert re.match(rf"zarr store {re.escape(str(store))}{found}; expected a Zarr v3 store as "
                    r"`python -m unetdist.prepare --format zarr` writes: groups train/ and val/, each holding arrays "
                    r"image \[N, C, T, T\]", message), message
    assert "\n" not in message and "whole-images" in message


def test_train_with_only_a_zarr_store_of_another_layout_exits_2_naming_it(tmp_path: Path):
    """The real entry point: data.zarr_store without data.root passes the config check, and the
    store's layout is refused in one line (zarr's own "No group found in store" said neither)."""
    import subprocess
    import sys

    from conftest import REPO_ROOT

    store, _ = _other_layouts(tmp_path)["ome"]
    result = subprocess.run(
        [sys.executable, "-m", "unetdist.train", "data.format=zarr", f"data.zarr_store={store}",
         f"data.tile_size={TILE}", "model.preset=padded", "model.base_width=4", "model.depth=2",
         "tracking.enabled=false", f"train.output_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "No group found" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert f"ERROR unetdist.train: zarr store {store}: no group 'train'; it holds ['0']; expected" in last, last
