"""The fingerprint of 3-D volumes (issue 19): what the planner knows of a whole-volume Zarr store.

The 2-D fingerprint (:mod:`unetdist.data.fingerprint`) with what a 3-D plan needs besides:
the voxel spacing and the volumes' shape per axis, and the objects' extent per axis::

    if is_volume_data(data):
        fingerprint = fingerprint_volumes(data, in_channels=1)     # a VolumeFingerprint
    same = load_fingerprint(json.loads(text))                     # 2-D or 3-D, as written

It reads the store's arrays directly with zarr (the layout of ``prepare --spatial-dims 3``:
``SPLIT/images/<i>`` [C, Z, Y, X], ``SPLIT/masks/<i>`` [Z, Y, X]; the split group's attributes
``"shapes"`` and ``"spacing"`` per volume), not through the training loader, because the
planner wants whole volumes (nnU-Net fingerprints whole cases) and the loader cuts tiles of a
size the plan has yet to choose. What it holds beyond the 2-D fingerprint's fields:

* ``spacing``: the median voxel size per axis (z, y, x) over the training volumes, in the file's
  unit; per volume from the group's ``"spacing"`` attribute, else dataset.json's ``"spacing"``,
  else 1 (prepare warns when a file does not say);
* ``median_volume_zyx``: the median training volume per axis (voxels); ``max_tile_zyx``: the
  smallest per axis over training and validation volumes (the largest tile every volume holds);
* objects in 3-D (instance ids, else 26-connected components of the foreground):
  ``median_object_zyx`` their median bounding-box extent per axis and
  ``median_object_volume_vx`` their median voxel count, each object weighted as in 2-D by how
  likely an object of its extent is to be cut by the volume's faces (minus-sampling).

The 2-D fields keep their meaning in-plane or per voxel: ``median_image_hw`` the median (Y, X),
``train_pixels`` voxels, ``sampled_tiles`` the volumes read, ``median_object_diameter_px`` the
mean of the median y and x extents, ``median_object_area_px`` the ellipse of those extents.
Volumes are read whole up to ``MAX_VOXELS_READ`` (a centred crop beyond it), at most
``sample_tiles`` of them, chosen by ``seed``; the intensities are measured as in 2-D.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from unetdist.config import DataConfig
from unetdist.data.fingerprint import (
    DEFAULT_SAMPLE_TILES,
    SOURCE_KEYS,
    Fingerprint,
    FingerprintError,
    _Measure,
    _round,
    _weighted_median,
    stored_mask_kind,
)
from unetdist.data.layout import STORE_NAME
from unetdist.data.remote import display, join, zarr_store
from unetdist.data.samples import Sample
from unetdist.data.sources.tar import dataset_meta

__all__ = ["VolumeFingerprint", "fingerprint_volumes", "is_volume_data", "load_fingerprint"]

# A volume larger than this is measured on a centred crop of it (2**24: 256 x 256 x 256 voxels):
# its arrays are held in memory in float64 while it is measured.
MAX_VOXELS_READ = 2**24


@dataclass(frozen=True, kw_only=True)
class VolumeFingerprint(Fingerprint):
    """A :class:`~unetdist.data.fingerprint.Fingerprint` of volumes (see the module docstring)."""

    spatial_dims: int = 3  # what load_fingerprint tells a 3-D fingerprint's JSON by
    spacing: tuple[float, float, float]  # median voxel size (z, y, x), the files' unit
    median_volume_zyx: tuple[int, int, int]
    max_tile_zyx: tuple[int, int, int]  # smallest volume per axis: training and validation
    median_object_zyx: tuple[float, float, float] | None  # median extent per axis, voxels
    median_object_volume_vx: float | None

    def summary(self) -> dict[str, Any]:
        flat = super().summary()
        flat.update(spatial_dims=3, spacing_zyx="x".join(f"{size:g}" for size in self.spacing),
                    median_volume_zyx="x".join(str(size) for size in self.median_volume_zyx))  # fmt: skip
        return flat

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> VolumeFingerprint:
        """The fingerprint :meth:`to_dict` wrote (JSON lists back to tuples)."""
        fp = super().from_dict(raw)
        objects = fp.median_object_zyx
        return dataclasses.replace(
            fp, spacing=tuple(fp.spacing), median_volume_zyx=tuple(fp.median_volume_zyx),
            max_tile_zyx=tuple(fp.max_tile_zyx), median_object_zyx=None if objects is None else tuple(objects),
        )  # fmt: skip


def load_fingerprint(raw: dict[str, Any]) -> Fingerprint:
    """A fingerprint's JSON, 2-D or 3-D (``"spatial_dims": 3``), as the object that wrote it."""
    return (VolumeFingerprint if raw.get("spatial_dims") == 3 else Fingerprint).from_dict(raw)


def _store(data: DataConfig) -> str:
    """Where the data's Zarr store is, as the loader finds it (data.zarr_store, or ROOT/data.zarr)."""
    return data.zarr_store or (join(data.root, STORE_NAME) if data.root else "")


def is_volume_data(data: DataConfig) -> bool:
    """Whether ``data`` names a whole-volume store: dataset.json or the training group says
    ``"spatial_dims": 3``. Anything unreadable is left to the 2-D path to report."""
    if data.format != "zarr" or not _store(data):
        return False
    if data.root:
        try:
            if dataset_meta(data.root).get("spatial_dims") == 3:
                return True
        except ValueError:
            pass
    try:
        import zarr

        group = zarr.open_group(zarr_store(_store(data)), mode="r", path="train")
        return dict(group.attrs).get("spatial_dims") == 3
    except Exception:  # noqa: BLE001 - not a readable store: not volumes (the 2-D path names the problem)
        return False


def _split_volumes(root, split: str, where: str, channels: int) -> tuple[list[tuple[int, ...]], list]:
    """([C, Z, Y, X] shapes, per-volume spacings or None) of a split; ([], None) without the split."""
    if split not in root:
        return [], None
    attrs = dict(root[split].attrs)
    shapes = [tuple(int(v) for v in shape) for shape in attrs.get("shapes", [])]
    stems = list(attrs.get("images", []))
    for stem, shape in zip(stems, shapes, strict=False):
        if len(shape) != 4 or shape[0] != channels:
            raise FingerprintError(f"{where}/{split}: volume {stem}: shape {list(shape)}, expected "
                                   f"[{channels}, Z, Y, X] (model.in_channels={channels})")  # fmt: skip
    return shapes, attrs.get("spacing")


def _crop(shape: tuple[int, ...]) -> tuple[slice, ...]:
    """A centred window of ``shape`` of at most MAX_VOXELS_READ voxels (the longest axis halved first)."""
    window = list(shape)
    while math.prod(window) > MAX_VOXELS_READ:
        longest = int(np.argmax(window))
        window[longest] = (window[longest] + 1) // 2
    return tuple(slice((n - w) // 2, (n - w) // 2 + w) for n, w in zip(shape, window, strict=True))


def fingerprint_volumes(
    data: DataConfig, in_channels: int, *, sample_tiles: int = DEFAULT_SAMPLE_TILES, seed: int = 0
) -> VolumeFingerprint:
    """The fingerprint of the training volumes of the whole-volume Zarr store ``data`` names."""
    import zarr

    store = _store(data)
    if data.format != "zarr" or not store:
        raise FingerprintError("volumes are read from a whole-volume Zarr store: data.format=zarr with "
                               f"data.root or data.zarr_store (got format {data.format!r})")  # fmt: skip
    try:
        meta = dataset_meta(data.root) if data.root else None
        root = zarr.open_group(zarr_store(store), mode="r")
    except (ValueError, OSError) as err:
        raise FingerprintError(str(err)) from None
    where = display(store)
    shapes, spacings = _split_volumes(root, "train", where, in_channels)
    val_shapes, _ = _split_volumes(root, "val", where, in_channels)
    if not shapes:
        raise FingerprintError(f"{where}: the training split holds no volumes")
    if not spacings or len(spacings) != len(shapes):  # before per-volume spacings: dataset.json's median
        spacings = [(meta or {}).get("spacing") or [1.0, 1.0, 1.0]] * len(shapes)
    spacing = tuple(_round(v) for v in np.median(np.asarray(spacings, dtype=np.float64), axis=0))
    if len(spacing) != 3 or not all(size > 0 for size in spacing):
        raise FingerprintError(f"{where}/train: spacing {list(spacing)}: expected three positive sizes z, y, x")
    sizes = np.asarray([shape[1:] for shape in shapes], dtype=np.int64)
    every = np.asarray([shape[1:] for shape in shapes + val_shapes], dtype=np.int64)
    mask_kind = stored_mask_kind(meta, data.mask_kind)
    chosen = np.sort(np.random.default_rng(seed).choice(len(shapes), size=min(sample_tiles, len(shapes)),
                                                        replace=False))  # fmt: skip
    measured = _VolumeMeasure(in_channels, mask_kind, seed)
    dtype = None
    for number, index in enumerate(chosen.tolist()):
        window = _crop(shapes[index][1:])
        image = np.asarray(root[f"train/images/{index}"][(slice(None), *window)])
        mask = np.asarray(root[f"train/masks/{index}"][window])
        dtype = dtype or str(image.dtype)
        measured.add(number, Sample(f"volume {index}", where, image, mask, None))
    num_classes = 2 if mask_kind in ("instances", "binary") else max(measured.labels_seen, 2)
    if meta is not None and mask_kind == "classes":
        num_classes = max(num_classes, int(meta.get("num_classes", 0)))
    median = tuple(int(v) for v in np.median(sizes, axis=0))
    return VolumeFingerprint(
        data={key: getattr(data, key) for key in SOURCE_KEYS if key in ("format", "root")
              or getattr(data, key) != getattr(DataConfig(), key)},  # fmt: skip
        dataset=display(data.root) if data.root else where,
        mask_kind=mask_kind,
        objects_from="instance ids" if mask_kind == "instances" else "connected components of the foreground",
        channels=in_channels,
        image_dtype=dtype,
        num_classes=num_classes,
        num_train_images=len(shapes),
        num_train_samples=len(shapes),
        median_image_hw=median[1:],
        smallest_image_edge_px=int(sizes[:, 1:].min()),
        image_sizes_from="whole volumes",
        max_tile_px=int(every[:, 1:].min()),
        train_pixels=int(sizes.prod(axis=1).sum()),
        sampled_tiles=len(chosen),
        seed=seed,
        spacing=spacing,
        median_volume_zyx=median,
        max_tile_zyx=tuple(int(v) for v in every.min(axis=0)),
        **measured.result(),
    )


class _VolumeMeasure(_Measure):
    """The 2-D running sums (intensities, labels) with objects measured in 3-D."""

    def __init__(self, channels: int, mask_kind: str, seed: int) -> None:
        super().__init__(channels, mask_kind, seed)
        self.extents: list[np.ndarray] = []  # [n, 3] (z, y, x) of the objects whole inside their volume
        self.cut_extents: list[np.ndarray] = []

    def _objects(self, labels: np.ndarray) -> None:
        if self.mask_kind == "instances":
            values, inverse = np.unique(labels, return_inverse=True)  # dense ids: bincount stays small
            objects = inverse.reshape(labels.shape) + (0 if values[0] == 0 else 1)
        else:
            objects, _ = ndimage.label(labels > 0, structure=np.ones((3, 3, 3), dtype=bool))
        voxels = np.bincount(objects.ravel())
        present = np.flatnonzero(voxels)
        present = present[present > 0]
        faces = [objects[0], objects[-1], objects[:, 0], objects[:, -1], objects[:, :, 0], objects[:, :, -1]]
        edge = np.unique(np.concatenate([face.ravel() for face in faces]))
        whole, cut = np.setdiff1d(present, edge), np.intersect1d(present, edge)
        boxes = ndimage.find_objects(objects)  # boxes[i - 1]: object i's (z, y, x) slices

        def extents(ids: np.ndarray) -> np.ndarray:
            found = [[box.stop - box.start for box in boxes[i - 1]] for i in ids]
            return np.array(found, dtype=np.float64).reshape(-1, 3)

        # minus-sampling, as in 2-D: an object of extent e lies whole in the volume with probability
        # prod(S - e) / prod(S) (for a random place), so each whole one stands for the inverse
        inside = np.maximum(np.prod(np.asarray(labels.shape) - extents(whole), axis=1), 1.0)
        self.weights.append(math.prod(labels.shape) / inside)
        self.areas.append(voxels[whole])  # the 2-D sums' "areas": voxel counts here
        self.cut_areas.append(voxels[cut])
        self.extents.append(extents(whole))
        self.cut_extents.append(extents(cut))
        if self.mask_kind == "instances":
            self.touching.append(np.isin(whole, _touching_ids(objects)))

    def result(self) -> dict[str, Any]:
        out = super().result()
        extents, weights = np.concatenate(self.extents), np.concatenate(self.weights)
        if not len(extents):  # every object cut by a face: their visible parts, a lower bound (as 2-D)
            extents = np.concatenate(self.cut_extents)
            weights = np.ones(len(extents))
        volume = out.pop("median_object_area_px")  # the 2-D median "area": of voxel counts here
        zyx = None
        if len(extents):
            zyx = tuple(_round(_weighted_median(extents[:, axis], weights)) for axis in range(3))
        out.update(
            median_object_zyx=zyx,
            median_object_volume_vx=volume,
            median_object_diameter_px=None if zyx is None else _round((zyx[1] + zyx[2]) / 2),
            median_object_area_px=None if zyx is None else _round(math.pi / 4 * zyx[1] * zyx[2]),
        )
        return out


def _touching_ids(objects: np.ndarray) -> np.ndarray:
    """Ids of objects with a voxel 26-adjacent to a voxel of another object."""
    found = [np.zeros(0, dtype=objects.dtype)]
    for offset in itertools.product((-1, 0, 1), repeat=3):
        if offset <= (0, 0, 0):  # each neighbouring pair once: the 13 offsets after (0, 0, 0)
            continue
        first = objects[tuple(slice(max(0, -d), n - max(0, d)) for d, n in zip(offset, objects.shape, strict=True))]
        second = objects[tuple(slice(max(0, d), n - max(0, -d)) for d, n in zip(offset, objects.shape, strict=True))]
        touch = (first > 0) & (second > 0) & (first != second)
        found += [first[touch], second[touch]]
    return np.unique(np.concatenate(found))
