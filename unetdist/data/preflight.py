"""Start-up checks and the start-up line of the training data: what cannot run is refused
before any worker starts, naming the setting to change.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os

import numpy as np

from unetdist.config import ConfigError, DataConfig
from unetdist.data.augment import sample_words
from unetdist.data.layout import DATASET_JSON, WHOLE_IMAGES
from unetdist.data.remote import join, read_bytes
from unetdist.data.samples import DataError, SampleChecks
from unetdist.data.sequence import GlobalSequence, RankLayout
from unetdist.data.sources import mask_kind_of, node_readahead_bytes
from unetdist.data.sources.base import Source

log = logging.getLogger(__name__)


def log_topology(
    data: DataConfig, source: Source, sequence: GlobalSequence, layout: RankLayout, block_size: int
) -> None:
    """The start-up line: ranks x workers x units, and how the global batch and the epoch are cut.

    Workers are not tied to units: a worker makes every W-th item of its rank's endless
    micro-batch sequence by random access, so no count of workers, shards or images leaves
    one without work. What cannot run is refused where it is built: an epoch of no step
    (:func:`unetdist.data.sequence.epoch_length`), tiles smaller than ``data.tile_size``
    (:func:`check_tile_size`), fewer validation samples than ranks (:func:`check_val_samples`).
    """
    samples, length = sequence.blocks.num_samples, sequence.epoch_length
    change = (
        f"pads {length - samples} repeated sample(s)"
        if length > samples
        else f"drops {samples - length} sample(s)"
        if length < samples
        else "neither pads nor drops"
    )
    workers, units = max(1, data.num_workers), len(source.counts)
    handover = (
        f"; a worker hands over {data.prefetch_factor} micro-batches at a time"
        if data.num_workers > 0
        else ""
    )
    log.info(
        "data: %d rank(s) x %d worker(s) x %d %s(s) (%s, %d train samples in blocks of %d); global batch %d "
        "= %d rank(s) x %d x %d; epoch of %d steps (epoch_end=%s %s)%s",
        layout.world_size,
        workers,
        units,
        source.unit_name,
        data.format,
        samples,
        block_size,
        layout.global_batch_size,
        layout.world_size,
        layout.accumulation_steps,
        layout.micro_batch_size,
        length // layout.global_batch_size,
        data.epoch_end,
        change,
        handover,
    )


def resolve_mask_kind(data: DataConfig, target: str) -> tuple[DataConfig, str]:
    """``data`` with ``mask_kind`` resolved (auto: :func:`~unetdist.data.sources.mask_kind_of`), and
    where the kind comes from; refuses ``loss.target=boundary`` for masks that are not instance ids."""
    kind, origin = mask_kind_of(data)
    if target == "boundary" and kind != "instances":
        raise ConfigError(
            f"loss.target=boundary derives background / interior / boundary from instance ids, but "
            f"data.mask_kind is {kind} ({origin}): set data.mask_kind=instances if the masks hold instance "
            "ids, else loss.target=semantic"
        )
    return dataclasses.replace(data, mask_kind=kind), origin


def log_masks(checks: SampleChecks, origin: str) -> None:
    """The start-up line saying what the masks hold and what the model is trained on."""
    trained = {
        "classes": "class ids, trained as they are",
        "binary": "0 / non-zero, trained as background / foreground",
        "instances": "instance ids, trained as background / foreground; validation matches the instances",
    }[checks.mask_kind]
    if checks.mask_kind == "instances" and checks.target == "boundary":
        rim = checks.boundary_width_px
        trained = (f"instance ids, trained as background / interior / boundary with a {rim} px rim "
                   "(loss.target=boundary); validation matches the instances")  # fmt: skip
    log.info("masks: %s (%s)", trained, origin)


def log_weight_maps(source: Source, checks: SampleChecks, seed: int) -> None:
    """The start-up line saying where the border weight maps come from (loss.use_weight_map),
    judged by the first training sample, read from a copy of the source (the original is
    pickled into the workers unopened)."""
    if checks.use_weight_map == "false":
        log.info("border weight maps: off (loss.use_weight_map=false)")
        return
    probe = copy.deepcopy(source)
    first = probe.read_windows(np.zeros(1, np.int64), np.zeros(1, np.int64), sample_words(seed, np.zeros(1)))[0]
    if isinstance(first, DataError):
        return  # the workers name it, by data.on_error
    if first.weight is None:
        how = (f"none: the data stores none and its masks are {checks.mask_kind} (data.mask_kind=instances "
               "computes them from instance ids)")
    elif first.weight_computed:
        how = "computed from the instance masks in the workers (w0=10, sigma=5)"
    else:
        how = "stored with the data"
    log.info("border weight maps: %s (loss.use_weight_map=%s)", how, checks.use_weight_map)


def check_tile_size(data: DataConfig, spatial_dims: int | None = None) -> None:
    """Refuse a ``data.tile_size`` (of volumes, ``data.tile_depth``) larger than the tiles of the
    prepare folder ``data.root``.

    Otherwise every sample fails its check in the workers, after the start-up. Stores of
    whole images check their images themselves; explicit shard lists are checked per sample.
    ``spatial_dims``: the model's; volumes read against images (or the reverse) are left to the
    sample check, whose one line names the shard, the sample and model.spatial_dims.
    """
    explicit = data.train_shards if data.format == "webdataset" else data.zarr_store
    if not data.root or explicit:
        return
    try:
        meta = json.loads(read_bytes(join(data.root, DATASET_JSON)))
    except (OSError, ValueError):  # DataError (remote) is a ValueError
        return  # the source names a missing or unreadable dataset.json itself
    if not isinstance(meta, dict) or meta.get("layout") == WHOLE_IMAGES or meta.get("format") != data.format:
        return
    if spatial_dims is not None and meta.get("spatial_dims", 2) != spatial_dims:
        return
    stored, depth = meta.get("tile_size"), meta.get("tile_depth")
    wanted = data.tile_depth or data.tile_size  # data.tile_depth 0: a cube
    if spatial_dims == 3 and isinstance(depth, int) and wanted > depth:
        raise ConfigError(
            f"data.tile_depth={data.tile_depth}{' (0: data.tile_size)' if not data.tile_depth else ''} is deeper "
            f"than the {depth}-plane tiles stored in {data.root} (its dataset.json): set data.tile_depth to at "
            f"most {depth}, or prepare the data again with --tile-depth {wanted} or more"
        )
    if isinstance(stored, int) and data.tile_size > stored:
        raise ConfigError(
            f"data.tile_size={data.tile_size} is larger than the {stored}x{stored} tiles stored in {data.root} "
            f"(its dataset.json): set data.tile_size to at most {stored}, or prepare the data again with "
            f"--tile {data.tile_size} or more"
        )


def check_val_samples(samples: int, world_size: int) -> None:
    """Refuse a validation split with no samples, or fewer samples than ranks."""
    if samples == 0:
        raise ValueError("no validation samples: prepare with --val-fraction > 0")
    if samples < world_size:
        # A rank without a validation batch makes no forward pass there, so it skips the buffer
        # broadcast (BatchNorm statistics) that DDP makes at each rank's first forward after
        # training, and the other ranks wait for it until train.timeout_s.
        idle = f"rank {samples}" if samples == world_size - 1 else f"ranks {samples}..{world_size - 1}"
        raise ConfigError(
            f"the validation split has {samples} sample(s) for {world_size} ranks: {idle} would get none "
            "and validation would hang; hold out more validation data (prepare --val-fraction, or a larger "
            "split in data.val_shards / data.root) or run fewer ranks (--nproc_per_node)"
        )


def check_cache_limit(data: DataConfig) -> None:
    """Refuse a node cache smaller than what this node's readers hold ahead: it could keep nothing
    they are about to read, and every sample would be fetched twice."""
    if not data.cache_dir:
        return
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    workers = max(1, data.num_workers)
    window = node_readahead_bytes(data)
    if data.cache_limit_gb * 2**30 < window:
        raise ConfigError(
            f"data.cache_limit_gb={data.cache_limit_gb} is smaller than this node's readahead window: "
            f"{local_ranks} rank(s) x {workers} worker(s) x data.readahead_mb={data.readahead_mb} = "
            f"{window / 2**30:.2f} GB; raise data.cache_limit_gb or lower data.readahead_mb"
        )
