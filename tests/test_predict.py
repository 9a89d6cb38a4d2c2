"""Inference at any image size: overlap-tile exactness, seamless Gaussian blending, Zarr
block-wise and distributed prediction under a memory limit, the CLI, instances; tiles from the
memory budget equal one whole-image pass; instances decoded as the model stores it, or as
``--tune`` chooses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from torch import nn

from unetdist.data.augment import NORMALISATION_EPSILON
from unetdist.data.synthetic import synthetic_cells
from unetdist.decoding import best_params, decoding_grid, tuning_counts
from unetdist.inference import (
    ChannelStats,
    InputError,
    ModelGeometry,
    TilePredictor,
    engine,
    predict_array,
    tiling,
)
from unetdist.inference.loading import ModelLoadError, load_model
from unetdist.inference.planning import plan_tiles, tiles_per_batch
from unetdist.inference.zarr_io import predict_zarr
from unetdist.instances import DecodeParams, decode_instances, instances_from_labels
from unetdist.model import build_unet

REPO_ROOT = Path(__file__).resolve().parents[1]


def _randomise_batchnorm(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _whole_image_pass(model: nn.Module, image: np.ndarray) -> np.ndarray:
    """Softmax of ONE forward over the whole image, mirrored by the context margin."""
    geometry = ModelGeometry.of(model)
    size = image.shape[-1]
    trailing = geometry.trailing_context
    tile = next(
        t
        for t in range(size, size + 400)
        if geometry.is_valid_tile(t) and model.output_size(t) >= size + trailing
    )
    margin = (tile - model.output_size(tile)) // 2
    after = tile - size - margin
    padded = np.pad(image[None], ((0, 0), (margin, after), (margin, after)), mode="reflect")
    x = engine.normalise(padded, ChannelStats.of(image[None]))
    with torch.inference_mode():
        return torch.softmax(model(torch.from_numpy(x)[None]), dim=1)[0, :, :size, :size].numpy()


@pytest.mark.parametrize(("preset", "depth"), [("paper", 2), ("paper", 3), ("article", 2)])
def test_overlap_tile_equals_single_whole_image_pass(preset: str, depth: int) -> None:
    torch.manual_seed(0)
    model = _randomise_batchnorm(build_unet(preset, 1, 3, base_width=4, depth=depth))
    geometry = ModelGeometry.of(model)
    image = np.random.default_rng(0).integers(0, 255, (90, 90)).astype(np.uint8)
    whole = _whole_image_pass(model, image)
    tiles = [t for t in range(40, 200) if geometry.is_valid_tile(t) and geometry.kept_step(t) >= 32][:2]
    for tile in tiles:
        stitched = predict_array(model, image, tile=tile, batch_size=3, return_probabilities=True)
        assert stitched.shape == whole.shape
        assert np.abs(stitched - whole).max() < 1e-5, f"tile {tile}"
        assert predict_array(model, image, tile=tile).dtype == np.uint8


class Pointwise(nn.Module):
    """A 'padded' model whose output at a pixel (a voxel: ``spatial_dims=3``) depends on that pixel only."""

    padded, depth, in_channels, num_classes = True, 2, 1, 3

    def __init__(self, spatial_dims: int = 2) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.mix = (nn.Conv2d if spatial_dims == 2 else nn.Conv3d)(1, 3, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(torch.sin(3 * x))


def test_gaussian_window_is_seamless() -> None:
    model = Pointwise()
    constant = np.full((150, 230), 7, dtype=np.uint16)
    probabilities = predict_array(model, constant, tile=64, overlap=0.5, return_probabilities=True)
    assert np.ptp(probabilities, axis=(1, 2)).max() < 1e-6  # constant in, constant out: no seams
    image = np.random.default_rng(1).normal(size=(150, 230)).astype(np.float32)
    stitched = predict_array(model, image, tile=64, overlap=0.25, return_probabilities=True)
    x = engine.normalise(image[None], ChannelStats.of(image[None]))
    with torch.inference_mode():
        whole = torch.softmax(model(torch.from_numpy(x)[None]), 1)[0].numpy()
    assert np.abs(stitched - whole).max() < 1e-5


def test_padded_unet_any_size_flips_and_normalisation() -> None:
    torch.manual_seed(0)
    model = build_unet("padded", 2, 2, base_width=4, depth=2).eval()
    image = np.random.default_rng(2).integers(0, 4000, (2, 70, 301)).astype(np.uint16)
    probabilities = predict_array(model, image, tile=64, flips=True, return_probabilities=True)
    assert probabilities.shape == (2, 70, 301) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(0), 1.0, atol=1e-5)
    # whole-image z-score: a gain and offset of the raw intensities change nothing
    rescaled = predict_array(
        model, image.astype(np.float64) * 3.0 + 100.0, tile=64, flips=True, return_probabilities=True
    )
    assert np.abs(rescaled - probabilities).max() < 1e-4
    assert engine.NORMALISATION_EPSILON == NORMALISATION_EPSILON
    model.train()
    predict_array(model, image[:, :32, :32])
    assert model.training  # the caller's mode is restored


def test_wrong_channel_count_is_named() -> None:
    model = build_unet("padded", 3, 2, base_width=4, depth=2)
    with pytest.raises(InputError, match="has 1 channel.*expects 3"):
        predict_array(model, np.zeros((40, 40), np.uint8))
    with pytest.raises(ValueError, match="nearest valid sizes"):
        predict_array(build_unet("paper", 1, 2, base_width=4, depth=2), np.zeros((40, 40)), tile=50)


def test_tiling_helpers() -> None:
    assert list(tiling.mirror_indices(-3, 6, 4)) == [3, 2, 1, 0, 1, 2, 3, 2, 1]
    assert tiling.sliding_origins(10, 4, 3) == [0, 3, 6]
    assert tiling.sliding_origins(3, 4, 3) == [0]
    window = tiling.gaussian_window(32)
    assert window.max() == 1.0 and window.min() > 0 and np.allclose(window, window.T)
    array = np.arange(2 * 5 * 6).reshape(2, 5, 6)
    expected = np.pad(array, ((0, 0), (3, 9), (2, 8)), mode="reflect")
    np.testing.assert_array_equal(tiling.read_mirrored(array, -3, 14, -2, 14), expected)


def _checkpoint(directory: Path, model_config: dict, model: nn.Module) -> Path:
    """A single-file trainer state (what ``unetdist.checkpoint.load_checkpoint`` takes for a file)."""
    state = {"model": model.state_dict(), "config": {"model": model_config, "data": {"tile_size": 64}}, "step": 5}
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / "model.pt")
    return directory / "model.pt"


def test_load_model_from_checkpoint_and_mismatch_named(tmp_path: Path) -> None:
    config = {
        "preset": "padded",
        "in_channels": 1,
        "num_classes": 2,
        "base_width": 4,
        "depth": 2,
        "norm": "batch",
    }
    good = _checkpoint(tmp_path / "good", config, build_unet("padded", 1, 2, base_width=4, depth=2))
    model, meta = load_model(str(good))
    assert (meta["preset"], meta["step"], meta["tile_size"], model.training) == ("padded", 5, 64, False)
    other = _checkpoint(tmp_path / "bad", config, build_unet("padded", 1, 2, base_width=8, depth=2))
    with pytest.raises(ModelLoadError, match=str(other).replace(".", r"\.") + ".*do not match"):
        load_model(str(other))
    with pytest.raises(ModelLoadError, match="no such checkpoint"):
        load_model(str(tmp_path / "missing.pt"))


def _write_zarr(path: Path, image: np.ndarray, chunks: tuple[int, ...]) -> None:
    import zarr

    zarr.create_array(store=str(path), data=image, chunks=chunks, overwrite=True)


def test_zarr_blockwise_equals_in_memory(tmp_path: Path) -> None:
    import zarr

    torch.manual_seed(0)
    image = np.random.default_rng(3).integers(0, 255, (2, 150, 170)).astype(np.uint8)
    _write_zarr(tmp_path / "in.zarr", image, (2, 64, 64))
    for model, tile in (
        (build_unet("padded", 2, 2, base_width=4, depth=2).eval(), 48),
        (build_unet("paper", 2, 2, base_width=4, depth=2), 60),
    ):
        predict_zarr(
            model,
            zarr.open_array(str(tmp_path / "in.zarr")),
            "in",
            tmp_path / "mask.zarr",
            tmp_path / "prob.zarr",
            block=72,
            tile=tile,
        )
        expected = predict_array(model, image, tile=tile, return_probabilities=True)
        probabilities = zarr.open_array(str(tmp_path / "prob.zarr"))[:]
        assert np.abs(probabilities.astype(np.float32) - expected).max() < 2e-3  # float16 storage
        agree = zarr.open_array(str(tmp_path / "mask.zarr"))[:] == expected.argmax(0)
        assert agree.mean() > 0.999


def _tiny_checkpoint(directory: Path, in_channels: int = 1) -> Path:
    torch.manual_seed(0)
    config = {
        "preset": "padded",
        "in_channels": in_channels,
        "num_classes": 2,
        "base_width": 4,
        "depth": 2,
        "norm": "batch",
    }
    return _checkpoint(directory, config, build_unet("padded", in_channels, 2, base_width=4, depth=2))


def _run(args: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, **kwargs)


@pytest.mark.slow
def test_zarr_two_ranks_equal_one(tmp_path: Path) -> None:
    import zarr

    checkpoint = _tiny_checkpoint(tmp_path / "ckpt")
    image = np.random.default_rng(4).integers(0, 255, (200, 260)).astype(np.uint8)
    _write_zarr(tmp_path / "big.zarr", image, (64, 64))
    common = [
        "--model",
        str(checkpoint),
        "--input",
        str(tmp_path / "big.zarr"),
        "--tile",
        "64",
        "--block",
        "64",
        "--probabilities",
        "--instances",
    ]
    single = _run(
        [sys.executable, "-m", "unetdist.predict", *common, "--output", str(tmp_path / "one")], tmp_path
    )
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    double = _run([*torchrun, "-m", "unetdist.predict", *common, "--output", str(tmp_path / "two")], tmp_path)
    assert double.returncode == 0, double.stderr
    for name in ("big_mask.zarr", "big_prob.zarr", "big_instances.zarr"):
        one = zarr.open_array(str(tmp_path / "one" / name))[:]
        two = zarr.open_array(str(tmp_path / "two" / name))[:]
        np.testing.assert_array_equal(one, two)


MEMORY_LIMITED = textwrap.dedent(
    """
    import resource, sys, numpy as np, torch, zarr
    from unetdist.inference.zarr_io import predict_zarr
    from unetdist.model import build_unet
    source, out, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.manual_seed(0)
    model = build_unet("padded", 96, 2, base_width=4, depth=2).eval()
    array = zarr.open_array(source, mode="r")
    with torch.inference_mode():
        model(torch.zeros(4, 96, 64, 64))  # warm up allocator and threads before the cap
    used = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    resource.setrlimit(resource.RLIMIT_DATA, (used + limit, used + limit))
    predict_zarr(model, array, "lazy", out, block=128, tile=64, batch_size=4)
    print("peak_rss_growth", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - used)
    """
)


@pytest.mark.slow
def test_zarr_image_larger_than_memory_limit(tmp_path: Path) -> None:
    """96 x 1024 x 1024 float32 (384 MiB) read lazily (unwritten chunks are the fill value)
    and predicted under a 160 MiB data limit: only blocks are ever in memory."""
    import zarr

    shape = (96, 1024, 1024)
    array = zarr.create_array(
        store=str(tmp_path / "lazy.zarr"),
        shape=shape,
        chunks=(96, 128, 128),
        dtype=np.float32,
        fill_value=5.0,
    )
    array[:, :128, :128] = np.random.default_rng(5).normal(size=(96, 128, 128)).astype(np.float32)
    image_bytes = int(np.prod(shape)) * 4
    limit = 160 * 2**20
    assert image_bytes > 2 * limit
    result = _run(
        [
            sys.executable,
            "-c",
            MEMORY_LIMITED,
            str(tmp_path / "lazy.zarr"),
            str(tmp_path / "out.zarr"),
            str(limit),
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    labels = zarr.open_array(str(tmp_path / "out.zarr"))
    assert labels.shape == shape[1:] and labels.dtype == np.uint8


def test_cli_folder_with_bad_files_predicts_the_rest(tmp_path: Path) -> None:
    from unetdist.inference.cli import main

    checkpoint = _tiny_checkpoint(tmp_path / "ckpt")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(6)
    tifffile.imwrite(images / "good_a.tif", rng.integers(0, 255, (50, 70)).astype(np.uint8))
    tifffile.imwrite(images / "good_b.tif", rng.integers(0, 255, (64, 64, 1)).astype(np.uint16))
    tifffile.imwrite(images / "rgb.tif", rng.integers(0, 255, (40, 40, 3)).astype(np.uint8))
    (images / "broken.tif").write_bytes(b"not a tiff")
    code = main(
        [
            "--model",
            str(checkpoint),
            "--input",
            str(images),
            "--output",
            str(tmp_path / "out"),
            "--instances",
            "--probabilities",
            "--device",
            "cpu",
        ]
    )
    assert code == 2
    out = tmp_path / "out"
    for stem, shape in (("good_a", (50, 70)), ("good_b", (64, 64))):
        assert tifffile.imread(out / f"{stem}_mask.tif").shape == shape
        assert tifffile.imread(out / f"{stem}_prob.tif").dtype == np.float16
        assert tifffile.imread(out / f"{stem}_instances.tif").dtype == np.uint16
    assert not (out / "rgb_mask.tif").exists() and not (out / "broken_mask.tif").exists()


def test_cli_failures_are_listed_and_bad_model_exits_2(tmp_path: Path) -> None:
    checkpoint = _tiny_checkpoint(tmp_path / "ckpt")
    image = tmp_path / "rgb.png"
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    result = _run(
        [
            sys.executable,
            "-m",
            "unetdist.predict",
            "--model",
            str(checkpoint),
            "--input",
            str(image),
            "--output",
            str(tmp_path / "o"),
        ],
        tmp_path,
    )
    assert result.returncode == 2
    assert f"failed: {image}" in result.stderr and "the model expects 1" in result.stderr
    from unetdist.inference.cli import main

    assert (
        main(["--model", str(tmp_path / "nope.pt"), "--input", str(image), "--output", str(tmp_path / "o")])
        == 2
    )


def test_instances_split_touching_cells_and_border_class() -> None:
    yy, xx = np.mgrid[:40, :60]
    labels = (((yy - 20) ** 2 + (xx - 18) ** 2 < 121) | ((yy - 20) ** 2 + (xx - 38) ** 2 < 121)).astype(
        np.uint8
    )
    assert instances_from_labels(labels, split_touching=False).max() == 1
    instances = instances_from_labels(labels)
    assert instances.max() == 2 and instances.dtype == np.uint16
    assert instances[20, 10] != instances[20, 46] and (instances[labels == 0] == 0).all()
    bordered = labels.copy()
    bordered[:, 28] = 2
    split = instances_from_labels(bordered, border_class=2)
    assert split.max() == 2 and (split[bordered > 0] > 0).all()


@pytest.mark.slow
def test_trained_model_segments_synthetic_val_images(cell_shards: Path, tmp_path: Path) -> None:
    """Measured: 60 steps of the quickstart model give foreground Dice 0.94 and AP 0.86 on
    the two 128x128 val images (30 steps: see the threshold below)."""
    train = _run(
        [
            sys.executable,
            "-m",
            "unetdist.train",
            "--config",
            str(REPO_ROOT / "configs/quickstart.yaml"),
            f"data.root={cell_shards}",
            "train.max_steps=40",
            "train.global_batch_size=8",
            "train.val_every=1000",
            "train.val_at_start=false",
            f"train.output_dir={tmp_path / 'run'}",
            "tracking.enabled=false",
            "train.progress=false",
        ],
        tmp_path,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    val = json.loads((cell_shards / "dataset.json").read_text())["val_images"]
    images = [str(cell_shards / "raw" / "images" / f"{stem}.tif") for stem in val]
    predict = _run(
        [
            sys.executable,
            "-m",
            "unetdist.predict",
            "--model",
            str(tmp_path / "run"),
            "--input",
            *images,
            "--output",
            str(tmp_path / "pred"),
            "--instances",
        ],
        tmp_path,
    )
    assert predict.returncode == 0, predict.stderr[-3000:]
    evaluate = _run(
        [
            sys.executable,
            "-m",
            "unetdist.evaluate",
            "--pred",
            str(tmp_path / "pred"),
            "--truth",
            str(cell_shards / "raw" / "masks"),
        ],
        tmp_path,
    )
    assert evaluate.returncode == 0, evaluate.stderr
    overall = json.loads((tmp_path / "pred" / "evaluation.json").read_text())["overall"]
    assert overall["images"] == len(val)
    assert overall["dice"] > 0.85, overall


def test_colour_image_into_grey_model_names_its_colour_channels() -> None:
    grey = build_unet("padded", 1, 2, base_width=4, depth=2)
    with pytest.raises(InputError) as info:
        predict_array(grey, np.zeros((120, 140, 3), np.uint8))
    assert str(info.value) == (
        "image: 3 colour channels (shape (120, 140, 3)), the model expects 1 "
        "(train with model.in_channels=3, or convert to grey)"
    )
    colour = build_unet("padded", 3, 2, base_width=4, depth=2)
    with pytest.raises(InputError, match=r"4 colour channels .* expects 3 \(drop the alpha channel"):
        predict_array(colour, np.zeros((40, 48, 4), np.uint8))
    picture = np.random.default_rng(1).integers(0, 255, (40, 48, 3)).astype(np.uint8)
    np.testing.assert_array_equal(  # a channels-last picture is the same image as its [C, H, W]
        predict_array(colour, picture), predict_array(colour, picture.transpose(2, 0, 1))
    )


def test_cli_names_a_colour_file_once(tmp_path: Path, capsys) -> None:
    from PIL import Image

    from unetdist.inference.cli import main

    checkpoint = _tiny_checkpoint(tmp_path / "ckpt")
    image = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((120, 140, 3), np.uint8)).save(image)
    code = main(["--model", str(checkpoint), "--input", str(image), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("predict: failed")] == [
        f"predict: failed: {image}: 3 colour channels (shape (120, 140, 3)), the model expects 1 "
        "(train with model.in_channels=3, or convert to grey)"
    ]


# ---------------------------------------------------------------- tiles from the memory budget


@pytest.mark.parametrize("depth", [2, 3])
def test_padded_tiles_equal_one_whole_image_pass(depth: int) -> None:
    """The context plan is exact: one pass, budget-sized tiles and explicit tiles all give the
    probabilities of one forward over the whole image (mirrored up to the pooling period)."""
    torch.manual_seed(0)
    model = _randomise_batchnorm(build_unet("padded", 1, 3, base_width=4, depth=depth))
    geometry = ModelGeometry.of(model)
    period, context = geometry.pool_period, geometry.context
    assert context == {2: 24, 3: 48}[depth]  # the zero padding's reach, rounded up to the period
    image = np.random.default_rng(0).integers(0, 255, (150, 230)).astype(np.uint8)
    padded = np.pad(image, ((0, -150 % period), (0, -230 % period)), mode="reflect")
    x = engine.normalise(padded[None], ChannelStats.of(image[None]))
    with torch.inference_mode():
        whole = torch.softmax(model(torch.from_numpy(x)[None]), 1)[0, :, :150, :230].numpy()

    assert TilePredictor(model, 150, 230).plan.num_tiles == 1  # it fits the default budget: one pass
    budget = (2 * context + 2 * period) * 240 * geometry.bytes_per_pixel / 2**30  # a few tiles' worth
    for options in ({}, {"memory_gb": budget}, {"tile": 4 * context + period}):
        plan = TilePredictor(model, 150, 230, **options).plan
        assert (plan.num_tiles > 1) == bool(options), options
        probabilities = predict_array(model, image, return_probabilities=True, **options)
        assert np.abs(probabilities - whole).max() < 1e-5, options
    # today's sliding window over one 512 tile: the same wherever its mirrored far side cannot reach
    sliding = predict_array(model, image, tile=512, overlap=0.25, return_probabilities=True)
    inside = (slice(None), slice(0, 150 - context), slice(0, 230 - context))
    assert np.abs(sliding[inside] - whole[inside]).max() < 1e-5


def test_valid_conv_tiles_from_the_budget_equal_one_pass() -> None:
    torch.manual_seed(0)
    model = build_unet("paper", 1, 2, base_width=4, depth=2)
    image = np.random.default_rng(1).integers(0, 255, (90, 90)).astype(np.uint8)
    whole = _whole_image_pass(model, image)
    one = TilePredictor(model, 90, 90)
    assert one.plan.num_tiles == 1 and one.tile_shape == (132, 132)  # the smallest tile keeping 90 px
    small_budget = 100 * 100 * ModelGeometry.of(model).bytes_per_pixel / 2**30
    assert TilePredictor(model, 90, 90, memory_gb=small_budget).plan.num_tiles > 1
    for memory_gb in (None, small_budget):
        stitched = predict_array(model, image, memory_gb=memory_gb, return_probabilities=True)
        assert np.abs(stitched - whole).max() < 1e-5


def test_tile_plans_of_a_700x1100_image() -> None:
    model = build_unet("padded", 1, 2, base_width=32, depth=4)
    geometry = ModelGeometry.of(model)
    whole = plan_tiles(geometry, 700, 1100, tile=None, overlap=None, memory_bytes=3 * 2**30)
    assert (whole.num_tiles, whole.input_shape) == (1, (704, 1104))
    tiled = plan_tiles(geometry, 700, 1100, tile=None, overlap=None, memory_bytes=2**29)
    assert tiled.num_tiles == 6 and tiled.input_shape == (576, 576) and not tiled.blend
    for axis, length in ((tiled.rows, 700), (tiled.cols, 1100)):
        assert all(start % 16 == 0 for start in axis.starts)  # on the pooling grid
        assert axis.starts[0] == 0 and axis.starts[-1] + axis.input_size == -(-length // 16) * 16
        ends = [end for _, end in axis.kept]
        assert [begin for begin, _ in axis.kept] == [0, *ends[:-1]] and ends[-1] == length  # a partition
        for start, (begin, end) in zip(axis.starts, axis.kept, strict=True):  # 96 px of context inside
            assert (begin == 0 or begin >= start + 96) and (end == length or end <= start + 576 - 96)
    assert tiles_per_batch(geometry, tiled, 2**29, requested=8) == 1
    assert tiles_per_batch(geometry, tiled, 2**32, requested=8) == 8
    narrow = plan_tiles(geometry, 300, 20000, tile=None, overlap=None, memory_bytes=2**30)
    assert narrow.input_shape[0] == 304 and narrow.input_shape[1] > 1000  # the short side whole
    legacy = plan_tiles(geometry, 700, 1100, tile=None, overlap=0.25, memory_bytes=3 * 2**30)
    assert legacy.blend and legacy.input_shape == (512, 512) and legacy.num_tiles == 6


# ---------------------------------------------------------------- instances as the model decodes them


def _decoding_checkpoint(directory: Path, decoding: DecodeParams | None, num_classes: int = 2) -> Path:
    torch.manual_seed(3)
    config = {"preset": "padded", "in_channels": 1, "num_classes": num_classes, "base_width": 4, "depth": 2}
    state = {
        "model": build_unet("padded", 1, num_classes, base_width=4, depth=2).state_dict(),
        "config": {"model": {**config, "norm": "batch"}, "data": {"tile_size": 64},
                   "loss": {"target": "semantic" if num_classes == 2 else "boundary"}},
        "step": 7,
        "decoding": None if decoding is None else decoding.to_dict(),
    }  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / "model.pt")
    return directory / "model.pt"


def test_predict_decodes_instances_with_the_models_stored_params(tmp_path: Path) -> None:
    from unetdist.inference.cli import main

    stored = DecodeParams(threshold=0.65, min_size=30, min_distance=5)
    checkpoint = _decoding_checkpoint(tmp_path / "ckpt", stored)
    model, meta = load_model(str(checkpoint))
    assert meta["decoding"] == stored.to_dict() and meta["target"] == "semantic"
    image = synthetic_cells(96, np.random.default_rng(7))[0]
    tifffile.imwrite(tmp_path / "cells.tif", image)
    probabilities = predict_array(model, image, return_probabilities=True)
    base = ["--model", str(checkpoint), "--input", str(tmp_path / "cells.tif"), "--device", "cpu"]
    assert main([*base, "--output", str(tmp_path / "stored"), "--instances"]) == 0
    instances = tifffile.imread(tmp_path / "stored" / "cells_instances.tif")
    np.testing.assert_array_equal(instances, decode_instances(probabilities, stored))
    assert not np.array_equal(instances, decode_instances(probabilities, DecodeParams()))  # it matters
    # one field from the command line, the rest as stored; flips: the averaged probabilities decoded
    override = ["--instances", "--threshold", "0.55", "--flips"]
    assert main([*base, "--output", str(tmp_path / "override"), *override]) == 0
    overridden = tifffile.imread(tmp_path / "override" / "cells_instances.tif")
    flipped = predict_array(model, image, flips=True, return_probabilities=True)
    expected = decode_instances(flipped, DecodeParams(threshold=0.55, min_size=30, min_distance=5))
    np.testing.assert_array_equal(overridden, expected)
    # a boundary-target model without stored params decodes with the boundary defaults
    boundary = _decoding_checkpoint(tmp_path / "boundary", None, num_classes=3)
    boundary_model, _ = load_model(str(boundary))
    assert main(["--model", str(boundary), *base[2:], "--output", str(tmp_path / "b"), "--instances"]) == 0
    boundary_probabilities = predict_array(boundary_model, image, return_probabilities=True)
    np.testing.assert_array_equal(
        tifffile.imread(tmp_path / "b" / "cells_instances.tif"),
        decode_instances(boundary_probabilities, DecodeParams("boundary")),
    )


def test_bad_decoding_options_are_one_line(tmp_path: Path, capsys) -> None:
    from unetdist.inference.cli import main

    checkpoint = _decoding_checkpoint(tmp_path / "ckpt", None)
    tifffile.imwrite(tmp_path / "x.tif", np.zeros((32, 32), np.uint8))
    base = ["--model", str(checkpoint), "--input", str(tmp_path / "x.tif"), "--output", str(tmp_path / "o")]
    capsys.readouterr()
    for extra, message in (
        (["--threshold", "1.5"], "--threshold 1.5: decode params: threshold=1.5, expected a probability in"),
        (["--border-class", "2"], f"--border-class 2: {checkpoint} has classes 0-1 only"),
        (["--tune", str(tmp_path / "x.tif")], f"--tune {tmp_path / 'x.tif'}: not a prepared data set"),
    ):
        assert main([*base, "--instances", *extra]) == 2
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert "Traceback" not in err and last.startswith(f"predict: error: {message}"), last


def test_tune_on_a_prepared_data_set_writes_and_uses_its_choice(cell_shards: Path, tmp_path: Path) -> None:
    from unetdist.inference.cli import main
    from unetdist.inference.tuning import tuning_samples

    checkpoint = _decoding_checkpoint(tmp_path / "ckpt", DecodeParams(threshold=0.65))
    image = cell_shards / "raw" / "images" / "cells_0000.tif"
    out = tmp_path / "out"
    assert main(["--model", str(checkpoint), "--input", str(image), "--output", str(out), "--device", "cpu",
                 "--tune", str(cell_shards)]) == 0  # fmt: skip
    written = json.loads((out / "decoding.json").read_text())
    dataset = json.loads((cell_shards / "dataset.json").read_text())
    assert written["samples"] == dataset["num_val_tiles"] and 0.0 <= written["ap50"] <= 1.0
    samples = tuning_samples(str(cell_shards), None, 1)
    areas = np.concatenate([np.bincount(sample.truth.ravel())[1:] for sample in samples])
    tuned = DecodeParams.from_dict(written["decoding"])
    assert tuned in decoding_grid("semantic", float(np.median(areas[areas > 0])))
    model, _ = load_model(str(checkpoint))
    probabilities = predict_array(model, tifffile.imread(image), return_probabilities=True)
    np.testing.assert_array_equal(
        tifffile.imread(out / "cells_0000_instances.tif"), decode_instances(probabilities, tuned)
    )


def test_tuning_over_folders_equals_the_grid_search_of_all_images(cell_shards: Path) -> None:
    """Predicting image by image and summing the counts (as the ranks do) picks what one grid
    search over all the images' probabilities picks."""
    from unetdist.inference.tuning import tune_decoding, tuning_samples

    raw = cell_shards / "raw"
    samples = tuning_samples(str(raw / "images"), str(raw / "masks"), 1)[:6]
    torch.manual_seed(5)
    model = build_unet("padded", 1, 2, base_width=4, depth=2).eval()
    result = tune_decoding(model, samples, "semantic", device="cpu")
    areas = np.concatenate([np.bincount(sample.truth.ravel())[1:] for sample in samples])
    grid = decoding_grid("semantic", float(np.median(areas[areas > 0])))
    probabilities = [predict_array(model, sample.image, return_probabilities=True) for sample in samples]
    params, ap = best_params(grid, tuning_counts(probabilities, [sample.truth for sample in samples], grid))
    assert (result.params, result.ap50, result.samples, result.grid_points) == (params, ap, 6, len(grid))


def test_zarr_instances_are_decoded_from_the_whole_image(tmp_path: Path) -> None:
    import zarr

    from unetdist.inference.cli import main

    stored = DecodeParams(threshold=0.6, min_size=20)
    checkpoint = _decoding_checkpoint(tmp_path / "ckpt", stored)
    image = synthetic_cells(160, np.random.default_rng(8))[0][:150]
    _write_zarr(tmp_path / "cells.zarr", image, (64, 64))
    out = tmp_path / "out"
    assert main(["--model", str(checkpoint), "--input", str(tmp_path / "cells.zarr"), "--output", str(out),
                 "--device", "cpu", "--instances", "--block", "64", "--memory-gb", "0.002"]) == 0  # fmt: skip
    model, _ = load_model(str(checkpoint))
    probabilities = predict_array(model, image, return_probabilities=True)  # tiling changes nothing
    kept = probabilities.astype(np.float16).astype(np.float32)  # the scratch array's float16
    expected = decode_instances(kept, stored)
    instances = zarr.open_array(str(out / "cells_instances.zarr"))
    chunks = zarr.open_array(str(out / "cells_mask.zarr")).chunks
    assert instances.dtype == np.uint32 and instances.chunks == chunks and chunks[0] < 150  # several blocks
    assert expected.max() > 3
    np.testing.assert_array_equal(instances[:], expected)
    assert sorted(path.name for path in out.iterdir()) == ["cells_instances.zarr", "cells_mask.zarr"]


def test_prediction_normalises_as_training_did_percentile_clipping_included():
    from unetdist.data.augment import normalise as training_normalise
    from unetdist.data.augment import unit_range
    from unetdist.inference.engine import ChannelStats, normalise

    rng = np.random.default_rng(3)
    image = rng.integers(100, 400, (2, 48, 40)).astype(np.uint16)
    image[0, 5, 5], image[1, 9, 9] = 60000, 0  # a hot pixel and a dead one: the clip matters
    trained = training_normalise(unit_range(torch.from_numpy(image)[None]), "percentile")[0].numpy()
    predicted = normalise(image, ChannelStats.of(image, "percentile"))
    np.testing.assert_allclose(predicted, trained, atol=2e-3)
    assert not np.allclose(normalise(image, ChannelStats.of(image)), trained, atol=2e-3)
