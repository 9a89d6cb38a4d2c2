"""Experiment tracking: MLflow on the main process, a null object everywhere else.

The training loop calls the same methods on every rank; ``make_tracker`` hands non-main
ranks a ``NullTracker`` whose methods do nothing, so the loop never branches on the rank.
``MLflowTracker`` never lets the tracking server slow or stop training: calls are queued
and sent in the background, and what the server never takes is written to a file that
``python -m unetdist.tracking replay FILE`` sends later.

Modules, each importing only those before it:

- ``base``: ``NullTracker``, run-end statuses, MLflow's request limits.
- ``mlflow_setup``: MLflow's environment, the default tracking URI, secret redaction.
- ``datasets``: the data splits as MLflow dataset inputs (from ``unetdist.data.lineage``).
- ``sender``: the one place where an operation becomes MLflow client calls.
- ``outbox``: the background queue, its disk spill and the file of unsent calls.
- ``tracker``: ``MLflowTracker`` and ``make_tracker``.
- ``replay``: sending a file of unsent calls (``__main__`` runs it).
- ``models``: logging the trained U-Net as a model (imported only when a model is logged).
- ``run_outputs``: ``RunOutputs``, everything only rank 0 does during training.

Importing the package imports neither ``mlflow`` (seconds; ranks that only ever hold a
``NullTracker`` should not pay for it) nor torch: ``models`` and ``run_outputs`` are
imported by name where they are needed.
"""

from unetdist.tracking.base import LEAVE_RUNNING, RUN_END_STATUSES, NullTracker
from unetdist.tracking.mlflow_setup import default_tracking_uri, flatten_config
from unetdist.tracking.outbox import read_unsent, write_unsent
from unetdist.tracking.tracker import MLflowTracker, make_tracker

__all__ = [
    "LEAVE_RUNNING",
    "RUN_END_STATUSES",
    "MLflowTracker",
    "NullTracker",
    "default_tracking_uri",
    "flatten_config",
    "make_tracker",
    "read_unsent",
    "write_unsent",
]
