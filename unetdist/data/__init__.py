"""Data path: the user's data -> tar shards or a Zarr store (``prepare``), store -> exact, resumable batches.

A sample flows one way: store -> global sequence position -> rank/worker -> decode + checks
-> crop + augmentation parameters -> batch -> ``to_model_input`` (augment + normalise, on the
CPU in a worker or on the training device).

Layers, lowest first (a module imports only from its own layer or below):

* ``layout`` (the on-disk contract), ``imageio``, ``samples``, ``cache``, ``sequence``, ``synthetic``,
  ``remote`` (object stores), ``ngff`` (OME-Zarr metadata)
* ``augment``, ``writers``, ``fetch``, ``node_cache``, ``readahead``
* ``sources`` (``base``: the :class:`Source` protocol; ``tar``, ``zarr_tiles``, ``zarr_arrays``,
  ``zarr_images`` and ``ome_zarr`` on ``image_windows``)
* ``batching``, ``streams``, ``preflight``, ``lineage`` (what a run logs as its data sets)
* ``loader`` (training/validation loaders), ``inputs`` + ``prepare`` (the user's data -> a prepared data set)
"""

from unetdist.data.augment import AugmentSpec, to_model_input
from unetdist.data.imageio import PrepareError
from unetdist.data.loader import TrainLoader, build_train_loader, build_val_loader
from unetdist.data.prepare import prepare_dataset
from unetdist.data.samples import DataError, SampleChecks
from unetdist.data.sources import Source, list_shards, open_source
from unetdist.data.synthetic import synthetic_cells, write_synthetic

__all__ = [
    "AugmentSpec",
    "DataError",
    "PrepareError",
    "SampleChecks",
    "Source",
    "TrainLoader",
    "build_train_loader",
    "build_val_loader",
    "list_shards",
    "open_source",
    "prepare_dataset",
    "synthetic_cells",
    "to_model_input",
    "write_synthetic",
]
