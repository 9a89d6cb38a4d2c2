"""Tar shard source: shard lists, header-only index, random-access reads, dtype-keeping decode, bad data."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from unetdist.data.prepare import prepare_dataset
from unetdist.data.samples import DataError, SampleChecks, decode_field
from unetdist.data.sources.tar import TarShards, list_shards
from unetdist.data.sources.tar_index import index_tar
from unetdist.data.synthetic import write_synthetic

TILE = 32
CHECKS = SampleChecks(tile_size=TILE, in_channels=1, num_classes=2, use_weight_map=True)
INSTANCES = SampleChecks(tile_size=TILE, in_channels=1, num_classes=2, use_weight_map=True, mask_kind="instances")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    images, masks = write_synthetic(out, count=6, image_size=96, seed=0)
    prepare_dataset(images, masks, out, tile_size=TILE, shard_size=6, val_fraction=0.2, seed=0)
    return out


def write_shards(folder: Path, samples: list[dict], per_shard: int = 2) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / "s-%06d.tar"), maxcount=per_shard, verbose=0) as writer:
        for sample in samples:
            writer.write(sample)
    return sorted(str(path) for path in folder.glob("s-*.tar"))


def hand_sample(key: str, size: int = TILE, label: int = 1, **fields) -> dict:
    mask = np.zeros((size, size), np.uint8)
    mask[: size // 2] = label
    sample = {"__key__": key, "image.npy": np.ones((1, size, size), np.uint8), "mask.npy": mask,
              "weight.npy": np.ones((size, size), np.float32)}
    sample.update(fields)
    return {name: value for name, value in sample.items() if value is not None}


def test_list_shards_pattern_and_errors(prepared: Path, tmp_path: Path):
    root_list = list_shards(str(prepared), "train")
    assert list_shards(None, "train", str(prepared / "train-{000000..000007}.tar")) == root_list
    with pytest.raises(ValueError, match="do not exist"):
        list_shards(None, "train", str(prepared / "train-{000000..000009}.tar"))
    with pytest.raises(ValueError, match=str(tmp_path / "dataset.json")):
        list_shards(str(tmp_path), "train")


def test_index_matches_webdataset_and_reads_by_index(prepared: Path):
    shards = list_shards(str(prepared), "train")
    source = TarShards(shards, INSTANCES)  # prepare stores the instance ids
    for unit, path in enumerate(shards[:3]):
        stored = list(wds.WebDataset(path, shardshuffle=False, empty_check=False).decode())
        expected = [sample["__key__"] for sample in stored]
        assert [s.key for s in index_tar(path).samples] == expected
        reversed_read = source.read(unit, [len(expected) - 1, 0])
        assert [s.key for s in reversed_read] == [expected[-1], expected[0]]
        # the ids read back as stored (uint16), the training mask their foreground
        last = stored[-1]["mask.npy"]
        assert last.dtype == np.uint16 and last.max() > 1
        assert np.array_equal(reversed_read[0].instances, last)
        assert np.array_equal(reversed_read[0].mask, (last > 0).astype(np.uint8))


def test_sixteen_bit_png_keeps_its_dtype():
    image = (np.arange(32 * 32, dtype=np.uint16) * 60).reshape(32, 32)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    decoded = decode_field("image.png", buffer.getvalue())
    assert decoded.dtype == np.uint16 and np.array_equal(decoded, image)


def test_stream_urls_are_refused_with_advice():
    with pytest.raises(ValueError, match="random access"):
        TarShards(["pipe:cat x.tar"], CHECKS, counts=[1])


def _corrupt(data: bytes) -> bytes:
    return b"\x93NUMPY garbage" + data[:5]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (hand_sample("no_mask", **{"mask.npy": None}), r"sample no_mask: no member for \['mask'\] .*it has "
         r"\['image.npy', 'weight.npy'\]: set data.image_key and data.mask_key"),
        (hand_sample("label", label=3), r"sample label: mask label 3 out of range.*data.mask_kind=instances$"),
        (hand_sample("binary", label=255), r"sample binary: mask labels 0/255; binary masks are 0/1 here: "
         r"set data.mask_kind=binary$"),
        (hand_sample("shape", **{"mask.npy": np.zeros((TILE, TILE + 1), np.uint8)}), r"sample shape: image size"),
        (hand_sample("dtype", **{"mask.npy": np.zeros((TILE, TILE), np.float32)}), r"sample dtype: mask must be an integer"),
        (hand_sample("npy", **{"image.npy": None, "image.tif": b"not a tiff"}), r"sample npy: cannot decode image.tif"),
        (hand_sample("png", **{"image.npy": None, "image.png": b"\x89PNG broken"}), r"sample png: cannot decode image.png"),
        (hand_sample("small", size=16), r"sample small: tile \(16, 16\) is smaller than data.tile_size=32"),
    ],
)
def test_bad_samples_are_named_errors(tmp_path: Path, bad, message):
    shards = write_shards(tmp_path, [hand_sample("good_a"), hand_sample("good_b"), bad])
    result = TarShards(shards, CHECKS).read(1, [0])[0]
    assert isinstance(result, DataError)
    assert f"shard {shards[1]}" in str(result)
    assert pytest.importorskip("re").search(message, str(result))


def test_truncated_tar_names_missing_samples(tmp_path: Path):
    shards = write_shards(tmp_path, [hand_sample(f"k{i}") for i in range(4)], per_shard=4)
    data = Path(shards[0]).read_bytes()
    Path(shards[0]).write_bytes(data[: len(data) // 2])
    results = TarShards(shards, CHECKS, counts=[4]).read(0, [0, 1, 2, 3])
    assert not isinstance(results[0], DataError)
    assert isinstance(results[3], DataError) and "truncated" in str(results[3]) and shards[0] in str(results[3])
