"""Load a trained model for inference: a checkpoint file or folder, or a logged MLflow model.

    model, meta = load_model("runs/quickstart/checkpoints/step-00000200.pt")
    model, meta = load_model("runs/quickstart")          # newest good checkpoint of a run
    model, meta = load_model("runs:/<run_id>/model")     # or models:/<name>/<version>, models:/m-...
    model, meta = load_model("mlruns/1/models/m-.../artifacts")   # a model folder (has an MLmodel)

A checkpoint is a ``step-XXXXXXXX`` directory (``unetdist.checkpoint``) or a single ``.pt``
file holding a trainer state. Checkpoints are rebuilt from their own resolved config
(``config["model"]``) and loaded strictly, so weights that do not fit that config are an
error naming the file. A logged model is rebuilt from its ``unet.json`` and ``weights.pt``
only (``network_from_files``), never through its pickles or code.

Both kinds also say how the model's probabilities become instances: ``meta["target"]``
("semantic" or "boundary", the model's training target) and ``meta["decoding"]``, the
:class:`~unetdist.instances.DecodeParams` tuned in training (``to_dict()``), or None when
there are none: a checkpoint's trainer state ``"decoding"`` and its config's ``loss.target``,
a logged model's ``unet.json`` keys ``decoding`` and ``target``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unetdist.checkpoint import MANIFEST, CheckpointError, latest_good_checkpoint, load_checkpoint
from unetdist.instances import TARGETS, DecodeParams
from unetdist.model import UNet, build_unet

log = logging.getLogger(__name__)

MLFLOW_SCHEMES = (
    "runs:/",
    "models:/",
    "mlflow-artifacts:/",
    "file://",
    "s3://",
    "gs://",
    "http://",
    "https://",
)
# data.normalize values prediction reproduces (range: not yet; such a model is refused by name)
PREDICTED_NORMALIZATIONS = ("zscore", "percentile")
# the files of a logged model (written by unetdist.inference.pyfunc.save_model_files)
WEIGHTS_FILE = "weights.pt"
SPEC_FILE = "unet.json"
MLMODEL_FILE = "MLmodel"


class ModelLoadError(ValueError):
    """A model that cannot be loaded; the message names the file or URI and why."""


def load_model(model: str, map_location: str | torch.device = "cpu") -> tuple[UNet, dict[str, Any]]:
    """An eval-mode model and its metadata from a checkpoint path/folder, an MLflow URI or model folder.

    Metadata keys: ``source``, ``kind`` ("checkpoint" or "mlflow"), ``preset``,
    ``in_channels``, ``num_classes``, ``spatial_dims`` (2, or 3 with ``z_pools``), ``tile_size``
    and ``tile_depth`` (the training tile; 0: a cube or 2-D), ``target`` and
    ``decoding`` (see the module docstring), and for checkpoints ``step`` and ``config``.
    """
    if str(model).startswith(MLFLOW_SCHEMES) or (Path(model) / MLMODEL_FILE).is_file():
        network, meta = _load_mlflow(str(model), map_location)
        return network, {"source": str(model), "kind": "mlflow", **meta}
    return _load_checkpoint(Path(model), map_location)


def _resolve_checkpoint_path(path: Path) -> Path:
    """A ``.pt`` file or a checkpoint directory as given; a run folder -> its newest good checkpoint."""
    if path.is_file() or (path / MANIFEST).is_file():
        return path
    if path.is_dir():
        for directory in (path, path / "checkpoints"):
            try:
                found = latest_good_checkpoint(directory)
            except CheckpointError as err:
                raise ModelLoadError(str(err)) from err
            if found is not None:
                return found
        raise ModelLoadError(f"{path}: no checkpoint (step-XXXXXXXX) in it or in its checkpoints/")
    raise ModelLoadError(
        f"{path}: no such checkpoint file or run folder (an MLflow model is given as runs:/<run_id>/model "
        "or models:/<name>/<version>)"
    )


def _load_checkpoint(path: Path, map_location: str | torch.device) -> tuple[UNet, dict[str, Any]]:
    path = _resolve_checkpoint_path(path)
    try:
        state = load_checkpoint(path, map_location=map_location)
    except CheckpointError as err:
        raise ModelLoadError(str(err)) from err
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ModelLoadError(f"{path}: not a unetdist checkpoint (expected 'model' and 'config' entries)")
    config = state["config"]
    model_config = config.get("model", {}) if isinstance(config, dict) else {}
    try:
        model = build_unet(
            model_config["preset"],
            model_config["in_channels"],
            model_config["num_classes"],
            base_width=model_config.get("base_width") or None,
            depth=model_config.get("depth") or None,
            norm=model_config.get("norm", "batch"),
            **_volume_arguments(model_config),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ModelLoadError(
            f"{path}: its config's model section {model_config!r} is not usable: {err}"
        ) from err
    _load_weights(
        model,
        state["model"],
        f"{path}: the weights do not match the model its config describes",
        "a checkpoint of another model config?",
    )
    model.eval()
    loss_config = config.get("loss") if isinstance(config.get("loss"), dict) else {}
    meta = {
        "source": str(path),
        "kind": "checkpoint",
        "step": int(state.get("step", 0)),
        "tile_size": int(config.get("data", {}).get("tile_size", 0) or 0),
        "tile_depth": int(config.get("data", {}).get("tile_depth", 0) or 0),
        "config": config,
        "normalize": _normalize_of(config.get("data", {}).get("normalize"), f"{path}: its config's"),
        **_model_meta(model),
        **_decoding_meta(loss_config.get("target"), state.get("decoding"), f"{path}: its trainer state's"),
    }
    return model, meta


def _load_mlflow(uri: str, map_location: str | torch.device) -> tuple[UNet, dict[str, Any]]:
    """The network of a model logged by a training run, from its two files alone.

    The model's ``MLmodel`` (plain YAML) names the files of its ``weights`` and ``spec``
    artifacts; they are downloaded (or read in place from a local model folder) and the
    network is rebuilt from ``unet.json`` and the plain tensors of ``weights.pt``. Nothing
    of the model's code or pickles is loaded: unlike ``mlflow.pyfunc.load_model``, this
    runs nothing from the tracking store, and it reads models logged by any unetdist
    version (all keep ``artifacts/weights.pt`` and ``artifacts/unet.json``).
    """
    root = _model_root(uri)
    local_dir = Path(root)
    if (local_dir / MLMODEL_FILE).is_file():  # a model folder, or a store on this machine: read in place
        spec_path, weights_path = _model_file_paths(local_dir, uri)
        return network_from_files(local_dir / spec_path, local_dir / weights_path, map_location, uri)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="unetdist-model-") as scratch:
        mlmodel = _download(root, MLMODEL_FILE, Path(scratch) / "mlmodel", uri)
        spec_path, weights_path = _model_file_paths(mlmodel.parent, uri)
        return network_from_files(
            _download(root, spec_path, Path(scratch) / "spec", uri),
            _download(root, weights_path, Path(scratch) / "weights", uri),
            map_location,
            uri,
        )


def _model_root(uri: str) -> str:
    """Where the model's files are: ``models:/`` URIs resolved through the registry / tracking store."""
    if not uri.startswith("models:/"):
        return uri  # runs:/<id>/<name>/<file> and artifact-store URIs take a file's path as they are
    # `models:/<name>@alias/MLmodel` would work, but `models:/m-<id>/MLmodel` does not (mlflow 3.17)
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

    try:
        return ModelsArtifactRepository.get_underlying_uri(uri)
    except Exception as err:  # MlflowException (not found, bad URI), connection errors
        raise ModelLoadError(f"{uri}: no such MLflow model: {_first_line(err)}") from err


def _download(root: str, relative_path: str, destination: Path, uri: str) -> Path:
    """The file ``relative_path`` of the model at ``root``, downloaded into ``destination``."""
    import mlflow.artifacts

    destination.mkdir(parents=True)
    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{root.rstrip('/')}/{relative_path}", dst_path=str(destination)
        )
    except Exception as err:  # MLflow raises many types (MlflowException, OSError, requests errors)
        raise ModelLoadError(
            f"{uri}: cannot download {relative_path} of the MLflow model: {_first_line(err)}"
        ) from err
    return Path(local)


def _model_file_paths(model_dir: Path, uri: str) -> tuple[str, str]:
    """The paths of ``unet.json`` and ``weights.pt`` inside the model, as its ``MLmodel`` names them."""
    import yaml

    try:
        mlmodel = yaml.safe_load((model_dir / MLMODEL_FILE).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ModelLoadError(f"{uri}: unreadable {MLMODEL_FILE}: {_first_line(err)}") from err
    flavor = mlmodel.get("flavors", {}).get("python_function", {}) if isinstance(mlmodel, dict) else {}
    artifacts = flavor.get("artifacts") if isinstance(flavor, dict) else None
    paths = []
    for name in ("spec", "weights"):
        entry = artifacts.get(name) if isinstance(artifacts, dict) else None
        path = entry.get("path") if isinstance(entry, dict) else None
        # a relative path inside the model: a downloaded MLmodel must not point elsewhere
        if not isinstance(path, str) or not path or path.startswith("/") or ".." in Path(path).parts:
            raise ModelLoadError(
                f"{uri}: not a unetdist model (its {MLMODEL_FILE} names no python_function "
                f"artifact {name!r} with a relative path; expected the files {SPEC_FILE} and {WEIGHTS_FILE})"
            )
        paths.append(path)
    return paths[0], paths[1]


def network_from_files(
    spec_path: Path, weights_path: Path, map_location: str | torch.device = "cpu", source: str = ""
) -> tuple[UNet, dict[str, Any]]:
    """An eval-mode U-Net and its metadata from a logged model's ``unet.json`` and ``weights.pt``.

    ``weights.pt`` is read with ``weights_only=True`` (plain tensors only). Errors name
    ``source`` (the model's URI or folder) and the file.
    """
    source = source or str(spec_path.parent)
    try:
        spec = json.loads(Path(spec_path).read_text())
        network = build_unet(
            spec["preset"],
            spec["in_channels"],
            spec["num_classes"],
            base_width=spec.get("base_width") or None,
            depth=spec.get("depth") or None,
            norm=spec.get("norm", "batch"),
            **_volume_arguments(spec),
        )
    except (OSError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise ModelLoadError(
            f"{source}: {SPEC_FILE} is not a usable U-Net description (preset, in_channels, "
            f"num_classes, ...): {type(err).__name__}: {_first_line(err)}"
        ) from err
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, OSError...
        raise ModelLoadError(
            f"{source}: {WEIGHTS_FILE} is not a state dict of plain tensors (read with weights_only=True): "
            f"{_weights_error_reason(err)}"
        ) from err
    _load_weights(
        network,
        state,
        f"{source}: {WEIGHTS_FILE} does not match the network of its {SPEC_FILE}",
        "files of two different models?",
    )
    network.to(map_location).eval()
    meta = {
        "tile_size": int(spec.get("tile_size") or 0),
        "tile_depth": int(spec.get("tile_depth") or 0),
        "normalize": _normalize_of(spec.get("normalize"), f"{source}: {SPEC_FILE}'s"),
        **_model_meta(network),
        **_decoding_meta(spec.get("target"), spec.get("decoding"), f"{source}: {SPEC_FILE}'s"),
    }
    return network, meta


def _normalize_of(normalize: Any, where: str) -> str:
    """How the model's inputs were normalised (``data.normalize``): prediction does the same."""
    normalize = normalize or "zscore"  # models saved before it was recorded
    if normalize not in PREDICTED_NORMALIZATIONS:
        raise ModelLoadError(
            f"{where} data.normalize {normalize!r}: prediction normalises as "
            f"{' or '.join(PREDICTED_NORMALIZATIONS)} only"
        )
    return normalize


def _decoding_meta(target: Any, decoding: Any, where: str) -> dict[str, Any]:
    """``target`` and ``decoding`` checked: a bad one is an error starting with ``where``."""
    target = target or "semantic"  # models trained before the boundary target
    if target not in TARGETS:
        raise ModelLoadError(f"{where} target {target!r} is not one of {', '.join(TARGETS)}")
    if not decoding:
        return {"target": target, "decoding": None}
    try:
        params = DecodeParams.from_dict(decoding)
    except (ValueError, TypeError) as err:
        raise ModelLoadError(f"{where} decoding {decoding!r} is not usable: {_first_line(err)}") from err
    return {"target": params.target, "decoding": params.to_dict()}


def _volume_arguments(model_config: dict[str, Any]) -> dict[str, Any]:
    """``build_unet``'s 3-D arguments from a model config or ``unet.json``: none for a 2-D model
    (``spatial_dims`` absent or 2: models saved before volumes build as they always did);
    ``z_pools`` -1 or absent: every level pools z."""
    spatial_dims = int(model_config.get("spatial_dims") or 2)
    if spatial_dims == 2:
        return {}
    z_pools = model_config.get("z_pools")
    return {"spatial_dims": spatial_dims, "z_pools": None if z_pools is None or z_pools < 0 else int(z_pools)}


def _model_meta(model: nn.Module) -> dict[str, Any]:
    meta = {
        key: getattr(model, key, None)
        for key in ("preset", "in_channels", "num_classes", "base_width", "depth", "norm")
    }
    meta["spatial_dims"] = int(getattr(model, "spatial_dims", 2) or 2)
    if meta["spatial_dims"] == 3:
        meta["z_pools"] = getattr(model, "z_pools", None)
    return meta


def _load_weights(model: UNet, state: Any, what: str, hint: str) -> None:
    """Load ``state`` strictly; a mismatch is an error starting with ``what`` and naming the model."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:  # TypeError/AttributeError: not a dict
        raise ModelLoadError(f"{what} ({_describe(model)}): {_first_line(err)} ... ({hint})") from err


def _weights_error_reason(err: BaseException) -> str:
    """The reason inside torch's weights_only error, without its advice to load with weights_only=False."""
    text = str(err)
    marker = "WeightsUnpickler error:"
    if marker in text:
        reason = text.split(marker, 1)[1].strip().splitlines()[0]
        return reason.split(". ", 1)[0].rstrip(".")
    return _first_line(err)


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _describe(model: UNet) -> str:
    volume = (f" spatial_dims=3 z_pools={getattr(model, 'z_pools', None)}"
              if getattr(model, "spatial_dims", 2) == 3 else "")  # fmt: skip
    return (
        f"preset={model.preset} in_channels={model.in_channels} num_classes={model.num_classes} "
        f"base_width={model.base_width} depth={model.depth} norm={model.norm}{volume}"
    )
