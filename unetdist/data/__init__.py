"""Data path: folders -> shards (``prepare``), shards -> batches (``webdataset``), toy data (``synthetic``).

A sample flows one way: store -> rank/worker split -> decode + checks -> augment -> batch.
"""

from unetdist.data.prepare import PrepareError, prepare_dataset
from unetdist.data.synthetic import synthetic_cells
from unetdist.data.webdataset import (
    TileChecks,
    TrainTileStream,
    ValTileStream,
    assign_shards,
    build_train_loader,
    build_val_loader,
    list_shards,
)

__all__ = [
    "PrepareError",
    "TileChecks",
    "TrainTileStream",
    "ValTileStream",
    "assign_shards",
    "build_train_loader",
    "build_val_loader",
    "list_shards",
    "prepare_dataset",
    "synthetic_cells",
]
