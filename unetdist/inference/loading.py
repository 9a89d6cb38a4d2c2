"""Load a trained model for inference: a checkpoint file or folder, or an MLflow model URI.

    model, meta = load_model("runs/quickstart/checkpoints/step-00000200.pt")
    model, meta = load_model("runs/quickstart")          # newest good checkpoint of a run
    model, meta = load_model("runs:/<run_id>/model")     # or models:/<name>/<version>

A checkpoint is a ``step-XXXXXXXX`` directory (``unetdist.checkpoint``) or a single ``.pt``
file holding a trainer state. Checkpoints are rebuilt from their own resolved config (``config["model"]``) and loaded
strictly, so weights that do not fit that config are an error naming the file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unetdist.checkpoint import MANIFEST, CheckpointError, latest_good_checkpoint, load_checkpoint
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


class ModelLoadError(ValueError):
    """A model that cannot be loaded; the message names the file or URI and why."""


def load_model(model: str, map_location: str | torch.device = "cpu") -> tuple[UNet, dict[str, Any]]:
    """An eval-mode model and its metadata from a checkpoint path/folder or an MLflow URI.

    Metadata keys: ``source``, ``kind`` ("checkpoint" or "mlflow"), ``preset``,
    ``in_channels``, ``num_classes``, and for checkpoints ``step``, ``tile_size`` (the
    training tile) and ``config``.
    """
    if str(model).startswith(MLFLOW_SCHEMES):
        return _load_mlflow(str(model), map_location)
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
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ModelLoadError(
            f"{path}: its config's model section {model_config!r} is not usable: {err}"
        ) from err
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        summary = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelLoadError(
            f"{path}: the weights do not match the model its config describes "
            f"({_describe(model)}): {summary} ... (a checkpoint of another model config?)"
        ) from err
    model.eval()
    meta = {
        "source": str(path),
        "kind": "checkpoint",
        "step": int(state.get("step", 0)),
        "tile_size": int(config.get("data", {}).get("tile_size", 0) or 0),
        "config": config,
        **_model_meta(model),
    }
    return model, meta


def _load_mlflow(uri: str, map_location: str | torch.device) -> tuple[UNet, dict[str, Any]]:
    """The network inside a model logged by a training run (``unetdist.inference.pyfunc``)."""
    try:
        import mlflow.pyfunc

        segmenter = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    except Exception as err:  # MLflow raises many types (MlflowException, OSError, pickle errors)
        raise ModelLoadError(f"{uri}: cannot load the MLflow model: {err}") from err
    model = getattr(segmenter, "network", None)
    if not isinstance(model, nn.Module) or not hasattr(model, "in_channels"):
        raise ModelLoadError(f"{uri}: not a unetdist U-Net model (got {type(segmenter).__name__})")
    model.to(map_location).eval()
    return model, {"source": uri, "kind": "mlflow", **_model_meta(model)}


def _model_meta(model: nn.Module) -> dict[str, Any]:
    return {
        key: getattr(model, key, None)
        for key in ("preset", "in_channels", "num_classes", "base_width", "depth", "norm")
    }


def _describe(model: UNet) -> str:
    return (
        f"preset={model.preset} in_channels={model.in_channels} num_classes={model.num_classes} "
        f"base_width={model.base_width} depth={model.depth} norm={model.norm}"
    )
