"""The trained U-Net as an MLflow pyfunc model: the model class and the files it loads.

A model logged by ``RunOutputs.log_final_model`` loads anywhere MLflow runs::

    model = mlflow.pyfunc.load_model("models:/m-...")            # or "models:/NAME@best"
    masks = model.predict(images)                                 # float32 [N, C, H, W] -> uint8 [N, H, W]
    masks = model.predict(images, params={"overlap": 0.5, "flips": True})

``predict`` runs the overlap-tile prediction of ``unetdist.inference.engine.predict_array``
on each image, so images of any size work, whatever the network's tile. The model directory
holds the weights (``weights.pt``, a plain state dict), the network's construction arguments
(``unet.json``) and a copy of the ``unetdist`` package (``code/``), so loading needs torch
and numpy but not an installed ``unetdist``. MLflow pickles ``UNetSegmenter`` by reference,
so a logged model records this module's path: a process that has already imported a
``unetdist`` without that module cannot load the model (its ``code/`` copy is only found first
when ``unetdist`` is not imported yet), so moving this class breaks such loads of older models.

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

from unetdist.inference.engine import predict_array
from unetdist.model import build_unet

try:  # the class must subclass PythonModel; mlflow is a dependency of the package anyway
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover - mlflow is installed with unetdist
    PythonModel = object  # type: ignore[assignment,misc]

if TYPE_CHECKING:
    from unetdist.config import Config

WEIGHTS_FILE = "weights.pt"
SPEC_FILE = "unet.json"
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


def save_model_files(model: torch.nn.Module, config: Config, directory: Path) -> dict[str, str]:
    """Write ``weights.pt`` and ``unet.json`` for ``model`` into ``directory``; returns their paths.

    The weights are copied to the CPU first, so the caller may go on training.
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
    }
    spec_path = directory / SPEC_FILE
    spec_path.write_text(json.dumps(spec, indent=2))
    return {"weights": str(weights_path), "spec": str(spec_path)}


with warnings.catch_warnings():
    # MLflow nags at class creation that predict has no type hints; its schema comes from the signature
    warnings.simplefilter("ignore", UserWarning)

    class UNetSegmenter(PythonModel):
        """float32 images ``[N, C, H, W]`` -> uint8 label masks ``[N, H, W]`` by overlap-tile prediction."""

        def load_context(self, context: Any) -> None:
            self.spec = json.loads(Path(context.artifacts["spec"]).read_text())
            self.network = build_unet(
                self.spec["preset"],
                self.spec["in_channels"],
                self.spec["num_classes"],
                base_width=self.spec["base_width"],
                depth=self.spec["depth"],
                norm=self.spec["norm"],
            )
            state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
            self.network.load_state_dict(state)
            self.network.eval()

        # no type hints here: MLflow reads them as a (list-based) input schema and warns
        def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
            options = {**PREDICT_PARAMS, **(params or {})}
            images = np.asarray(model_input, dtype=np.float32)
            if images.ndim == 2:  # tolerate one single-channel image when called without a signature
                images = images[np.newaxis, np.newaxis]
            elif images.ndim == 3:
                images = images[np.newaxis]
            masks = [
                predict_array(
                    self.network,
                    image,
                    tile=int(options["tile"]) or self.spec["tile_size"],
                    overlap=float(options["overlap"]),
                    batch_size=int(options["batch_size"]),
                    flips=bool(options["flips"]),
                )
                for image in images
            ]
            return np.stack(masks).astype(np.uint8)
