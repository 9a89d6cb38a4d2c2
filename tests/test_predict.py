"""Inference at any image size: overlap-tile exactness, seamless Gaussian blending, Zarr
block-wise and distributed prediction under a memory limit, the CLI, instances."""

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
from unetdist.inference import ChannelStats, InputError, ModelGeometry, engine, predict_array, tiling
from unetdist.inference.loading import ModelLoadError, load_model
from unetdist.inference.zarr_io import predict_zarr
from unetdist.instances import instances_from_labels
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
    """A 'padded' model whose output at a pixel depends on that pixel only."""

    padded, depth, in_channels, num_classes = True, 2, 1, 3

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Conv2d(1, 3, kernel_size=1)

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
    ]
    single = _run(
        [sys.executable, "-m", "unetdist.predict", *common, "--output", str(tmp_path / "one")], tmp_path
    )
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    double = _run([*torchrun, "-m", "unetdist.predict", *common, "--output", str(tmp_path / "two")], tmp_path)
    assert double.returncode == 0, double.stderr
    for name in ("big_mask.zarr", "big_prob.zarr"):
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
