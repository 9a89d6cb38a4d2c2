"""What every part of tracking shares: the null tracker, the run-end statuses and MLflow's request limits.

Kept free of ``mlflow`` imports: ranks that only ever hold a ``NullTracker`` should not pay
seconds for importing it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

# mlflow.utils.validation: MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH, MAX_METRICS_PER_BATCH
MAX_PARAM_VALUE_LENGTH = 6000
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

RUN_END_STATUSES = ("FINISHED", "FAILED", "KILLED")
LEAVE_RUNNING = "RUNNING"  # finish("RUNNING"): flush and stop sending, the run stays open (preemption)


class NullTracker:
    """The tracker of non-main ranks and of runs with tracking off: every method does nothing."""

    run_id: str | None = None
    experiment_id: str | None = None
    tracking_uri: str | None = None

    def log_params(self, params: Mapping[str, object]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: Mapping[str, object]) -> None:
        pass

    def log_dataset_inputs(self, records: Iterable[Mapping[str, Any]]) -> None:
        pass

    def log_config(self, config_dict: Mapping[str, Any], filename: str = "config.yaml") -> None:
        pass

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        pass

    def log_image(self, png_path: str | os.PathLike[str], key: str, step: int) -> None:
        pass

    def log_pyfunc_model(self, op: Mapping[str, Any]) -> None:
        pass

    def log_model(
        self,
        model: torch.nn.Module,
        input_example: np.ndarray,
        name: str = "model",
        step: int = 0,
    ) -> None:
        pass

    def flush(self, timeout_s: float = 10.0) -> bool:
        return True

    def finish(self, status: str = "FINISHED") -> None:
        pass

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        pass
