"""3-D models beyond ``predict``: ``predict --tune`` on annotated volumes (a prepared 3-D data set's
whole-volume store, folders of TIFF stacks) and the MLflow pyfunc model predicting volumes.

Tuning must pick what one grid search over the volumes' probabilities picks, with the voxel grid
(``decoding_grid(..., spatial_dims=3)``), and ``predict`` must decode with it; the pyfunc model,
loaded by ``mlflow.pyfunc`` in a fresh interpreter, must give ``TilePredictor``'s labels."""

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
from torch import nn

from unetdist.config import Config, DataConfig, ModelConfig
from unetdist.data.synthetic import synthetic_volume
from unetdist.decoding import best_params, decoding_grid, tuning_counts
from unetdist.inference import InputError, TilePredictor, predict_array
from unetdist.inference.loading import load_model
from unetdist.inference.pyfunc import ENTRY_FILE, save_model_files
from unetdist.instances import DecodeParams, decode_instances
from unetdist.model import build_unet

TILE, DEPTH = 16, 8


def _model(num_classes: int = 2) -> nn.Module:
    """A seeded random-weight padded 3-D model whose running statistics are not the identity (an
    identity BatchNorm of random weights gives one class everywhere: weak comparisons)."""
    torch.manual_seed(3)
    model = build_unet("padded", 1, num_classes, base_width=2, depth=1, spatial_dims=3)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm3d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _checkpoint(directory: Path) -> Path:
    model = _model()
    config = {"preset": "padded", "in_channels": 1, "num_classes": 2, "base_width": 2, "depth": 1,
              "norm": model.norm, "spatial_dims": 3, "z_pools": -1}  # fmt: skip
    state = {"model": model.state_dict(), "step": 1,
             "config": {"model": config, "data": {"tile_size": TILE, "tile_depth": DEPTH},
                        "loss": {"target": "semantic"}}}  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / "model.pt")
    return directory / "model.pt"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared 3-D data set of three synthetic volumes (one for validation), instance masks."""
    from unetdist.prepare import main

    out = tmp_path_factory.mktemp("volumes") / "data"
    argv = ["--synthetic", "3", "--spatial-dims", "3", "--format", "zarr", "--whole-images", "--image-size", "32",
            "--depth-size", "12", "--tile", str(TILE), "--tile-depth", str(DEPTH), "--seed", "3", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    return out


def _median_volume(truths: list[np.ndarray]) -> float:
    areas = np.concatenate([np.bincount(truth.ravel().astype(np.int64))[1:] for truth in truths])
    return float(np.median(areas[areas > 0]))


def test_tune_on_a_prepared_3d_data_set_writes_and_uses_its_choice(prepared: Path, tmp_path: Path) -> None:
    from unetdist.inference.cli import main
    from unetdist.inference.tuning import tuning_samples

    samples = tuning_samples(str(prepared), None, 1)  # the data set says it holds volumes
    dataset = json.loads((prepared / "dataset.json").read_text())
    assert len(samples) == dataset["num_val_tiles"] == 8
    assert {sample.image.shape for sample in samples} == {(1, DEPTH, TILE, TILE)}  # the prepared tile
    assert all(sample.truth.shape == (DEPTH, TILE, TILE) for sample in samples)

    checkpoint = _checkpoint(tmp_path / "ckpt")
    volume = tifffile.imread(prepared / "raw" / "volumes" / "images" / "volume_0002.tif")
    stacks = tmp_path / "stacks"
    stacks.mkdir()
    tifffile.imwrite(stacks / "vol.tif", volume)
    out = tmp_path / "out"
    assert main(["--model", str(checkpoint), "--input", str(stacks / "vol.tif"), "--output", str(out),
                 "--device", "cpu", "--tune", str(prepared)]) == 0  # fmt: skip
    written = json.loads((out / "decoding.json").read_text())
    assert written["samples"] == 8 and 0.0 <= written["ap50"] <= 1.0
    grid = decoding_grid("semantic", _median_volume([sample.truth for sample in samples]), spatial_dims=3)
    tuned = DecodeParams.from_dict(written["decoding"])
    assert tuned in grid and written["grid_points"] == len(grid)
    model, _ = load_model(str(checkpoint))
    probabilities = predict_array(model, volume, return_probabilities=True)
    np.testing.assert_array_equal(
        tifffile.imread(out / "vol_instances.tif"), decode_instances(probabilities, tuned)
    )


def test_tuning_over_volume_folders_equals_the_grid_search_of_all_volumes(tmp_path: Path) -> None:
    """Folders of stacks (ZxYxX TIFF, ZxCxYxX ImageJ hyperstack, .npy) predicted volume by volume
    and their counts summed pick what one grid search over all the probabilities picks."""
    from unetdist.inference.tuning import tune_decoding, tuning_samples

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    volumes = [synthetic_volume((10, 24, 20), np.random.default_rng(seed)) for seed in range(3)]
    tifffile.imwrite(images / "a.tif", volumes[0][0])
    tifffile.imwrite(images / "b.tif", volumes[1][0][:, None], imagej=True, metadata={"axes": "ZCYX"})
    np.save(images / "c.npy", volumes[2][0])
    for name, (_, ids) in zip("abc", volumes, strict=True):
        tifffile.imwrite(masks / f"{name}.tif", ids)
    samples = tuning_samples(str(images), str(masks), 1, spatial_dims=3)
    assert [sample.name for sample in samples] == ["a", "b", "c"]
    for sample, (image, ids) in zip(samples, volumes, strict=True):
        np.testing.assert_array_equal(sample.image, image[None])
        np.testing.assert_array_equal(sample.truth, ids)

    model = _model()
    result = tune_decoding(model, samples, "semantic", device="cpu", tile=TILE, tile_depth=DEPTH)
    grid = decoding_grid("semantic", _median_volume([ids for _, ids in volumes]), spatial_dims=3)
    probabilities = [predict_array(model, image, tile=TILE, tile_depth=DEPTH, return_probabilities=True)
                     for image, _ in volumes]  # fmt: skip
    params, ap = best_params(grid, tuning_counts(probabilities, [ids for _, ids in volumes], grid))
    assert (result.params, result.ap50, result.samples, result.grid_points) == (params, ap, 3, len(grid))

    two_d = build_unet("padded", 1, 2, base_width=2, depth=1).eval()
    with pytest.raises(InputError, match=r"--tune: a is 3-D .* the model 2-D"):
        tune_decoding(two_d, samples, "semantic", device="cpu")
    with pytest.raises(InputError, match="expected ZxYxX integer instance ids"):
        tifffile.imwrite(masks / "a.tif", volumes[0][1][0])  # one plane: not a volume's mask
        tuning_samples(str(images), str(masks), 1, spatial_dims=3)


def test_a_data_set_of_the_other_dimensionality_is_one_line(prepared: Path) -> None:
    from unetdist.inference.tuning import tuning_samples

    with pytest.raises(InputError, match=r"holds 3-D volumes \(dataset.json spatial_dims 3\), the model is 2-D"):
        tuning_samples(str(prepared), None, 1, spatial_dims=2)


# ---------------------------------------------------------------- the pyfunc model


def _config(root: Path) -> Config:
    return Config(
        data=DataConfig(root=str(root), tile_size=TILE, tile_depth=DEPTH),
        model=ModelConfig(preset="padded", base_width=2, depth=1, spatial_dims=3),
    )


@pytest.mark.slow  # a fresh interpreter loads the model
def test_pyfunc_model_of_a_3d_model_predicts_volumes_in_a_fresh_interpreter(tmp_path: Path) -> None:
    import mlflow.pyfunc

    import unetdist
    from unetdist.tracking.models import model_signature

    model = _model()
    files = save_model_files(model, _config(tmp_path / "data"), tmp_path / "files")
    spec = json.loads(Path(files["spec"]).read_text())
    assert (spec["spatial_dims"], spec["tile_depth"]) == (3, DEPTH)
    saved = tmp_path / "model"
    example = np.random.default_rng(0).standard_normal((1, 1, DEPTH, TILE, TILE)).astype(np.float32)
    # as log_pyfunc_model logs it (models from code, the rank-5 signature, a tile as the example),
    # saved to a folder: no tracking store needed
    mlflow.pyfunc.save_model(
        str(saved), python_model=str(ENTRY_FILE), artifacts=files, signature=model_signature(1, 3),
        input_example=example, pip_requirements=["torch"], code_paths=[str(Path(unetdist.__file__).parent)],
    )  # fmt: skip

    volumes = np.random.default_rng(5).integers(0, 256, (2, 1, 12, 21, 18)).astype(np.float32)
    expected = []
    for volume in volumes:
        predictor = TilePredictor(model, *volume.shape[1:], tile=TILE, tile_depth=DEPTH, overlap=0.25)
        whole = tuple(value for side in volume.shape[1:] for value in (0, side))
        expected.append(predictor.predict_block(volume, predictor.stats_of(volume), whole).argmax(axis=0))
    expected = np.stack(expected).astype(np.uint8)
    assert 0.05 < (expected == 1).mean() < 0.95, "a mask of one class would make the comparison weak"

    np.save(tmp_path / "input.npy", volumes)
    script = (
        "import sys, numpy as np, mlflow.pyfunc\n"
        "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "volumes = np.load(sys.argv[2])\n"
        "np.save(sys.argv[3], model.predict(volumes))\n"
        "np.save(sys.argv[4], model._model_impl.python_model.predict(None, volumes[0]))\n"  # [C, Z, Y, X]
        "try:\n"
        "    model.predict(volumes[:, :, 0])\n"
        "    print('accepted')\n"
        "except Exception as err:\n"
        "    print('refused', type(err).__name__)\n"
    )
    outputs = [tmp_path / "batch.npy", tmp_path / "one.npy"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script, str(saved), str(tmp_path / "input.npy"), *map(str, outputs)],
                          capture_output=True, text=True, timeout=120, env=environment, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    batch, one = (np.load(path) for path in outputs)
    assert batch.dtype == np.uint8 and batch.shape == (2, 12, 21, 18)
    np.testing.assert_array_equal(batch, expected)
    np.testing.assert_array_equal(one, expected[:1])
    assert done.stdout.split()[0] == "refused"  # the signature's rank 5: a batch of 2-D images is refused


def test_tuning_on_a_2d_whole_image_store_reads_its_prepared_tiles(tmp_path: Path) -> None:
    """A whole-image store cuts its validation tiles by the checks' tile: tuning once asked for
    1x1 tiles (thousands of single pixels); it reads the validation grid of the prepared tile."""
    from unetdist.inference.tuning import tuning_samples
    from unetdist.prepare import main

    out = tmp_path / "cells"
    assert main(["--synthetic", "2", "--format", "zarr", "--whole-images", "--image-size", "64", "--tile", "32",
                 "--seed", "3", "--out", str(out)]) == 0  # fmt: skip
    samples = tuning_samples(str(out), None, 1)
    assert len(samples) == json.loads((out / "dataset.json").read_text())["num_val_tiles"]
    assert {sample.image.shape for sample in samples} == {(1, 32, 32)}
