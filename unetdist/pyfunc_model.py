"""The trained U-Net as an MLflow pyfunc model, and the helpers that log models to a run.

A model logged by ``RunOutputs.log_final_model`` loads anywhere MLflow runs::

    model = mlflow.pyfunc.load_model("models:/m-...")            # or "models:/NAME@best"
    masks = model.predict(images)                                 # float32 [N, C, H, W] -> uint8 [N, H, W]
    masks = model.predict(images, params={"overlap": 0.5, "flips": True})

``predict`` runs the overlap-tile prediction of ``unetdist.predict.predict_array`` on each
image, so images of any size work, whatever the network's tile. The model directory holds
the weights (``weights.pt``, a plain state dict), the network's construction arguments
(``unet.json``) and a copy of the ``unetdist`` package (``code/``), so loading needs torch
and numpy but not an installed ``unetdist``.

Saving (``save_model_files``) is separate from logging (``log_pyfunc_model``): the trainer
saves the files at once on its own thread, and the tracker's background sender logs them
when the server answers (or ``python -m unetdist.tracking replay`` does, later).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import json
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

try:  # the class must subclass PythonModel; mlflow is a dependency of the package anyway
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover - mlflow is installed with unetdist
    PythonModel = object  # type: ignore[assignment,misc]

if TYPE_CHECKING:
    import torch
    from mlflow import MlflowClient

    from unetdist.config import Config

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.pt"
SPEC_FILE = "unet.json"
PREDICT_PARAMS = {"overlap": 0.25, "flips": False, "batch_size": 8, "tile": 0}


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    import torch

    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def pinned_requirements(*distributions: str) -> list[str]:
    # Explicit requirements skip MLflow's inference, which imports the model in
    # a subprocess: ~6 s instead of ~0.5 s for a tiny net (measured, mlflow 3.17).
    pinned = []
    for distribution in distributions:
        try:
            pinned.append(f"{distribution}=={importlib.metadata.version(distribution)}")
        except importlib.metadata.PackageNotFoundError:
            pinned.append(distribution)
    return pinned


@contextlib.contextmanager
def global_tracking_uri(tracking_uri: str) -> Iterator[None]:
    """Point MLflow's global tracking URI at ``tracking_uri`` for the block, then restore it.

    ``mlflow.*.log_model`` has no tracking-URI argument. MLflow's own
    ``_use_tracking_uri`` unsets a user's ``MLFLOW_TRACKING_URI`` on exit when no
    global URI had been set; this restores both.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_global_uri = tracking_utils._tracking_uri
    saved_environment_uri = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_global_uri)
        if saved_environment_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_environment_uri


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextlib.contextmanager
def filtered_logger(name: str, message_prefix: str) -> Iterator[None]:
    target = logging.getLogger(name)
    message_filter = _DropMessages(message_prefix)
    target.addFilter(message_filter)
    try:
        yield
    finally:
        target.removeFilter(message_filter)


# ---------------------------------------------------------------- the pyfunc model


def save_model_files(model: torch.nn.Module, config: Config, directory: Path) -> dict[str, str]:
    """Write ``weights.pt`` and ``unet.json`` for ``model`` into ``directory``; returns their paths.

    The weights are copied to the CPU first, so the caller may go on training.
    """
    import torch

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
            import torch

            from unetdist.model import build_unet

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
            from unetdist.predict import predict_array  # written beside this module; imported late

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


def model_signature(in_channels: int) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, in_channels, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1))]),
        params=ParamSchema(
            [
                ParamSpec("overlap", "double", PREDICT_PARAMS["overlap"]),
                ParamSpec("flips", "boolean", PREDICT_PARAMS["flips"]),
                ParamSpec("batch_size", "long", PREDICT_PARAMS["batch_size"]),
                ParamSpec("tile", "long", PREDICT_PARAMS["tile"]),  # 0: the training tile size
            ]
        ),
    )


def log_pyfunc_model(
    client: MlflowClient, tracking_uri: str, experiment_id: str, run_id: str, op: dict[str, Any]
) -> str:
    """Log the files of ``save_model_files`` as a LoggedModel of the run; returns its model id.

    ``op`` holds ``name``, ``files`` (paths), ``step``, ``in_channels``, ``example_size``,
    ``register_as`` and ``alias``. A retry after a partial failure reuses the
    LoggedModel created before (its id is kept in ``op``).

    How, in mlflow 3.17: ``mlflow.pyfunc.log_model`` has no tracking-URI argument and,
    given only ``run_id``, files the LoggedModel under the globally active experiment,
    not the run's. So the LoggedModel is created here through our client, in the run's
    experiment and linked to the run, and ``log_model`` gets its ``model_id``, with the
    global tracking URI pointed at our store just for the call. No fluent run is started,
    so the run's status is untouched.
    """
    import mlflow.pyfunc
    from mlflow.entities import LoggedModelOutput

    import unetdist

    if not op.get("model_id"):
        logged = client.create_logged_model(
            experiment_id=experiment_id,
            name=op["name"],
            source_run_id=run_id,
            tags={"unetdist.kind": op.get("alias") or op["name"], "unetdist.step": str(op["step"])},
        )
        op["model_id"] = logged.model_id
    size = int(op["example_size"])
    example = (
        np.random.default_rng(0).standard_normal((1, int(op["in_channels"]), size, size)).astype(np.float32)
    )
    with global_tracking_uri(tracking_uri):
        info = mlflow.pyfunc.log_model(
            name=op["name"],
            python_model=UNetSegmenter(),
            artifacts=op["files"],
            signature=model_signature(int(op["in_channels"])),
            input_example=example,
            pip_requirements=pinned_requirements("torch", "numpy", "cloudpickle", "mlflow"),
            code_paths=[str(Path(unetdist.__file__).parent)],
            model_id=op["model_id"],
            step=int(op["step"]),
        )
    # pyfunc.log_model links a model to the fluent active run only; link it to ours
    client.log_outputs(run_id, [LoggedModelOutput(op["model_id"], step=int(op["step"]))])
    if op.get("register_as"):
        _register(client, op["register_as"], op["model_id"], run_id, op.get("alias"))
    logger.info("logged model %s (%s) of run %s", op["name"], op["model_id"], run_id)
    return info.model_id


def _register(client: MlflowClient, name: str, model_id: str, run_id: str, alias: str | None) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(
        name, source=f"models:/{model_id}", run_id=run_id, model_id=model_id
    )
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    logger.info("registered %s version %s%s", name, version.version, f" (@{alias})" if alias else "")


def log_pytorch_model(
    client: MlflowClient,
    tracking_uri: str,
    experiment_id: str,
    run_id: str,
    params: dict[str, str],
    model: torch.nn.Module,
    input_example: np.ndarray,
    name: str = "model",
    step: int = 0,
) -> Any:
    """Log a CPU, eval-mode copy of ``model`` with MLflow's PyTorch flavor; returns its ModelInfo.

    Serialization is pickle (cloudpickle), not MLflow's default "pt2": ``torch.export``
    specializes the batch dimension to the example's 1 (a batch of 2 then fails a guard)
    and takes seconds even for a tiny net.
    """
    import mlflow.pytorch
    import torch

    model_for_logging = copy.deepcopy(unwrap_model(model)).to("cpu").eval()
    example = (
        input_example.detach().cpu().numpy() if isinstance(input_example, torch.Tensor) else input_example
    )
    example = np.asarray(example, dtype=np.float32)
    if example.ndim == 3:
        example = example[np.newaxis]
    logged_model = client.create_logged_model(
        experiment_id=experiment_id, name=name, source_run_id=run_id, params=dict(params)
    )
    with (
        global_tracking_uri(tracking_uri),
        filtered_logger("mlflow.pytorch", "Saving pytorch model by Pickle"),
    ):
        return mlflow.pytorch.log_model(
            model_for_logging,
            name=name,
            input_example=example,
            pip_requirements=pinned_requirements("torch", "numpy", "cloudpickle"),
            serialization_format="pickle",
            run_id=run_id,
            model_id=logged_model.model_id,
            step=step,
        )
