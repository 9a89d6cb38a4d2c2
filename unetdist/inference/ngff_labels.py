"""Predict OME-Zarr (OME-NGFF 0.4 and 0.5) images into NGFF label images.

    python -m unetdist.predict --model ckpt.pt --input cells.ome.zarr      # -> cells.ome.zarr/labels/unetdist
    python -m unetdist.predict --model ckpt.pt --input s3://bucket/cells.ome.zarr --label-name nuclei
    python -m unetdist.predict --model ckpt.pt --input cells.ome.zarr --overwrite --output pred/

The prediction itself is :func:`unetdist.inference.ngff_predict.predict_ngff`; this module says
what to write and where, writes it and publishes it.

Level 0 (or ``--level``) of the image (:func:`unetdist.data.ngff.read_image`) is read with its axes,
``[t][c][z]yx``: each t/z plane is predicted as a 2-D image, block by block over the ranks
(:func:`~unetdist.inference.zarr_io.predict_blocks`), c holding the model's input channels. The label
image has the input's NGFF version, its axes but c (units kept), one level per input level from the
one read with that level's shape and transformations (a single-level input: levels 2x smaller in y,
x down to ~256 px), each a nearest-neighbour sample of the one above; class ids (uint8, uint16 past
256 classes, with ``colors``) or ``--instances`` uint32 ids (numbered per plane). It is the image's
``labels/<name>`` (``image-label.source.image`` "../../", the name added to ``labels/``'s list), or
with ``--output`` a label image of its own, ``<output>/<stem>_<name>.zarr``.

Never half a label image, nor none: it is written whole under a temporary name beside its final one
(``.<name>.partial``), then published by rank 0. On a file system it is renamed into place; one
that was there (replaced only with ``--overwrite``) is first renamed aside, deleted once the new one
is in place. An object store has no rename: each object is copied server-side to its final key,
chunks first and the group's metadata last, then the old image's leftover objects and the temporary
copy are deleted. The old image is thus overwritten only once the new one is complete (a reader
during the copy may meet a mix; a run stopped in the copy leaves the new image whole at the
temporary name). The name joins the ``labels`` list last, so the list never names a partial image.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unetdist.data import ngff, remote
from unetdist.inference.engine import InputError
from unetdist.inference.zarr_io import OutputError, downsample
from unetdist.inference.zarr_sources import PlaneView, one_line

DEFAULT_LABEL_NAME = "unetdist"
PYRAMID_MIN_SIDE = 256  # a single-level input's label pyramid stops at the first level this small
METADATA_KEYS = ("zarr.json", ".zattrs", ".zgroup", ".zarray")
# Class colours for viewers (RGBA), class 1 first; class 0 is the background and gets none.
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180))


# ---------------------------------------------------------------- what to write, where


@dataclass(frozen=True)
class LabelTarget:
    """A label image at ``key`` under ``root`` (a path or URL), written first at ``partial_key``."""

    root: str
    key: str
    in_image: bool  # in the image's labels/ group: listed there, its source "../../"

    @property
    def location(self) -> str:
        return remote.join(self.root, self.key)

    @property
    def partial_key(self) -> str:
        parent, _, name = self.key.rpartition("/")
        return f"{parent}/.{name}.partial" if parent else f".{name}.partial"

    @property
    def partial_location(self) -> str:
        return remote.join(self.root, self.partial_key)

    def exists(self) -> bool:
        return any(remote.exists(remote.join(self.location, key)) for key in METADATA_KEYS[:3])


@dataclass(frozen=True)
class NgffJob:
    """One NGFF image to predict: read-only facts, the same on every rank."""

    image: ngff.NgffImage
    location: str  # the image group, as given
    level: int
    name: str  # the label image's
    target: LabelTarget
    label_axes: tuple[dict[str, str], ...]  # NGFF axis objects, without c
    label_shapes: tuple[tuple[int, ...], ...]  # per label level
    label_transforms: tuple[tuple[dict[str, Any], ...], ...]  # per label level
    multiscale_transforms: tuple[dict[str, Any], ...]  # the multiscale's own (usually none)

    @property
    def shown(self) -> str:
        return remote.display(self.location)

    def planes(self) -> list[tuple[int, ...]]:
        """The t/z positions of every 2-D plane, in order (one ``()`` for a yx image)."""
        return list(np.ndindex(*self.label_shapes[0][:-2]))

    def plane_source(self, array: Any, plane: tuple[int, ...]) -> PlaneView:
        plane_axes = [i for i, axis in enumerate(self.image.axes) if axis in ("t", "z")]
        channel_axis = self.image.axes.index("c") if "c" in self.image.axes else None
        return PlaneView(array, dict(zip(plane_axes, plane, strict=True)), channel_axis)


def prepare_ngff(
    location: str,
    stem: str,
    *,
    level: int = 0,
    name: str = DEFAULT_LABEL_NAME,
    output: str | None = None,
    overwrite: bool = False,
    in_channels: int | None = None,
) -> NgffJob:
    """Read and check the NGFF image at ``location``: an InputError, one line naming it, for one
    that cannot be predicted, or for a label image of that name that exists (without ``overwrite``)."""
    import zarr

    shown = remote.display(location)
    try:
        image = ngff.read_image(location)
    except ValueError as err:  # read_image names the URL and what it expected
        raise InputError(one_line(err)) from err
    axes = tuple(image.axes)
    if axes[-2:] != ("y", "x") or list(axes) != [axis for axis in "tczyx" if axis in axes]:  # NGFF's order
        raise InputError(
            f"{shown}: unsupported axes {''.join(axes)}: expected [t][c][z]yx (yx, cyx, czyx, tczyx, ...), "
            "each t/z plane predicted as a 2-D image"
        )
    if not 0 <= level < len(image.levels):
        raise InputError(
            f"{shown}: level {level} out of range: the image has {len(image.levels)} level(s), "
            f"0-{len(image.levels) - 1} ({', '.join(image.levels)})"
        )
    try:
        group = zarr.open_group(store=remote.zarr_store(location), mode="r")
        attributes = group.attrs.asdict()
        multiscale = (attributes if image.version == "0.4" else attributes["ome"])["multiscales"][0]
        shapes = [tuple(group[path].shape) for path in image.levels[level:]]
    except Exception as err:  # read_image has read it: a failure here is the store's
        raise InputError(f"{shown}: cannot read its levels: {one_line(err)}") from err
    channels = shapes[0][axes.index("c")] if "c" in axes else 1
    if in_channels is not None and channels != in_channels:
        raise InputError(
            f"{shown}: {channels} channel(s) (axes {''.join(axes)}, shape {shapes[0]}), the model expects "
            f"{in_channels}"
        )
    keep = [i for i, axis in enumerate(axes) if axis != "c"]
    label_shapes = [tuple(shape[i] for i in keep) for shape in shapes]
    label_transforms = [
        _without_c(dataset.get("coordinateTransformations", []), keep, shown)
        for dataset in multiscale["datasets"][level:]
    ]
    if len(label_shapes) == 1:
        label_shapes, label_transforms = _halved_levels(label_shapes[0], label_transforms[0])
    if output is None:
        target = LabelTarget(location, f"labels/{name}", in_image=True)
    else:
        target = LabelTarget(output, f"{stem}_{name}.zarr", in_image=False)
    if not overwrite and target.exists():
        raise InputError(
            f"{remote.display(target.location)}: a label image named {name!r} exists: pass --overwrite to "
            "replace it, or another --label-name"
        )
    described = [{"name": axes[i], "type": image.axis_types[i], "unit": image.axis_units[i]} for i in keep]
    label_axes = [{key: value for key, value in axis.items() if value is not None} for axis in described]
    return NgffJob(
        image=image,
        location=location,
        level=level,
        name=name,
        target=target,
        label_axes=tuple(label_axes),
        label_shapes=tuple(label_shapes),
        label_transforms=tuple(label_transforms),
        multiscale_transforms=_without_c(multiscale.get("coordinateTransformations", []), keep, shown),
    )


def _without_c(transforms: list[dict], keep: list[int], shown: str) -> tuple[dict[str, Any], ...]:
    """The coordinate transformations of the kept axes (without the c axis's entries)."""
    kept = []
    for transform in transforms:
        kind = transform.get("type")
        if kind == "identity":
            kept.append({"type": kind})
        elif kind in ("scale", "translation") and isinstance(transform.get(kind), list):
            kept.append({"type": kind, kind: [float(transform[kind][i]) for i in keep]})
        else:
            raise InputError(f"{shown}: coordinate transformation {transform}: expected scale or translation")
    return tuple(kept)


def _halved_levels(
    shape: tuple[int, ...], transforms: tuple[dict[str, Any], ...]
) -> tuple[list[tuple[int, ...]], list[tuple[dict[str, Any], ...]]]:
    """Levels 2x smaller in y, x while the longer side exceeds PYRAMID_MIN_SIDE; each level's scale
    grows by the size ratio, and its translation moves to the centre of the pixels it covers."""
    scale = next((t["scale"] for t in transforms if t["type"] == "scale"), [1.0] * len(shape))
    shift = next((t["translation"] for t in transforms if t["type"] == "translation"), [0.0] * len(shape))
    shapes, all_transforms = [shape], [transforms]
    while max(shapes[-1][-2:]) > PYRAMID_MIN_SIDE:
        shapes.append((*shape[:-2], max(1, shapes[-1][-2] // 2), max(1, shapes[-1][-1] // 2)))
        ratio = [1.0] * (len(shape) - 2) + [shape[-2] / shapes[-1][-2], shape[-1] / shapes[-1][-1]]
        pairs = list(zip(scale, ratio, shift, strict=True))
        all_transforms.append((
            {"type": "scale", "scale": [s * r for s, r, _ in pairs]},
            {"type": "translation", "translation": [t + (r - 1) * s / 2 for s, r, t in pairs]},
        ))  # fmt: skip
    return shapes, all_transforms


def label_attributes(job: NgffJob, colors: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The label group's attributes: ``multiscales`` and ``image-label``, in the input's version."""
    multiscale: dict[str, Any] = {
        "name": job.name,
        "axes": [dict(axis) for axis in job.label_axes],
        "datasets": [
            {"path": str(level), "coordinateTransformations": [dict(t) for t in transforms]}
            for level, transforms in enumerate(job.label_transforms)
        ],
    }
    if job.multiscale_transforms:
        multiscale["coordinateTransformations"] = [dict(t) for t in job.multiscale_transforms]
    image_label: dict[str, Any] = {"version": job.image.version}
    if colors:
        image_label["colors"] = colors
    if job.target.in_image:
        image_label["source"] = {"image": "../../"}
    if job.image.version == "0.4":
        return {"multiscales": [{**multiscale, "version": "0.4"}], "image-label": image_label}
    return {"ome": {"version": job.image.version, "multiscales": [multiscale], "image-label": image_label}}


# ---------------------------------------------------------------- writing


class LabelWriter:
    """A job's label image under its temporary name: made by rank 0 with the first plane, when the
    class count and block size are known."""

    def __init__(self, job: NgffJob, instances: bool) -> None:
        self.job, self.instances, self.created = job, instances, False

    def create(self, num_classes: int, block_size: int) -> None:
        import zarr

        job, where = self.job, self.job.target.partial_location
        dtype = np.uint32 if self.instances else (np.uint8 if num_classes <= 256 else np.uint16)
        colors = None if self.instances or num_classes > 256 else [
            {"label-value": value, "rgba": [*PALETTE[(value - 1) % len(PALETTE)], 255]}
            for value in range(1, num_classes)
        ]  # fmt: skip
        zarr_format = 2 if job.image.version == "0.4" else 3
        # NGFF 0.4 wants "/" in chunk keys (zarr v2's default is "."); 0.5 the axes as dimension names
        layout = (
            {"chunk_key_encoding": {"name": "v2", "separator": "/"}} if zarr_format == 2
            else {"dimension_names": [axis["name"] for axis in job.label_axes]}
        )  # fmt: skip
        try:
            group = zarr.open_group(
                store=remote.zarr_store(where, writable=True),
                mode="w",  # replaces a partial one left by a run that stopped
                zarr_format=zarr_format,
                attributes=label_attributes(job, colors),
            )
            for level, shape in enumerate(job.label_shapes):
                chunks = (*(1 for _ in shape[:-2]), min(block_size, shape[-2]), min(block_size, shape[-1]))
                group.create_array(
                    str(level), shape=shape, chunks=chunks, dtype=dtype, fill_value=0, **layout
                )
        except Exception as err:  # zarr's, obstore's and the file system's errors: a bad output
            raise OutputError(f"{remote.display(where)}: cannot create: {one_line(err)}") from err
        self.created = True

    def make_level(self, level: int, rank: int, world_size: int) -> None:
        """Pyramid level ``level`` from the one above (each rank its chunks)."""
        downsample(self.array(level - 1), self.array(level), rank, world_size)

    def array(self, level: int) -> Any:
        import zarr

        where = remote.join(self.job.target.partial_location, str(level))
        return zarr.open_array(store=remote.zarr_store(where, writable=True), mode="r+")


class PlaneOutputs:
    """The :class:`~unetdist.inference.zarr_io.BlockOutputs` of one plane of label level 0."""

    def __init__(self, writer: LabelWriter, plane: tuple[int, ...]) -> None:
        self.writer, self.plane = writer, plane

    def create(self, shape: tuple[int, ...], num_classes: int, block_shape: tuple[int, ...]) -> None:
        if not self.writer.created:
            self.writer.create(num_classes, block_shape[-1])

    def open(self) -> Callable[[tuple[int, int, int, int], np.ndarray], None]:
        labels = self.writer.array(0)

        def write(block: tuple[int, int, int, int], probabilities: np.ndarray) -> None:
            top, bottom, left, right = block
            values = probabilities.argmax(axis=0).astype(labels.dtype)
            labels[(*self.plane, slice(top, bottom), slice(left, right))] = values

        return write


# ---------------------------------------------------------------- publishing


def publish(target: LabelTarget) -> None:
    """Move the complete label image from its temporary name to its final one (see the module
    docstring). Rank 0 only."""
    if not remote.is_remote(target.root):
        final, partial = Path(target.location), Path(target.partial_location)
        aside = final.with_name(f".{final.name}.replaced")
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
            final.rename(aside)
        partial.rename(final)
        shutil.rmtree(aside, ignore_errors=True)
        return
    import obstore

    store = remote.zarr_store(target.root, writable=True).store  # obstore's, rooted at target.root
    written = _list_keys(store, target.partial_key)
    moved = {key: target.key + key[len(target.partial_key) :] for key in written}

    def order(key: str) -> int:  # chunks first, then the arrays' metadata, the group's own metadata last
        parent, _, name = key.rpartition("/")
        return (name in METADATA_KEYS) + (name in METADATA_KEYS and parent == target.partial_key)

    for key in sorted(written, key=order):
        obstore.copy(store, key, moved[key])  # server-side; replaces the old object of that key
    stale = [key for key in _list_keys(store, target.key) if key not in moved.values()]
    for keys in (stale, written):
        if keys:
            obstore.delete(store, keys)


def _list_keys(store: Any, prefix: str) -> list[str]:
    import obstore

    return sorted(item["path"] for batch in obstore.list(store, prefix=prefix + "/") for item in batch)


def add_to_labels_list(image_location: str, version: str, name: str) -> list[str]:
    """Add ``name`` to the image's ``labels/`` list (the group made if missing), keeping the names
    there; the list."""
    import zarr

    group = zarr.open_group(
        store=remote.zarr_store(image_location, writable=True),
        path="labels",
        mode="a",
        zarr_format=2 if version == "0.4" else 3,
    )
    attributes = group.attrs.asdict()
    # 0.5: ome.version too (ome-zarr-py leaves it out of labels/, which ome-zarr-models refuses)
    holder = dict(attributes) if version == "0.4" else {**attributes.get("ome", {}), "version": version}
    names = [str(label) for label in holder.get("labels", [])]
    holder["labels"] = names if name in names else [*names, name]
    group.attrs.put(holder if version == "0.4" else {**attributes, "ome": holder})
    return holder["labels"]
