"""``predict --tune``: choose the instance decoding on annotated images, then predict with it.

    python -m unetdist.predict --model run/ --input new/ --output pred/ --tune data/cells
    python -m unetdist.predict --model run/ --input new/ --output pred/ --tune val/images \\
        --tune-masks val/masks
    python -m unetdist.predict --model run3d/ --input vol.zarr --output pred/ --tune data/volumes

The annotated images are a prepared data set's validation split (a folder or URL holding
``dataset.json``, prepared from instance masks; read through :mod:`unetdist.data.sources`, so
tar shards, Zarr stores and whole-image stores alike), or a folder of images with a folder of
instance masks (0 background, one id per object) matched by file stem. A 3-D model tunes on volumes:
a prepared 3-D data set's val split (``prepare --spatial-dims 3``, the whole-volume Zarr store), or
folders of TIFF stacks / ``.npy`` volumes (ZxYxX or ZxCxYxX images, ZxYxX instance masks; read as
``predict`` reads its stacks), decoded in 3-D with the voxel grid (``spatial_dims=3``). Each is predicted like
any input (same tiles, flips, precision), its probabilities decoded with every point of
:func:`unetdist.decoding.decoding_grid` (min sizes scaled to the median true object area) and
matched to the truth; the point of the highest AP@0.5 over all images wins
(:func:`unetdist.decoding.best_params`). Under torchrun the ranks split the images and sum their
counts, so every rank picks the same point.

A prepared data set's validation samples are tiles, scored as tiles (an object cut by a tile's
edge counts as the part inside it, in truth and prediction alike), as in training.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from unetdist import distributed
from unetdist.config import DataConfig
from unetdist.data import remote
from unetdist.data.imageio import PrepareError
from unetdist.data.inputs import FolderPairs
from unetdist.data.layout import DATASET_JSON, MASK_KIND_KEY
from unetdist.data.samples import DataError, SampleChecks
from unetdist.data.sources import open_source
from unetdist.decoding import best_params, decoding_grid, tuning_counts
from unetdist.inference.engine import InputError, TilePredictor, as_chw, as_czyx
from unetdist.instances import DecodeParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TuningSample:
    """One annotated image: ``image`` [C, H, W] raw intensities, ``truth`` HxW instance ids (a volume:
    [C, Z, Y, X] and ZxYxX)."""

    name: str
    image: np.ndarray
    truth: np.ndarray


@dataclass(frozen=True)
class TuningResult:
    params: DecodeParams
    ap50: float
    samples: int
    objects: int
    grid_points: int

    def details(self, location: str) -> dict[str, Any]:
        """What decoding.json says beside the params."""
        return {"ap50": round(self.ap50, 4), "tuned_on": remote.display(location), "samples": self.samples,
                "objects": self.objects, "grid_points": self.grid_points}  # fmt: skip


def tuning_samples(
    location: str, masks: str | None, in_channels: int | None, spatial_dims: int | None = None
) -> list[TuningSample]:
    """The annotated images at ``location`` (see the module docstring); an InputError naming what
    is wrong (no such folder, class masks, a sample that does not fit the model).

    ``spatial_dims``: the model's (3: volumes). None: a prepared data set's own (its
    ``dataset.json``), and 2-D images for folders, whose files alone cannot say whether a stack
    is a volume or planes to tune on one by one."""
    if masks is not None:
        if spatial_dims == 3:
            return _volume_samples(location, masks, in_channels)
        return _folder_samples(location, masks, in_channels)
    if remote.is_remote(location) or Path(location).is_dir():
        if remote.exists(remote.join(location, DATASET_JSON)):
            return _dataset_samples(location, in_channels, spatial_dims)
    shown = remote.display(location)
    if not remote.is_remote(location) and not Path(location).exists():
        raise InputError(f"--tune {shown}: no such folder")
    raise InputError(
        f"--tune {shown}: not a prepared data set (no {DATASET_JSON}); for a folder of images give its "
        "instance masks with --tune-masks"
    )


def _dataset_samples(root: str, in_channels: int | None, spatial_dims: int | None) -> list[TuningSample]:
    shown = remote.display(root)
    try:
        dataset = json.loads(remote.read_bytes(remote.join(root, DATASET_JSON)))
    except ValueError as err:
        raise InputError(f"--tune {shown}: unreadable {DATASET_JSON}: {err}") from err
    kind = dataset.get(MASK_KIND_KEY, "classes")
    if kind != "instances":
        raise InputError(
            f"--tune {shown}: its masks hold {kind} ({DATASET_JSON} {MASK_KIND_KEY}), tuning needs instance "
            "masks: prepare it from instance masks"
        )
    held = int(dataset.get("spatial_dims") or 2)
    if spatial_dims is not None and held != spatial_dims:
        raise InputError(
            f"--tune {shown}: holds {'3-D volumes' if held == 3 else '2-D images'} ({DATASET_JSON} "
            f"spatial_dims {held}), the model is {spatial_dims}-D: tune on data prepared for it"
        )
    channels = in_channels or int(dataset.get("in_channels", 1))
    tile_size, tile_depth = int(dataset.get("tile_size") or 1), int(dataset.get("tile_depth") or 0)
    data = DataConfig(root=root, format=dataset.get("format", "webdataset"), mask_kind="instances",
                      num_workers=0, tile_size=tile_size, tile_depth=tile_depth)  # fmt: skip
    # a whole-image store cuts its validation tiles by the checks' tile shape, so they carry the
    # prepared tile (tar shards and tile stores hold tiles of that size already)
    checks = SampleChecks(tile_size, channels, int(dataset.get("num_classes", 2)), "false", "instances",
                          spatial_dims=held, tile_depth=tile_depth)  # fmt: skip
    try:
        source = open_source(data, "val", checks)
        samples = []
        for unit, count in enumerate(source.counts):
            for sample in source.read(unit, list(range(count))):
                if isinstance(sample, DataError):
                    raise sample
                samples.append(TuningSample(sample.key, sample.image, np.asarray(sample.instances)))
    except (DataError, ValueError, OSError) as err:
        raise InputError(f"--tune {shown}: {err}") from err
    if not samples:
        raise InputError(f"--tune {shown}: no validation samples (its val split is empty)")
    return samples


def _folder_samples(images: str, masks: str, in_channels: int | None) -> list[TuningSample]:
    for folder in (images, masks):
        if remote.is_remote(folder) or not Path(folder).is_dir():
            raise InputError(f"--tune {remote.display(folder)}: not a local folder")
    pairs = FolderPairs(images, masks)
    try:
        stems = [stem for stem, _ in pairs.items()]
        read = list(pairs.read(stems))
    except (PrepareError, ValueError, OSError) as err:
        raise InputError(f"--tune: {err}") from err
    samples = []
    for pair in read:
        mask = np.squeeze(pair.mask)
        if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
            raise InputError(
                f"{pair.mask_where}: expected HxW integer instance ids, got {mask.dtype} {pair.mask.shape}"
            )
        image = pair.image
        if image.ndim == 3 and image.shape[-2:] != mask.shape and image.shape[:2] == mask.shape:
            image = np.moveaxis(image, -1, 0)  # HxWxC beside an HxW mask
        image = as_chw(image, in_channels, pair.image_where)
        if image.shape[1:] != mask.shape:
            raise InputError(
                f"{pair.image_where}: size {image.shape[1:]} differs from its mask's {mask.shape}"
            )
        samples.append(TuningSample(pair.stem, image, mask))
    return samples


def _volume_samples(images: str, masks: str, in_channels: int | None) -> list[TuningSample]:
    """Folders of volumes matched by stem (:class:`~unetdist.data.volumes.VolumePairs`); the image
    taken as ``predict`` takes a stack (ZxCxYxX when its second axis fits the model's channels)."""
    from unetdist.data.volumes import VolumePairs

    for folder in (images, masks):
        if remote.is_remote(folder) or not Path(folder).is_dir():
            raise InputError(f"--tune {remote.display(folder)}: not a local folder")
    pairs = VolumePairs(images, masks)
    try:
        read = list(pairs.read([stem for stem, _ in pairs.items()]))
    except (PrepareError, ValueError, OSError) as err:
        raise InputError(f"--tune: {err}") from err
    if not read:
        raise InputError(f"--tune {images}: no volumes (.tif, .tiff, .npy) matched by stem in {masks}")
    samples = []
    for pair in read:
        mask = pair.mask
        if mask.ndim != 3 or not np.issubdtype(mask.dtype, np.integer):
            raise InputError(
                f"{pair.mask_where}: expected ZxYxX integer instance ids, got {mask.dtype} {mask.shape}"
            )
        image = pair.image
        if image.ndim == 4 and in_channels is not None and image.shape[1] == in_channels:
            image = np.moveaxis(image, 1, 0)  # ZxCxYxX (ImageJ hyperstacks, OME-TIFF) as predict reads it
        image = as_czyx(image, in_channels, pair.image_where)
        if image.shape[1:] != mask.shape:
            raise InputError(
                f"{pair.image_where}: size {image.shape[1:]} differs from its mask's {mask.shape}"
            )
        samples.append(TuningSample(pair.stem, image, mask))
    return samples


def tune_decoding(
    model: nn.Module,
    samples: list[TuningSample],
    target: str,
    *,
    rank: int = 0,
    world_size: int = 1,
    **predict_options: Any,
) -> TuningResult:
    """The grid point of the highest AP@0.5 on ``samples`` (every rank calls this with all of them
    and predicts its share). ``predict_options`` go to ``TilePredictor``. A 3-D model's samples are
    volumes, its grid the voxel one (min sizes in voxels, peak spacings of a ball that large)."""
    spatial_dims = int(getattr(model, "spatial_dims", 2) or 2)
    for sample in samples:  # one line naming the mismatch, before any prediction
        if sample.truth.ndim != spatial_dims:
            raise InputError(
                f"--tune: {sample.name} is {sample.truth.ndim}-D (shape {sample.truth.shape}), the model "
                f"{spatial_dims}-D (model.spatial_dims): tune a {spatial_dims}-D model on "
                f"{'volumes' if spatial_dims == 3 else '2-D images'}"
            )
    areas = np.concatenate([np.bincount(sample.truth.ravel().astype(np.int64))[1:] for sample in samples])
    areas = areas[areas > 0]
    grid = decoding_grid(target, float(np.median(areas)) if areas.size else None, spatial_dims=spatial_dims)
    counts = np.zeros((len(grid), 3), dtype=np.int64)
    for sample in samples[rank::world_size]:
        shape = sample.truth.shape
        predictor = TilePredictor(model, *shape, **predict_options)
        stats = predictor.stats_of(sample.image)
        whole = tuple(value for side in shape for value in (0, side))
        probabilities = predictor.predict_block(sample.image, stats, whole)
        counts += tuning_counts([probabilities], [sample.truth], grid)
    counts = distributed.all_reduce_sum(torch.from_numpy(counts)).numpy()
    params, ap = best_params(grid, counts)
    return TuningResult(params, ap, len(samples), int(areas.size), len(grid))
