"""Loading a logged MLflow model for ``unetdist.predict`` (``unetdist.inference.loading``).

The logged model is read from its ``MLmodel``, ``unet.json`` and ``weights.pt`` only:
models pickled by older unetdist versions load without unpickling anything, and each broken
file is one error naming the model and the file. (Checkpoints: tests/test_predict.py; the
logged model end to end through every loader: tests/test_tracking_models.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from unetdist.config import Config, DataConfig, ModelConfig
from unetdist.inference.loading import ModelLoadError, load_model
from unetdist.inference.pyfunc import save_model_files
from unetdist.model import build_unet

CONFIG = Config(
    data=DataConfig(root="unused", tile_size=32), model=ModelConfig(preset="padded", base_width=4, depth=2)
)


def _network() -> torch.nn.Module:
    torch.manual_seed(11)
    return build_unet("padded", 1, 2, base_width=4, depth=2).eval()


def _model_dir(directory: Path, decoding: dict | None = None) -> Path:
    """A model folder laid out as MLflow writes one: MLmodel + artifacts/{weights.pt,unet.json}."""
    save_model_files(_network(), CONFIG, directory / "artifacts", decoding=decoding)
    mlmodel = {
        "flavors": {
            "python_function": {
                "artifacts": {
                    "weights": {"path": "artifacts/weights.pt", "uri": "/elsewhere/weights.pt"},
                    "spec": {"path": "artifacts/unet.json", "uri": "/elsewhere/unet.json"},
                },
                "loader_module": "mlflow.pyfunc.loaders.code_model",
            }
        }
    }
    (directory / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    return directory


def _same_weights(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    pairs = zip(first.state_dict().items(), second.state_dict().items(), strict=True)
    return all(key_a == key_b and torch.equal(a, b) for (key_a, a), (key_b, b) in pairs)


def test_model_folder_loads_with_its_training_tile(tmp_path: Path) -> None:
    network, meta = load_model(str(_model_dir(tmp_path / "model")))
    assert meta["kind"] == "mlflow" and meta["tile_size"] == 32 and meta["base_width"] == 4
    assert _same_weights(network, _network()) and not network.training


def test_model_pickled_by_an_older_unetdist_loads_without_unpickling(tmp_path: Path) -> None:
    """Before models from code, the model was a cloudpickled ``UNetSegmenter`` (python_model.pkl).

    Its class path has since moved, so unpickling it fails; predict reads the same two
    artifacts every version wrote and never opens the pickle (garbled here to prove it).
    """
    import mlflow.pyfunc

    from unetdist.inference.pyfunc import UNetSegmenter

    files = save_model_files(_network(), CONFIG, tmp_path / "files")
    old = tmp_path / "old-model"
    mlflow.pyfunc.save_model(
        str(old), python_model=UNetSegmenter(), artifacts=files, pip_requirements=["torch"]
    )
    assert (old / "python_model.pkl").is_file()
    (old / "python_model.pkl").write_bytes(b"garbage: unpickling this would fail")
    network, meta = load_model(str(old))
    assert _same_weights(network, _network()) and meta["preset"] == "padded"


NOT_UNETDIST = "not a unetdist model (its MLmodel names no python_function artifact"
NOT_TENSORS = "weights.pt is not a state dict of plain tensors (read with weights_only=True): "


class _NotATensor:
    pass


def _break_missing_artifacts(model: Path) -> None:
    (model / "MLmodel").write_text(yaml.safe_dump({"flavors": {"python_function": {"loader_module": "x"}}}))


def _break_escaping_path(model: Path) -> None:
    mlmodel = yaml.safe_load((model / "MLmodel").read_text())
    mlmodel["flavors"]["python_function"]["artifacts"]["weights"]["path"] = "../../etc/weights.pt"
    (model / "MLmodel").write_text(yaml.safe_dump(mlmodel))


def _break_spec(model: Path) -> None:
    (model / "artifacts" / "unet.json").write_text(json.dumps({"preset": "padded"}))


def _break_decoding(model: Path) -> None:
    spec = json.loads((model / "artifacts" / "unet.json").read_text())
    (model / "artifacts" / "unet.json").write_text(json.dumps({**spec, "decoding": {"threshold": 2}}))


def _break_weights_bytes(model: Path) -> None:
    (model / "artifacts" / "weights.pt").write_bytes(b"\x00garbage")


def _break_weights_object(model: Path) -> None:
    torch.save({"weight": _NotATensor()}, model / "artifacts" / "weights.pt")  # weights_only refuses it


def _break_weights_shape(model: Path) -> None:
    wider = build_unet("padded", 1, 2, base_width=8, depth=2)
    torch.save(wider.state_dict(), model / "artifacts" / "weights.pt")


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (_break_missing_artifacts, f"{NOT_UNETDIST} 'spec' with a relative path; expected the files"),
        (_break_escaping_path, f"{NOT_UNETDIST} 'weights' with a relative path"),
        (_break_spec, "unet.json is not a usable U-Net description (preset, in_channels, num_classes"),
        (_break_weights_bytes, f"{NOT_TENSORS}Unsupported operand"),
        (_break_weights_object, f"{NOT_TENSORS}Unsupported global: GLOBAL test_inference_loading._NotA"),
        (_break_weights_shape, "weights.pt does not match the network of its unet.json (preset=padded"),
        (_break_decoding, "unet.json's decoding {'threshold': 2} is not usable: decode params: threshold=2"),
    ],
)  # fmt: skip
def test_broken_model_files_are_one_error_naming_model_and_file(
    tmp_path: Path, breakage, message: str
) -> None:
    model = _model_dir(tmp_path / "model")
    breakage(model)
    with pytest.raises(ModelLoadError) as caught:
        load_model(str(model))
    text = str(caught.value)
    assert text.startswith(f"{model}: {message}"), text
    assert "\n" not in text and "weights_only=False" not in text  # no advice to load unsafely


def test_unknown_registered_model_is_named(tmp_path: Path, local_mlflow_store: str, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", local_mlflow_store)
    # our one line first, then the registry's own reason
    with pytest.raises(ModelLoadError, match=r"^models:/no-such-model/1: no such MLflow model: .*no-such"):
        load_model("models:/no-such-model/1")


def test_predict_cli_broken_model_exits_2_with_one_line(tmp_path: Path, capsys) -> None:
    from unetdist.inference.cli import main

    model = _model_dir(tmp_path / "model")
    _break_weights_bytes(model)
    assert main(["--model", str(model), "--input", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1, error  # no traceback
    assert error[0].startswith(f"predict: error: {model}: {NOT_TENSORS}")


def test_model_folder_carries_its_decoding_into_predict(tmp_path: Path) -> None:
    import numpy as np
    import tifffile

    from unetdist.inference import predict_array
    from unetdist.inference.cli import main
    from unetdist.instances import DecodeParams, decode_instances

    tuned = DecodeParams(threshold=0.7, min_size=25)
    model = _model_dir(tmp_path / "model", decoding=tuned.to_dict())
    network, meta = load_model(str(model))
    assert (meta["target"], meta["decoding"]) == ("semantic", tuned.to_dict())
    image = np.random.default_rng(4).integers(0, 255, (70, 90)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "image.tif", image)
    out = tmp_path / "out"
    assert main(["--model", str(model), "--input", str(tmp_path / "image.tif"), "--output", str(out),
                 "--instances", "--device", "cpu"]) == 0  # fmt: skip
    expected = decode_instances(predict_array(network, image, return_probabilities=True), tuned)
    np.testing.assert_array_equal(tifffile.imread(out / "image_instances.tif"), expected)
    # a model logged before decoding was stored: the defaults of the semantic target
    spec = json.loads((model / "artifacts" / "unet.json").read_text())
    del spec["decoding"], spec["target"]
    (model / "artifacts" / "unet.json").write_text(json.dumps(spec))
    assert {key: load_model(str(model))[1][key] for key in ("target", "decoding")} == {
        "target": "semantic", "decoding": None
    }
