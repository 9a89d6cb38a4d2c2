"""The data fingerprint: what the planner (:mod:`unetdist.planning`) knows of a training set.

Measured the same way every time, so the same data gives the same numbers, and quickly: a
seeded, bounded sample of training tiles (256 by default: about a second from local shards)::

    fingerprint = fingerprint_data(DataConfig(root="data/cells", format="webdataset"), in_channels=1)
    Path("plan.fingerprint.json").write_text(json.dumps(fingerprint.to_dict(), indent=2))
    same = Fingerprint.from_dict(json.loads(text))      # equal to ``fingerprint``

What it holds and where each number comes from:

* image sizes: whole-image stores know them; pre-tiled data sets give them back from their
  tile keys (``{stem}_y{top}_x{left}``: the last tile of a row or column ends at the image's
  edge); samples of other keys (the user's own shards) are taken as whole images;
* per channel, the intensities of foreground (mask > 0) and background pixels: mean and std
  over every pixel of the sampled tiles, min and max too (one hot pixel matters), percentiles
  over a seeded subsample of at most 10,000 pixels per tile and class (nnU-Net samples 10,000
  foreground voxels per case);
* objects: instance ids where the masks store them (dataset.json ``"mask_kind": "instances"``),
  else the connected components of the foreground, which merge touching objects (then the
  touching fraction is unknown: None). Only objects whole inside their tile are measured (one
  cut by the tile's edge looks smaller than it is), each weighted by how likely an object of
  its extent is to be cut (minus-sampling), so large objects are not undercounted; if every
  object is cut, their visible parts (a lower bound);
* class frequencies: the share of sampled pixels per stored label (instances: background and
  foreground).

Floats are kept to 6 significant digits, so the JSON file and the live object plan alike.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from unetdist.config import DataConfig
from unetdist.data.augment import sample_words
from unetdist.data.layout import DATASET_JSON
from unetdist.data.remote import display, join, zarr_store
from unetdist.data.samples import DataError, Sample, SampleChecks
from unetdist.data.sources import Source, open_source
from unetdist.data.sources.image_windows import ImageWindows
from unetdist.data.sources.tar import TarShards, dataset_meta
from unetdist.data.sources.zarr_tiles import ZarrTiles

FINGERPRINT_VERSION = 1
DEFAULT_SAMPLE_TILES = 256
PIXELS_PER_TILE = 10_000  # per tile and class (foreground / background): the percentiles' subsample
PERCENTILES = (0.5, 1.0, 50.0, 99.5, 99.8)
# The config keys that say where the data is and how it is read: the plan copies them as they are.
SOURCE_KEYS = ("format", "root", "train_shards", "val_shards", "image_key", "mask_key", "weight_key",
               "zarr_store", "image_array", "mask_array", "weight_array", "images", "labels", "level",
               "channels", "val_images", "val_fraction")  # fmt: skip
_TILE_KEY = re.compile(r"^(?P<stem>.+)_y(?P<top>\d+)_x(?P<left>\d+)$")
_READ_BATCH = 32
FINGERPRINT_SUFFIX = ".fingerprint.json"


def fingerprint_path(plan_path: str | Path) -> Path:
    """Where the fingerprint of a plan goes: ``plan.fingerprint.json`` beside ``plan.yaml``."""
    plan_path = Path(plan_path)
    return plan_path.with_name(plan_path.stem + FINGERPRINT_SUFFIX)


class FingerprintError(ValueError):
    """Data that cannot be fingerprinted; the message names the store or sample and the problem."""


def _round(value: float) -> float:
    return float(f"{float(value):.6g}")


@dataclass(frozen=True)
class IntensityStats:
    """Intensities of one channel and pixel class, in the stored units (before any normalisation)."""

    pixels: int  # pixels of the sampled tiles in this class (mean, std, min, max are over all of them)
    mean: float
    std: float
    min: float
    max: float
    p0_5: float  # percentiles: over the subsample
    p1: float
    p50: float
    p99_5: float
    p99_8: float

    @classmethod
    def of(cls, pixels: int, total: float, total_sq: float, low: float, high: float, subsample: np.ndarray):
        mean = total / pixels
        std = math.sqrt(max(total_sq / pixels - mean * mean, 0.0))
        quantiles = np.percentile(subsample, PERCENTILES)
        return cls(pixels, *(_round(v) for v in (mean, std, low, high, *quantiles)))


@dataclass(frozen=True)
class ChannelIntensity:
    """One channel's intensities over all, foreground and background pixels (None: no such pixel)."""

    all: IntensityStats
    foreground: IntensityStats | None
    background: IntensityStats | None


@dataclass(frozen=True)
class Fingerprint:
    """What the planner needs to know of a training set (see the module docstring for each number)."""

    data: dict[str, Any]  # SOURCE_KEYS that name the data, as a config's data section
    dataset: str  # what was read, for people
    mask_kind: str  # what the stored masks hold: instances (ids), classes, binary (0/1)
    objects_from: str  # how objects were found: instance ids, or connected components
    channels: int
    image_dtype: str
    num_classes: int  # of the stored labels (instances: 2, background and foreground)
    num_train_images: int
    num_train_samples: int  # stored tiles, or whole-image units
    median_image_hw: tuple[int, int]
    smallest_image_edge_px: int
    image_sizes_from: str
    max_tile_px: int  # the largest square tile the stored data gives (stored tiles, or the smallest image)
    train_pixels: int  # pixels of all training images
    sampled_tiles: int
    seed: int
    intensity: tuple[ChannelIntensity, ...]
    num_objects: int  # measured: whole inside their tile
    median_object_diameter_px: float | None  # equivalent circle: 2 sqrt(area / pi)
    median_object_area_px: float | None
    touching_fraction: float | None  # of measured objects, share touching another object; None: unknown
    objects_cut_fraction: float  # of all objects seen, share cut by their tile's edge
    class_frequencies: dict[str, float]  # stored label -> share of sampled pixels
    version: int = FINGERPRINT_VERSION

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: nested dicts and lists (tuples as lists)."""
        return dataclasses.asdict(self)

    def summary(self) -> dict[str, Any]:
        """The numbers to compare runs by, flat (e.g. MLflow params ``fingerprint.<name>``)."""
        height, width = self.median_image_hw
        flat: dict[str, Any] = {
            "dataset": self.dataset, "mask_kind": self.mask_kind, "channels": self.channels,
            "image_dtype": self.image_dtype, "num_train_images": self.num_train_images,
            "median_image_hw": f"{height}x{width}", "train_pixels": self.train_pixels,
            "num_objects": self.num_objects, "median_object_diameter_px": self.median_object_diameter_px,
            "touching_fraction": self.touching_fraction,
            "foreground_share": _round(1 - self.class_frequencies.get("0", 0.0)),
        }  # fmt: skip
        for channel, stats in enumerate(self.intensity):
            flat.update({f"ch{channel}_p1": stats.all.p1, f"ch{channel}_p99_8": stats.all.p99_8,
                         f"ch{channel}_max": stats.all.max})  # fmt: skip
        return flat

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Fingerprint:
        """The fingerprint :meth:`to_dict` wrote; FingerprintError naming a missing or unknown field."""
        fields = {f.name for f in dataclasses.fields(cls)}
        missing, unknown = sorted(fields - set(raw) - {"version"}), sorted(set(raw) - fields)
        if missing or unknown or raw.get("version", FINGERPRINT_VERSION) != FINGERPRINT_VERSION:
            raise FingerprintError(
                f"not a version {FINGERPRINT_VERSION} fingerprint: missing {missing}, unknown {unknown}, "
                f"version {raw.get('version')!r}"
            )

        def stats(item: dict | None) -> IntensityStats | None:
            return None if item is None else IntensityStats(**item)

        intensity = tuple(
            ChannelIntensity(stats(item["all"]), stats(item["foreground"]), stats(item["background"]))
            for item in raw["intensity"]
        )
        return cls(**{**raw, "intensity": intensity, "median_image_hw": tuple(raw["median_image_hw"])})


# ---------------------------------------------------------------- reading


def stored_mask_kind(meta: dict | None, configured: str) -> str:
    """What the stored masks hold: dataset.json's top-level ``mask_kind`` (prepare keeps instance
    ids since it writes one); before that, prepare stored instance masks as 0/1 ("binary");
    without a dataset.json, the config's ``data.mask_kind``."""
    if meta is None:
        return configured
    if "mask_kind" in meta:
        return str(meta["mask_kind"])
    kind = (meta.get("source") or {}).get("mask_kind", "classes")
    return "binary" if kind == "instances" else str(kind)


def fingerprint_data(
    data: DataConfig, in_channels: int, *, sample_tiles: int = DEFAULT_SAMPLE_TILES, seed: int = 0
) -> Fingerprint:
    """The fingerprint of the training split ``data`` names (through the loader's
    :func:`~unetdist.data.sources.open_source`); ``in_channels``: what each image must have."""
    try:
        meta = dataset_meta(data.root) if data.root else None
    except ValueError as err:  # names dataset.json and what is wrong with it
        raise FingerprintError(str(err)) from None
    if meta is not None and meta.get("format", data.format) != data.format:
        where = display(join(data.root, DATASET_JSON))
        raise FingerprintError(f"{where}: format {meta.get('format')!r}, but data.format={data.format}")
    mask_kind = stored_mask_kind(meta, data.mask_kind)
    # Labels as stored, whatever they are: read as class ids with no upper bound, no weight maps.
    reading = dataclasses.replace(data, mask_kind="classes", foreground_fraction=0.0, cache_dir="")
    checks = SampleChecks(data.tile_size, in_channels, 2**63, "false", "classes",
                          (data.image_key, data.mask_key, data.weight_key))  # fmt: skip
    try:
        source = open_source(reading, "train", checks)
        samples = _sampled(source, sample_tiles, seed)
    except (ValueError, OSError) as err:  # DataError is a ValueError
        raise FingerprintError(str(err)) from None
    margin = int(meta.get("context_margin", 0)) if meta else 0
    sizes, sizes_from = _image_sizes(source, samples, margin)
    measured = _Measure(in_channels, mask_kind, seed)
    for number, sample in enumerate(samples):
        measured.add(number, sample)
    names = source.names
    num_classes = 2 if mask_kind in ("instances", "binary") else max(measured.labels_seen, 2)
    if meta is not None and mask_kind == "classes":
        num_classes = max(num_classes, int(meta.get("num_classes", 0)))
    heights, widths = zip(*sizes, strict=True)
    return Fingerprint(
        data={key: getattr(data, key) for key in SOURCE_KEYS if key in ("format", "root")
              or getattr(data, key) != getattr(DataConfig(), key)},  # fmt: skip
        dataset=display(data.root) if data.root else ", ".join(names[:2]) + (" ..." if names[2:] else ""),
        mask_kind=mask_kind,
        objects_from="instance ids" if mask_kind == "instances" else "connected components of the foreground",
        channels=in_channels,
        image_dtype=str(samples[0].image.dtype),
        num_classes=num_classes,
        num_train_images=len(sizes),
        num_train_samples=int(sum(source.counts)),
        median_image_hw=(int(np.median(heights)), int(np.median(widths))),
        smallest_image_edge_px=int(min(min(size) for size in sizes)),
        image_sizes_from=sizes_from,
        max_tile_px=_max_tile(source, samples, sizes, lambda: open_source(  # any size: its images' are wanted
            dataclasses.replace(reading, tile_size=1), "val", dataclasses.replace(checks, tile_size=1))),
        train_pixels=int(sum(h * w for h, w in sizes)),
        sampled_tiles=len(samples),
        seed=seed,
        **measured.result(),
    )


def _sampled(source: Source, count: int, seed: int) -> list[Sample]:
    """``count`` training samples (all if fewer) at seeded positions, in position order; the
    random words of each position give whole-image sources their windows, as in training."""
    counts = np.asarray(source.counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        raise FingerprintError(f"{source.names[0]}: the training split holds no samples")
    positions = np.sort(np.random.default_rng(seed).choice(total, size=min(count, total), replace=False))
    bounds = np.cumsum(counts)
    units = np.searchsorted(bounds, positions, side="right")
    indices = positions - (bounds - counts)[units]
    words = sample_words(seed, positions)
    samples: list[Sample] = []
    for start in range(0, len(positions), _READ_BATCH):
        part = slice(start, start + _READ_BATCH)
        for got in source.read_windows(units[part], indices[part], words[part]):
            if isinstance(got, DataError):
                raise FingerprintError(str(got))
            samples.append(got)
    return samples


def _image_sizes(source: Source, samples: list[Sample], margin: int) -> tuple[list[tuple[int, int]], str]:
    """(height, width) of each training image, and where they came from."""
    if isinstance(source, ImageWindows):
        return [tuple(shape) for shape in source.shapes], "whole images"
    keys = _stored_keys(source)
    tile_shapes = Counter(sample.mask.shape for sample in samples)
    matches = [_TILE_KEY.match(key) for key in keys] if keys is not None and len(tile_shapes) == 1 else []
    if matches and all(matches):
        (tile_h, tile_w), = tile_shapes
        ends: dict[str, list[int]] = {}
        for match in matches:
            end = ends.setdefault(match["stem"], [0, 0])
            end[0] = max(end[0], int(match["top"]) + tile_h - 2 * margin)
            end[1] = max(end[1], int(match["left"]) + tile_w - 2 * margin)
        return [(h, w) for h, w in ends.values()], "tile keys"
    return [sample.mask.shape for sample in samples], "samples taken as images"


def _stored_keys(source: Source) -> list[str] | None:
    """Every training sample's key, where the store lists them cheaply; None otherwise."""
    if isinstance(source, TarShards):
        return [source.key(unit, i) for unit, count in enumerate(source.counts) for i in range(count)]
    if isinstance(source, ZarrTiles) and not source.own_layout and source.stems:
        import zarr

        group = zarr.open_group(zarr_store(source.store), mode="r")
        if source.paths["origin"] not in group:
            return None
        origin = np.asarray(group[source.paths["origin"]][...])
        return [f"{source.stems[image]}_y{top}_x{left}" for image, top, left in origin.tolist()]
    return None


def _max_tile(source: Source, samples: list[Sample], sizes: list[tuple[int, int]], open_val) -> int:
    """The largest square tile the loader can cut: the stored tiles' shorter edge, or for whole
    images the smallest image's, validation's too (its grid cuts tiles of the same size)."""
    if not isinstance(source, ImageWindows):
        return int(min(min(sample.mask.shape) for sample in samples))
    try:
        val = open_val()
        val_shapes = [tuple(shape) for shape in val.shapes] if isinstance(val, ImageWindows) else []
    except (ValueError, OSError):  # no validation split
        val_shapes = []
    return int(min(min(size) for size in [*sizes, *val_shapes]))


# ---------------------------------------------------------------- measuring


class _Measure:
    """Running sums of the sampled tiles' intensities, labels and objects."""

    def __init__(self, channels: int, mask_kind: str, seed: int) -> None:
        self.channels, self.mask_kind, self.seed = channels, mask_kind, seed
        # per channel and class (0 background, 1 foreground): pixels, sum, sum of squares, min, max
        self.sums = np.zeros((channels, 2, 3))
        self.low = np.full((channels, 2), np.inf)
        self.high = np.full((channels, 2), -np.inf)
        self.subsample: list[list[list[np.ndarray]]] = [[[], []] for _ in range(channels)]
        self.label_counts: Counter[int] = Counter()
        self.areas: list[np.ndarray] = []
        self.cut_areas: list[np.ndarray] = []
        self.weights: list[np.ndarray] = []
        self.touching: list[np.ndarray] = []
        self.labels_seen = 0

    def add(self, number: int, sample: Sample) -> None:
        labels = np.asarray(sample.mask)
        foreground = (labels > 0).ravel()
        rng = np.random.default_rng([self.seed, number])
        picks = [rng.permutation(np.flatnonzero(foreground == cls))[:PIXELS_PER_TILE] for cls in (0, 1)]
        for channel in range(self.channels):
            values = np.asarray(sample.image[channel], dtype=np.float64).ravel()
            for cls, pick in enumerate(picks):
                chosen = values[foreground == cls]
                if chosen.size:
                    self.sums[channel, cls] += (chosen.size, chosen.sum(), np.square(chosen).sum())
                    self.low[channel, cls] = min(self.low[channel, cls], chosen.min())
                    self.high[channel, cls] = max(self.high[channel, cls], chosen.max())
                    self.subsample[channel][cls].append(values[np.sort(pick)])
        ids, counts = np.unique(labels, return_counts=True)
        self.label_counts.update(dict(zip(ids.tolist(), counts.tolist(), strict=True)))
        self.labels_seen = max(self.labels_seen, int(ids.max()) + 1)
        self._objects(labels)

    def _objects(self, labels: np.ndarray) -> None:
        if self.mask_kind == "instances":
            values, inverse = np.unique(labels, return_inverse=True)  # dense ids: bincount stays small
            objects = inverse.reshape(labels.shape) + (0 if values[0] == 0 else 1)
        else:
            objects, _ = ndimage.label(labels > 0, structure=np.ones((3, 3), dtype=bool))
        areas = np.bincount(objects.ravel())
        present = np.flatnonzero(areas)
        present = present[present > 0]
        edge = np.unique(np.concatenate([objects[0], objects[-1], objects[:, 0], objects[:, -1]]))
        whole = np.setdiff1d(present, edge)
        boxes = ndimage.find_objects(objects)  # boxes[i - 1]: object i's (rows, columns) slices
        extents = np.array([[box.stop - box.start for box in boxes[i - 1]] for i in whole], dtype=np.float64)
        extents = extents.reshape(-1, 2)
        # An object of extent h x w lies whole in a randomly placed H x W tile with probability
        # (H - h)(W - w) / (H W): large objects are cut more often, so each whole one stands for
        # 1 / that many (minus-sampling); unweighted, the median would shrink with the tile.
        height, width = labels.shape
        inside = np.maximum((height - extents[:, 0]) * (width - extents[:, 1]), 1.0)
        self.weights.append(height * width / inside)
        self.areas.append(areas[whole])
        self.cut_areas.append(areas[np.intersect1d(present, edge)])
        if self.mask_kind == "instances":
            self.touching.append(np.isin(whole, _touching_ids(objects)))

    def result(self) -> dict[str, Any]:
        intensity = []
        for channel in range(self.channels):
            per_class = []
            for cls in (0, 1):
                pixels, total, total_sq = self.sums[channel, cls]
                if not pixels:
                    per_class.append(None)
                    continue
                subsample = np.concatenate(self.subsample[channel][cls])
                per_class.append(IntensityStats.of(int(pixels), total, total_sq, self.low[channel, cls],
                                                   self.high[channel, cls], subsample))  # fmt: skip
            pixels, total, total_sq = self.sums[channel].sum(axis=0)
            everything = np.concatenate([a for cls in (0, 1) for a in self.subsample[channel][cls]])
            whole = IntensityStats.of(int(pixels), total, total_sq, self.low[channel].min(),
                                      self.high[channel].max(), everything)  # fmt: skip
            intensity.append(ChannelIntensity(whole, per_class[1], per_class[0]))
        areas, cut = np.concatenate(self.areas), np.concatenate(self.cut_areas)
        weights = np.concatenate(self.weights)
        if not areas.size:  # every object cut by a tile's edge: their visible parts, a lower bound
            areas, weights = cut, np.ones(cut.size)
        median_area = _weighted_median(areas, weights) if areas.size else None
        diameter = None if median_area is None else 2 * math.sqrt(median_area / math.pi)  # equivalent circle
        seen = sum(a.size for a in self.areas) + cut.size
        touching = None
        if self.mask_kind == "instances" and sum(t.size for t in self.touching):
            touching = _round(np.average(np.concatenate(self.touching), weights=np.concatenate(self.weights)))
        total_pixels = sum(self.label_counts.values())
        if self.mask_kind == "classes":
            counts = sorted(self.label_counts.items())
            frequencies = {str(label): _round(n / total_pixels) for label, n in counts}
        else:
            foreground = sum(n for label, n in self.label_counts.items() if label > 0)
            frequencies = {"0": _round(1 - foreground / total_pixels), "1": _round(foreground / total_pixels)}
        return dict(
            intensity=tuple(intensity),
            num_objects=int(areas.size),
            median_object_diameter_px=None if diameter is None else _round(diameter),
            median_object_area_px=None if median_area is None else _round(median_area),
            touching_fraction=touching,
            objects_cut_fraction=_round(cut.size / seen) if seen else 0.0,
            class_frequencies=frequencies,
        )


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """The smallest value with at least half the total weight at or below it."""
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cumulative, cumulative[-1] / 2)])


def _touching_ids(objects: np.ndarray) -> np.ndarray:
    """Ids of objects with a pixel 8-adjacent to a pixel of another object."""
    pairs = (
        (objects[:, :-1], objects[:, 1:]),
        (objects[:-1, :], objects[1:, :]),
        (objects[:-1, :-1], objects[1:, 1:]),
        (objects[:-1, 1:], objects[1:, :-1]),
    )
    found = []
    for first, second in pairs:
        touch = (first > 0) & (second > 0) & (first != second)
        found += [first[touch], second[touch]]
    return np.unique(np.concatenate(found))
