"""Data path: folders -> tar shards or a Zarr store (``prepare``), store -> exact, resumable batches.

A sample flows one way: store -> global sequence position -> rank/worker -> decode + checks
-> crop + augmentation parameters -> batch -> ``to_model_input`` (augment + normalise, on the
CPU in a worker or on the training device).
"""

from unetdist.data.augment import AugmentSpec, to_model_input
from unetdist.data.loader import TrainLoader, build_train_loader, build_val_loader
from unetdist.data.prepare import PrepareError, prepare_dataset
from unetdist.data.samples import DataError, SampleChecks
from unetdist.data.synthetic import synthetic_cells
from unetdist.data.webdataset import list_shards

__all__ = [
    "AugmentSpec",
    "DataError",
    "PrepareError",
    "SampleChecks",
    "TrainLoader",
    "build_train_loader",
    "build_val_loader",
    "list_shards",
    "prepare_dataset",
    "synthetic_cells",
    "to_model_input",
]
