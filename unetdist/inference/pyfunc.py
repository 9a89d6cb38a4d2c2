"""The trained U-Net as an MLflow pyfunc model: the model class and the files it loads.

A model logged by ``RunOutputs.log_final_model`` loads anywhere MLflow runs::

    model = mlflow.pyfunc.load_model("models:/m-...")            # or "models:/NAME@best"
    masks = model.predict(images)                                 # float32 [N, C, H, W] -> uint8 [N, H, W]
    masks = model.predict(images, params={"overlap": 0.5, "flips": True})

``predict`` runs the overlap-tile prediction of ``unetdist.inference.engine.predict_array``
on each image, so images of any size work, whatever the network's tile. A 3-D model (its
``unet.json`` says ``spatial_dims: 3``) takes float32 volumes ``[N, C, Z, Y, X]`` (one: ``[C, Z, Y, X]``,
or ``[Z, Y, X]`` of one channel) and returns uint8 ``[N, Z, Y, X]``, predicted as ``unetdist.predict``
predicts a stack: ``TilePredictor`` with the model's normalisation, tiles of the training tile
(``tile`` its in-plane side, z the training ``tile_depth``; 0: a cube).

The model is logged as MLflow "models from code", not as a pickle: the model directory
holds the weights (``artifacts/weights.pt``, a state dict of plain tensors, read with
``weights_only=True``), the network's construction arguments (``artifacts/unet.json``), the
entry file ``pyfunc_entry.py`` (``ENTRY_FILE``; MLflow runs it at load time and it names
``UNetSegmenter``) and a copy of the ``unetdist`` package (``code/``), so loading needs
torch, numpy and mlflow but not an installed ``unetdist``. Nothing is unpickled, and the
class is found by import, so moving it only needs the entry file to follow.
``python -m unetdist.predict --model runs:/...`` runs none of this: it reads the two files
(``unetdist.inference.loading``).

Saving (``save_model_files``, here) is separate from logging
(``unetdist.tracking.models.log_pyfunc_model``): the trainer saves the files at once on its
own thread, and the tracker's background sender logs them when the server answers (or
``python -m unetdist.tracking replay`` does, later).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from unetdist.inference.engine import (
    InputError,
    TilePredictor,
    as_czyx,
    labels_from_probabilities,
    predict_array,
)
from unetdist.inference.loading import SPEC_FILE, WEIGHTS_FILE, network_from_files

try:  # the class must subclass PythonModel; mlflow is a dependency of the package anyway
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover - mlflow is installed with unetdist
    PythonModel = object  # type: ignore[assignment,misc]

if TYPE_CHECKING:
    from unetdist.config import Config

# the models-from-code file that MLflow copies into the model and runs when loading it
ENTRY_FILE = Path(__file__).with_name("pyfunc_entry.py")
PREDICT_PARAMS = {"overlap": 0.25, "flips": False, "batch_size": 8, "tile": 0}


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def save_model_files(
    model: torch.nn.Module, config: Config, directory: Path, decoding: dict | None = None
) -> dict[str, str]:
    """Write ``weights.pt`` and ``unet.json`` for ``model`` into ``directory``; returns their paths.

    ``unet.json`` also holds the training target (``loss.target``) and ``decoding``, the
    tuned :class:`~unetdist.instances.DecodeParams` as ``to_dict()`` (None: not tuned), which
    ``unetdist.predict --instances`` decodes with. The weights are copied to the CPU first, so
    the caller may go on training.
    """
    directory.mkdir(parents=True, exist_ok=True)
    network = unwrap_model(model)
    state = {key: value.detach().to("cpu", copy=True) for key, value in network.state_dict().items()}
    weights_path = directory / WEIGHTS_FILE
    torch.save(state, weights_path)
    spec = {
        "preset": config.model.preset,
        "in_channels": config.model.in_channels,
        "num_classes": config.model.num_classes,
        "base_width": config.model.base_width or None,
        "depth": config.model.depth or None,
        "norm": config.model.norm,
        "tile_size": config.data.tile_size,
        "precision": config.train.precision,
        "normalize": config.data.normalize,
        "target": config.loss.target,
        "decoding": decoding,
    }
    if getattr(config.model, "spatial_dims", 2) == 3:  # a 2-D model's unet.json stays as it was
        spec.update(spatial_dims=3, z_pools=config.model.z_pools, tile_depth=config.data.tile_depth)
    spec_path = directory / SPEC_FILE
    spec_path.write_text(json.dumps(spec, indent=2))
    return {"weights": str(weights_path), "spec": str(spec_path)}


with warnings.catch_warnings():
    # MLflow nags at class creation that predict has no type hints; its schema comes from the signature
    warnings.simplefilter("ignore", UserWarning)

    class UNetSegmenter(PythonModel):
        """float32 images ``[N, C, H, W]`` -> uint8 label masks ``[N, H, W]`` by overlap-tile prediction
        (a 3-D model: volumes ``[N, C, Z, Y, X]`` -> ``[N, Z, Y, X]``)."""

        def load_context(self, context: Any) -> None:
            # the same reader as `unetdist.predict --model`: the state dict loads with weights_only=True
            self.network, self.spec = network_from_files(
                Path(context.artifacts["spec"]), Path(context.artifacts["weights"])
            )

        # no type hints here: MLflow reads them as a (list-based) input schema and warns
        def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
            options = {**PREDICT_PARAMS, **(params or {})}
            images = np.asarray(model_input, dtype=np.float32)
            if int(self.spec.get("spatial_dims") or 2) == 3:
                return np.stack([self._predict_volume(volume, options) for volume in _volumes(images)])
            if images.ndim == 2:  # tolerate one single-channel image when called without a signature
                images = images[np.newaxis, np.newaxis]
            elif images.ndim == 3:
                images = images[np.newaxis]
            masks = [
                predict_array(
                    self.network,
                    image,
                    tile=int(options["tile"]) or self.spec["tile_size"] or None,
                    overlap=float(options["overlap"]),
                    batch_size=int(options["batch_size"]),
                    flips=bool(options["flips"]),
                )
                for image in images
            ]
            return np.stack(masks).astype(np.uint8)

        def _predict_volume(self, volume: np.ndarray, options: dict[str, Any]) -> np.ndarray:
            """uint8 [Z, Y, X] labels of one volume, as ``unetdist.predict`` predicts a TIFF stack."""
            volume = as_czyx(volume, self.spec["in_channels"])
            tile = int(options["tile"]) or self.spec["tile_size"] or None
            predictor = TilePredictor(
                self.network,
                *volume.shape[1:],
                tile=tile,
                # no signature param for the z side (the logged schema is fixed): the training one
                tile_depth=(self.spec.get("tile_depth") or None) if tile else None,
                overlap=float(options["overlap"]),
                batch_size=int(options["batch_size"]),
                flips=bool(options["flips"]),
                normalize=self.spec["normalize"],
            )
            whole = tuple(value for side in volume.shape[1:] for value in (0, side))
            probabilities = predictor.predict_block(volume, predictor.stats_of(volume), whole)
            return labels_from_probabilities(probabilities).astype(np.uint8)


def _volumes(volumes: np.ndarray) -> np.ndarray:
    """``[N, C, Z, Y, X]`` of a 3-D model's input: one ``[C, Z, Y, X]`` volume, or one ``[Z, Y, X]`` of
    one channel, as a batch of one (a caller without the signature may pass either)."""
    if volumes.ndim == 3:
        return volumes[np.newaxis, np.newaxis]
    if volumes.ndim == 4:
        return volumes[np.newaxis]
    if volumes.ndim != 5:
        raise InputError(f"a 3-D model takes volumes [N, C, Z, Y, X], got shape {volumes.shape}")
    return volumes
