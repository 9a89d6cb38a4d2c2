"""Logging the trained U-Net to an MLflow run: as a pyfunc model (queued) or with the PyTorch flavor.

The model class and its files live in ``unetdist.inference.pyfunc``; this module only
puts them into a run, its experiment and, optionally, the model registry. The pyfunc model
is logged as MLflow "models from code" (``ENTRY_FILE``), so no pickle is written or read.
It imports torch and the inference code, so the tracker imports it only when a model is logged.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from unetdist.inference.pyfunc import ENTRY_FILE, PREDICT_PARAMS, unwrap_model

if TYPE_CHECKING:
    import torch
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)


def pinned_requirements(*distributions: str) -> list[str]:
    """``name==version`` of each installed distribution, without a local build tag (``+cpu``)."""
    # Explicit requirements skip MLflow's inference, which imports the model in
    # a subprocess: ~6 s instead of ~0.5 s for a tiny net (measured, mlflow 3.17).
    pinned = []
    for distribution in distributions:
        try:
            version = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            pinned.append(distribution)
            continue
        # a local build (torch "2.13.0+cpu", "+cu124") is on no index a serving env installs from
        pinned.append(f"{distribution}=={version.split('+', 1)[0]}")
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


def model_signature(in_channels: int, spatial_dims: int = 2) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, in_channels, *(-1,) * spatial_dims))]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, *(-1,) * spatial_dims))]),
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

    ``op`` holds ``name``, ``files`` (paths), ``step``, ``in_channels``, ``example_shape`` (the tile),
    ``register_as`` and ``alias``. A retry after a partial failure reuses the
    LoggedModel created before (its id is kept in ``op``).

    The model is "models from code": MLflow copies ``ENTRY_FILE`` into the model (and runs
    it once here to check it), the weights stay a plain state dict, nothing is pickled.

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
    shape = [int(v) for v in op.get("example_shape") or [op["example_size"]] * 2]  # ops queued before volumes
    example = np.random.default_rng(0).standard_normal((1, int(op["in_channels"]), *shape)).astype(np.float32)
    with global_tracking_uri(tracking_uri):
        info = mlflow.pyfunc.log_model(
            name=op["name"],
            python_model=str(ENTRY_FILE),
            artifacts=op["files"],
            signature=model_signature(int(op["in_channels"]), len(shape)),
            input_example=example,
            pip_requirements=pinned_requirements("torch", "numpy", "mlflow"),
            # the whole package, so the entry file imports it where no unetdist is installed
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
