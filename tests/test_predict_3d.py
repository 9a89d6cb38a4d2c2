"""Prediction of volumes with a 3-D model (issue 19): the tile geometry per axis, padded tiles and
the Gaussian window in 3-D, overlap-tile of valid convs (cicek, anisotropic z pooling) equal to one
pass over the whole mirrored volume, Zarr -> Zarr block by block and over two ranks, TIFF stacks,
3-D models loaded from checkpoints and logged models, and one clear line for a 2-D/3-D mismatch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from test_predict import Pointwise
from torch import nn

from unetdist.inference import (
    ChannelStats,
    InputError,
    ModelGeometry,
    TilePredictor,
    engine,
    predict_array,
    tiling,
)
from unetdist.inference.loading import load_model, network_from_files
from unetdist.inference.planning import plan_tiles
from unetdist.inference.zarr_io import predict_zarr
from unetdist.model import build_unet


def _model(preset: str, depth: int, z_pools: int | None = None, in_channels: int = 1) -> nn.Module:
    torch.manual_seed(0)
    model = build_unet(preset, in_channels, 3, base_width=2, depth=depth, spatial_dims=3, z_pools=z_pools)
    for module in model.modules():  # running statistics that are not the identity: a real test of eval mode
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _volume(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, shape).astype(np.uint8)


def _whole_volume_pass(model: nn.Module, volume: np.ndarray) -> np.ndarray:
    """Softmax of ONE forward over the whole volume, mirrored: by each axis's context margin (valid
    convs), or up to a multiple of the axis's pooling period (padded)."""
    geometry = ModelGeometry.of(model)
    pads = []
    for axis, length in zip(geometry.axes, volume.shape, strict=True):
        tile = next(t for t in range(length, length + 400)
                    if axis.is_valid_tile(t) and axis.output_size(t) >= length + axis.trailing_context)  # fmt: skip
        margin = (tile - axis.output_size(tile)) // 2
        pads.append((margin, tile - length - margin))
    x = engine.normalise(np.pad(volume[None], [(0, 0), *pads], mode="reflect"), ChannelStats.of(volume[None]))
    with torch.inference_mode():
        probabilities = torch.softmax(model(torch.from_numpy(x)[None]), dim=1)[0].numpy()
    return probabilities[(slice(None), *(slice(0, length) for length in volume.shape))]


# ---------------------------------------------------------------- geometry, no model


def test_tiling_helpers_take_three_axes() -> None:
    array = np.arange(2 * 4 * 5 * 6).reshape(2, 4, 5, 6)
    expected = np.pad(array, ((0, 0), (2, 3), (3, 9), (2, 1)), mode="reflect")
    np.testing.assert_array_equal(tiling.read_mirrored(array, -2, 7, -3, 14, -2, 7), expected)
    np.testing.assert_array_equal(tiling.read_mirrored(array, 1, 3, 0, 5, 2, 4), array[:, 1:3, :, 2:4])

    window = tiling.gaussian_window((8, 16, 12))
    assert window.shape == (8, 16, 12) and window.max() == 1.0 and window.min() > 0
    np.testing.assert_allclose(window, window[::-1, ::-1, ::-1])
    np.testing.assert_array_equal(tiling.gaussian_window((16, 12)), tiling.gaussian_window((1, 16, 12))[0] * 1)

    blocks = tiling.grid_blocks((5, 7, 9), (4, 4, 8))
    assert len(blocks) == 2 * 2 * 2 and blocks[0] == (0, 4, 0, 4, 0, 8) and blocks[-1] == (4, 5, 4, 7, 8, 9)
    covered = np.zeros((5, 7, 9), int)
    for z0, z1, y0, y1, x0, x1 in blocks:
        covered[z0:z1, y0:y1, x0:x1] += 1
    assert (covered == 1).all()

    # a context plan with its own period and context along z: every axis a partition on its grid
    plan = tiling.context_tile_plan((21, 40, 70), (12, 32, 32), (2, 8, 8), (2, 4, 4))
    assert plan.num_tiles == len(plan.axes[0].starts) * len(plan.rows.starts) * len(plan.cols.starts) > 3
    for axis, period in zip(plan.axes, (2, 4, 4), strict=True):
        assert all(start % period == 0 for start in axis.starts)
        assert axis.kept[0][0] == 0 and axis.kept[-1][1] == axis.length
        assert all(a[1] == b[0] for a, b in zip(axis.kept, axis.kept[1:], strict=False))
    tiles = plan.tiles_for_block(0, 21, 0, 40, 0, 70)
    assert len(tiles) == plan.num_tiles and len(tiles[0].input_start) == 3


def test_model_geometry_per_axis_with_anisotropic_z() -> None:
    iso, aniso = ModelGeometry.of(_model("padded", 2)), ModelGeometry.of(_model("padded", 2, z_pools=1))
    assert iso.spatial_dims == 3 and [axis.pool_period for axis in iso.axes] == [4, 4, 4]
    assert [axis.pool_period for axis in aniso.axes] == [2, 4, 4]
    assert iso.contexts == (24, 24, 24)  # as a 2-D padded model of depth 2 (tests/test_predict.py)
    assert aniso.contexts[1:] == (24, 24) and aniso.contexts[0] < 24  # z is halved once only: less reach
    cicek = ModelGeometry.of(_model("cicek", 2, z_pools=1))
    assert not cicek.padded and (cicek.axes[0].output_size(44), cicek.axes[1].output_size(44)) == (20, 4)

    plan = plan_tiles(aniso, 30, 100, 100, tile=None, overlap=None, memory_bytes=2**40)
    assert plan.num_tiles == 1 and plan.input_shape == (30, 100, 100)  # z on its own period of 2
    narrow = plan_tiles(iso, 40, 600, 600, tile=None, overlap=None, memory_bytes=2**30)
    assert narrow.input_shape[0] == 40 and narrow.num_tiles > 1 and not narrow.blend  # short z whole
    assert 40 * narrow.input_shape[1] * narrow.input_shape[2] * iso.bytes_per_pixel <= 2**30
    # a budget that cannot hold the exact tile's cube (4 contexts a side): the Gaussian window
    tight = plan_tiles(iso, 200, 200, 200, tile=None, overlap=None, memory_bytes=80**3 * iso.bytes_per_pixel)
    assert tight.blend and max(tight.input_shape) <= 80
    with pytest.raises(ValueError, match="tile depth"):
        plan_tiles(ModelGeometry.of(_model("cicek", 1)), 20, 40, 40, tile=(21, 44, 44), overlap=None,
                   memory_bytes=2**30)  # fmt: skip


# ---------------------------------------------------------------- equal to one pass


def test_padded_3d_tiles_equal_one_whole_volume_pass() -> None:
    model = _model("padded", 1)  # context 8: tiles of 32 keep at least half of themselves
    volume = _volume((36, 40, 50))
    whole = _whole_volume_pass(model, volume)
    assert TilePredictor(model, *volume.shape).plan.num_tiles == 1  # it fits the default budget
    tiled = TilePredictor(model, *volume.shape, tile=32)
    assert tiled.plan.num_tiles == 2 * 2 * 3 and tiled.plan.input_shape == (32, 32, 32) and not tiled.plan.blend
    z_whole = TilePredictor(model, *volume.shape, tile=32, tile_depth=40).plan
    assert z_whole.num_tiles == 1 * 2 * 3 and z_whole.input_shape == (36, 32, 32)  # z: one tile, as it fits
    for options in ({}, {"tile": 32}, {"tile": 32, "tile_depth": 40, "batch_size": 3}):
        probabilities = predict_array(model, volume, return_probabilities=True, **options)
        assert probabilities.shape == (3, 36, 40, 50)
        assert np.abs(probabilities - whole).max() < 1e-5, options
    labels = predict_array(model, volume, tile=32)
    assert labels.dtype == np.uint8 and (labels == whole.argmax(0)).mean() > 0.999


def test_gaussian_window_3d_blends_without_seams() -> None:
    """Overlapping 3-D windows, Gaussian-weighted: a pointwise model's blend equals its one pass
    (every voxel averages equal values), flips included, and a constant volume stays constant."""
    model = Pointwise(spatial_dims=3)
    volume = _volume((20, 30, 24), seed=1)
    predictor = TilePredictor(model, *volume.shape, tile=16, overlap=0.5)
    assert predictor.plan.blend and predictor.plan.num_tiles == 2 * 3 * 2
    blended = predict_array(model, volume, tile=16, overlap=0.5, flips=True, return_probabilities=True)
    x = engine.normalise(volume[None], ChannelStats.of(volume[None]))
    with torch.inference_mode():
        whole = torch.softmax(model(torch.from_numpy(x)[None]), dim=1)[0].numpy()
    assert np.abs(blended - whole).max() < 1e-5
    constant = predict_array(model, np.full((10, 30, 30), 7, np.uint16), tile=16, overlap=0.25,
                             return_probabilities=True)  # fmt: skip
    assert np.ptp(constant, axis=(1, 2, 3)).max() < 1e-6


@pytest.mark.parametrize(("preset", "depth", "z_pools"), [("cicek", 1, None), ("cicek", 2, 1), ("paper", 2, 0)])
def test_valid_conv_3d_overlap_tile_equals_one_pass(preset: str, depth: int, z_pools: int | None) -> None:
    """The overlap-tile strategy with mirrored borders in 3-D: stitched tiles equal one forward over
    the whole mirrored volume, z_pools=1/0 included (z on its own pooling grid and valid sizes)."""
    model = _model(preset, depth, z_pools)
    geometry = ModelGeometry.of(model)
    volume = _volume((13, 30, 27), seed=2)
    whole = _whole_volume_pass(model, volume)
    z_axis, plane_axis = geometry.axes[0], geometry.axes[1]
    tile_depth = next(t for t in range(4, 200) if z_axis.is_valid_tile(t) and z_axis.kept_step(t) >= 8)
    tile = next(t for t in range(4, 200) if plane_axis.is_valid_tile(t) and plane_axis.kept_step(t) >= 16)
    predictor = TilePredictor(model, *volume.shape, tile=tile, tile_depth=tile_depth)
    assert predictor.plan.num_tiles >= 8 and not predictor.plan.blend
    stitched = predict_array(model, volume, tile=tile, tile_depth=tile_depth, batch_size=3, return_probabilities=True)
    assert stitched.shape == whole.shape and np.abs(stitched - whole).max() < 1e-5
    one = predict_array(model, volume, return_probabilities=True)  # the budget's choice: one pass
    assert np.abs(one - whole).max() < 1e-5


# ---------------------------------------------------------------- Zarr, files, checkpoints, errors


def _write_zarr(path: Path, array: np.ndarray, chunks: tuple[int, ...]) -> None:
    import zarr

    zarr.create_array(store=str(path), data=array, chunks=chunks, overwrite=True)


def test_zarr_3d_block_by_block_equals_in_memory(tmp_path: Path) -> None:
    import zarr

    model = _model("padded", 1, in_channels=2)
    volume = _volume((2, 36, 40, 30), seed=3)
    _write_zarr(tmp_path / "in.zarr", volume, (2, 8, 16, 16))
    summary = predict_zarr(model, zarr.open_array(str(tmp_path / "in.zarr")), "in", tmp_path / "mask.zarr",
                           tmp_path / "prob.zarr", block=16, tile=32)  # fmt: skip
    # blocks on the tiles' step grid: z steps by 16, y and x share the larger step (x: one tile of 30)
    assert summary["block_shape"] == (16, 30, 30) and summary["blocks"] == 3 * 2 * 1
    expected = predict_array(model, volume, return_probabilities=True)  # one pass: the blocks' tiles equal it
    probabilities = zarr.open_array(str(tmp_path / "prob.zarr"))
    labels = zarr.open_array(str(tmp_path / "mask.zarr"))
    assert labels.shape == (36, 40, 30) and labels.chunks == (16, 30, 30) and probabilities.shape == (3, 36, 40, 30)
    assert np.abs(probabilities[:].astype(np.float32) - expected).max() < 2e-3  # float16 storage
    assert (labels[:] == expected.argmax(0)).mean() > 0.999


def _checkpoint(directory: Path, model: nn.Module, z_pools: int = -1) -> Path:
    """A single-file trainer state with the 3-D model config keys (what config.py resolves)."""
    config = {"preset": model.preset, "in_channels": model.in_channels, "num_classes": model.num_classes,
              "base_width": model.base_width, "depth": model.depth, "norm": model.norm, "spatial_dims": 3,
              "z_pools": z_pools}  # fmt: skip
    state = {"model": model.state_dict(), "config": {"model": config, "data": {"tile_size": 32, "tile_depth": 16}},
             "step": 3}  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / "model.pt")
    return directory / "model.pt"


def test_3d_models_load_from_checkpoints_and_logged_files(tmp_path: Path) -> None:
    model = _model("cicek", 2, z_pools=1)
    loaded, meta = load_model(str(_checkpoint(tmp_path / "ckpt", model, z_pools=1)))
    assert (loaded.spatial_dims, loaded.z_pools, meta["spatial_dims"], meta["z_pools"]) == (3, 1, 3, 1)
    assert (meta["tile_size"], meta["tile_depth"]) == (32, 16)
    volume = _volume((13, 30, 27), seed=4)
    np.testing.assert_array_equal(predict_array(loaded, volume), predict_array(model, volume))
    spec = {"preset": "cicek", "in_channels": 1, "num_classes": 3, "base_width": 2, "depth": 2, "norm": "batch",
            "spatial_dims": 3, "z_pools": 1, "tile_size": 44, "tile_depth": 20}  # fmt: skip
    (tmp_path / "unet.json").write_text(json.dumps(spec))
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    network, meta = network_from_files(tmp_path / "unet.json", tmp_path / "weights.pt")
    assert (network.spatial_dims, network.z_pools, meta["tile_depth"]) == (3, 1, 20)


def test_2d_and_3d_mismatches_are_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from unetdist.inference.cli import main

    two_d = build_unet("padded", 1, 2, base_width=2, depth=1).eval()
    three_d = _model("padded", 1)
    with pytest.raises(InputError, match="volume needs a 3-D model|predict it with a 3-D model"):
        predict_zarr(two_d, _volume((6, 20, 20, 20)), "vol", None)
    with pytest.raises(InputError, match="a 3-D model .* ZxYxX .*got shape \\(20, 20\\).*2-D model"):
        predict_array(three_d, _volume((20, 20)))
    with pytest.raises(InputError, match="a 3-D model .* got shape \\(20, 20\\).*2-D model"):
        predict_zarr(three_d, _volume((20, 20)), "image", None)

    _write_zarr(tmp_path / "flat.zarr", _volume((24, 24)), (24, 24))
    checkpoint = _checkpoint(tmp_path / "ckpt", three_d)
    code = main(["--model", str(checkpoint), "--input", str(tmp_path / "flat.zarr"), "--output",
                 str(tmp_path / "out"), "--device", "cpu"])  # fmt: skip
    failed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("predict: failed: ")]
    assert code == 2 and len(failed) == 1 and "a 3-D model takes a ZxYxX" in failed[0], failed
    code = main(["--model", str(checkpoint), "--input", str(tmp_path / "flat.zarr"), "--output",
                 str(tmp_path / "out"), "--instances"])  # fmt: skip
    failed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("predict: failed: ")]
    assert code == 2 and len(failed) == 1 and "a 3-D model takes a ZxYxX" in failed[0], failed


def test_tiff_stack_into_a_3d_model(tmp_path: Path) -> None:
    from unetdist.inference.cli import main

    model = _model("padded", 1)
    checkpoint = _checkpoint(tmp_path / "ckpt", model)
    stacks = tmp_path / "stacks"
    stacks.mkdir()
    volume = _volume((12, 30, 33), seed=5)
    tifffile.imwrite(stacks / "zyx.tif", volume)
    tifffile.imwrite(stacks / "zcyx.tif", volume[:, None], imagej=True, metadata={"axes": "ZCYX"})
    code = main(["--model", str(checkpoint), "--input", str(stacks), "--output", str(tmp_path / "out"),
                 "--probabilities", "--device", "cpu"])  # fmt: skip
    assert code == 0
    expected = predict_array(model, volume, return_probabilities=True)
    for stem in ("zyx", "zcyx"):
        labels = tifffile.imread(tmp_path / "out" / f"{stem}_mask.tif")
        assert labels.shape == (12, 30, 33) and labels.dtype == np.uint8
        np.testing.assert_array_equal(labels, expected.argmax(0))
        assert tifffile.imread(tmp_path / "out" / f"{stem}_prob.tif").shape == (3, 12, 30, 33)


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_zarr_3d_two_ranks_equal_one(tmp_path: Path) -> None:
    """The anisotropic model (z never pooled) over two ranks under torchrun, block by block."""
    import zarr

    from unetdist.inference.cli import main

    checkpoint = _checkpoint(tmp_path / "ckpt", _model("padded", 1, z_pools=0), z_pools=0)
    _write_zarr(tmp_path / "vol.zarr", _volume((18, 40, 44), seed=6), (8, 16, 16))
    common = ["--model", str(checkpoint), "--input", str(tmp_path / "vol.zarr"), "--tile", "32",
              "--tile-depth", "24", "--block", "16", "--probabilities", "--device", "cpu"]  # fmt: skip
    assert main([*common, "--output", str(tmp_path / "one")]) == 0  # one process: this one
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "--monitor-interval=0.1"]  # fmt: skip
    double = _run([*torchrun, "-m", "unetdist.predict", *common, "--output", str(tmp_path / "two")], tmp_path)
    assert double.returncode == 0, double.stderr
    for name in ("vol_mask.zarr", "vol_prob.zarr"):
        one = zarr.open_array(str(tmp_path / "one" / name))
        two = zarr.open_array(str(tmp_path / "two" / name))
        assert one.shape[-3:] == (18, 40, 44)
        np.testing.assert_array_equal(one[:], two[:])
