"""A small, validated reader of OME-NGFF image metadata (OME-Zarr 0.4 on Zarr v2, 0.5 on Zarr v3).

    image = read_image("cells.ome.zarr")          # or s3://bucket/cells.ome.zarr
    image.axes, image.levels, image.scales, image.shape, image.labels
    labels = label_image(image, "nuclei")         # cells.ome.zarr/labels/nuclei, checked

Only what a reader of images and their label images needs is read and held to the spec: the
first multiscale's axes (names, types, units, their order), its datasets (paths, each one's
``scale`` transformation), level 0's shape and dtype, and the names in ``labels/``; 0.5 keeps
it under the group attribute "ome", 0.4 at the top level of ``.zattrs``. Every problem is one
:class:`ValueError` line naming the URL, what was found and what was expected.

Why not ome-zarr-models (pydantic models of the whole spec): it pins pydantic<2.13 (the
project runs a newer one), needs Python >= 3.11, and validates every level's array of every
image (a request each, remotely) where a training run needs two. ome-zarr-py (the tests' writer)
pulls in dask, scikit-image and s3fs. The stores are opened with zarr itself, through
:func:`unetdist.data.remote.zarr_store`, so local paths and object-store URLs read alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from unetdist.data.remote import display, join, zarr_store

VERSIONS = {2: "0.4", 3: "0.5"}  # Zarr format -> the NGFF version stored in it
AXIS_TYPES = ("time", "channel", "space")
EXPECTED = (
    "expected an OME-NGFF image: a Zarr group with multiscales metadata (0.5: Zarr v3, attribute "
    "ome.multiscales; 0.4: Zarr v2, .zattrs multiscales)"
)


@dataclass(frozen=True)
class NgffImage:
    url: str  # the image group path/URL as given
    version: str  # "0.4" or "0.5"
    axes: tuple[str, ...]  # axis names in array order, e.g. ("t", "c", "z", "y", "x")
    axis_types: tuple[str | None, ...]  # "time" | "channel" | "space" | None
    axis_units: tuple[str | None, ...]
    levels: tuple[str, ...]  # dataset paths, level 0 (finest) first
    scales: tuple[tuple[float, ...], ...]  # per level, the "scale" coordinateTransformation
    shape: tuple[int, ...]  # level 0's array shape
    dtype: str  # level 0's dtype
    labels: tuple[str, ...]  # names listed in labels/ (empty if none)
    name: str


def read_image(url: str) -> NgffImage:
    """The NGFF image group at ``url``; :class:`ValueError` naming the URL and what was expected."""
    return _read(url)[0]


def label_image(image: NgffImage, name: str) -> NgffImage:
    """The label image ``labels/<name>`` of ``image``, checked: listed in ``labels/``, image-label
    metadata, an integer dtype, and the image's spatial (and time) sizes at level 0."""
    url = join(image.url, "labels", name)
    where = f"ome-zarr {display(image.url)}"
    if not image.labels:
        has_group = _node(join(image.url, "labels")) is not None
        found = "a labels/ group that lists no label images" if has_group else "no labels/ group"
        raise ValueError(f"{where}: {found}; expected labels/{name}, a label image listed in labels/")
    if name not in image.labels:
        raise ValueError(f"{where}: labels/ lists {list(image.labels)}, not {name!r} (data.labels)")
    label, ome = _read(url, list_labels=False)
    where = f"ome-zarr {display(url)}"
    if not isinstance(ome.get("image-label"), dict):
        raise ValueError(f"{where}: no image-label metadata; expected a label image")
    if np.dtype(label.dtype).kind not in "iu":
        raise ValueError(f"{where}: dtype {label.dtype}; expected integer label ids")
    sizes = dict(zip(image.axes, image.shape, strict=True))
    kinds = dict(zip(image.axes, image.axis_types, strict=True))
    problems = []
    for axis, size in zip(label.axes, label.shape, strict=True):
        if axis not in sizes:
            problems.append(f"axis {axis!r} that the image lacks")
        elif kinds[axis] == "channel":
            problems += [f"{size} channels (at most one)"] * (size != 1)
        elif size != sizes[axis]:
            problems.append(f"{axis} size {size}, the image's {sizes[axis]}")
    problems += [f"no axis {a!r}" for a, kind in kinds.items() if kind != "channel" and a not in label.axes]
    if problems:
        raise ValueError(
            f"{where}: shape {list(label.shape)} (axes {''.join(label.axes)}) against the image's "
            f"{list(image.shape)} (axes {''.join(image.axes)}): {'; '.join(problems)}; expected the "
            "image's spatial and time sizes"
        )
    return label


# ---------------------------------------------------------------- reading and checking


def _node(url: str) -> Any:
    """The Zarr group or array at ``url`` (v3 or v2), or None where there is neither."""
    import zarr

    store = zarr_store(url)
    for zarr_format in (3, 2):  # one format at a time: zarr's own guess asks for both formats' files
        try:
            return zarr.open(store, mode="r", zarr_format=zarr_format)
        except (FileNotFoundError, KeyError):
            continue
    return None


def _read(url: str, list_labels: bool = True) -> tuple[NgffImage, dict]:
    """(the image, its NGFF attributes: 0.5's "ome" object, 0.4's .zattrs)."""
    import zarr

    where = f"ome-zarr {display(url)}"
    try:
        node = _node(url)
    except Exception as err:  # noqa: BLE001 - zarr's and obstore's own errors: a broken zarr.json, a 403
        first_line = str(err).splitlines()[0][:200] if str(err) else ""
        raise ValueError(f"{where}: cannot open: {type(err).__name__}: {first_line}") from None
    if node is None:
        raise ValueError(f"{where}: not found (no zarr.json, .zgroup or .zarray there); {EXPECTED}")
    if isinstance(node, zarr.Array):
        found = f"a plain Zarr array {list(node.shape)} {node.dtype}, not a group"
        raise ValueError(f"{where}: {found}; {EXPECTED}")
    zarr_format = node.metadata.zarr_format
    ome, version = _ngff_attributes(where, zarr_format, dict(node.attrs))
    if version != VERSIONS.get(zarr_format):
        raise ValueError(
            f"{where}: NGFF version {version!r} in a Zarr v{zarr_format} group; expected 0.5 (Zarr v3) or "
            "0.4 (Zarr v2)"
        )
    multiscales = ome["multiscales"]
    if not isinstance(multiscales, list) or not multiscales or not isinstance(multiscales[0], dict):
        raise ValueError(f"{where}: multiscales {multiscales!r:.80}; expected a list of multiscale objects")
    multiscale = multiscales[0]  # the spec's default when there are several
    names, types, units = _axes(where, multiscale.get("axes"))
    levels, scales = _levels(where, multiscale.get("datasets"), len(names))
    try:
        level0 = node[levels[0]]
    except KeyError:
        raise ValueError(f"{where}: no array {levels[0]!r} (level 0 in datasets)") from None
    if not isinstance(level0, zarr.Array) or level0.ndim != len(names):
        found = f"{level0.ndim} dimensions" if isinstance(level0, zarr.Array) else "a group"
        raise ValueError(f"{where}: {levels[0]!r} (level 0) is {found}; expected an array of {len(names)}")
    image = NgffImage(
        url=url,
        version=str(version),
        axes=names,
        axis_types=types,
        axis_units=units,
        levels=levels,
        scales=scales,
        shape=tuple(int(v) for v in level0.shape),
        dtype=str(level0.dtype),
        labels=_label_names(node, str(version)) if list_labels else (),
        name=str(multiscale.get("name") or url.split("?")[0].rstrip("/").rsplit("/", 1)[-1]),
    )
    return image, ome


def _ngff_attributes(where: str, zarr_format: int, attributes: dict) -> tuple[dict, object]:
    """(the NGFF attributes of a group, their version); what was found instead, as an error."""
    if zarr_format == 3:
        ome = attributes.get("ome")
        if isinstance(ome, dict) and "multiscales" in ome:
            return ome, ome.get("version")
        if "multiscales" in attributes:
            found = "a Zarr v3 group with 0.4-style top-level multiscales (0.4 is Zarr v2 only)"
        elif isinstance(ome, dict):
            found = f"a Zarr v3 group whose ome attribute holds {sorted(ome)} but no multiscales"
        else:
            found = f"a Zarr v3 group with attributes {sorted(attributes)}" if attributes else (
                "a Zarr v3 group without attributes"
            )
        raise ValueError(f"{where}: {found}; {EXPECTED}")
    if "multiscales" not in attributes:
        found = f"a Zarr v2 group whose .zattrs hold {sorted(attributes)}" if attributes else (
            "a Zarr v2 group without .zattrs"
        )
        raise ValueError(f"{where}: {found}, no multiscales; {EXPECTED}")
    multiscales = attributes["multiscales"]
    first = multiscales[0] if isinstance(multiscales, list) and multiscales else {}
    return attributes, first.get("version", "0.4") if isinstance(first, dict) else None


def _axes(where: str, axes: Any) -> tuple[tuple[str, ...], tuple[str | None, ...], tuple[str | None, ...]]:
    """(names, types, units), held to the spec: 2-5 unique axes, 2-3 of type space last, then at most
    one time axis first and one channel (or custom) axis between."""
    if not isinstance(axes, list) or not all(isinstance(axis, dict) and isinstance(axis.get("name"), str)
                                             for axis in axes):
        raise ValueError(f"{where}: axes {axes!r:.120}; expected a list of {{name, type, unit}} objects")
    names = tuple(a["name"] for a in axes)
    types = tuple(a.get("type") for a in axes)
    order = [{"time": 0, "space": 2}.get(kind, 1) for kind in types]  # a custom type stands with channel
    problems = []
    if not 2 <= len(names) <= 5 or len(set(names)) != len(names):
        problems.append("2 to 5 axes with unique names")
    if not 2 <= types.count("space") <= 3 or types.count("time") > 1 or types.count("channel") > 1:
        problems.append("2 or 3 space axes, at most one time and one channel axis")
    if order != sorted(order):
        problems.append("time first, then channel, then space")
    if problems:
        found = ", ".join(f"{name}:{kind}" for name, kind in zip(names, types, strict=True))
        raise ValueError(f"{where}: axes [{found}]; expected {'; '.join(problems)}")
    return names, types, tuple(a.get("unit") for a in axes)


def _levels(where: str, datasets: Any, ndim: int) -> tuple[tuple[str, ...], tuple[tuple[float, ...], ...]]:
    """(each level's path, its scale): datasets with a path and a scale transformation first."""
    if not isinstance(datasets, list) or not datasets:
        raise ValueError(
            f"{where}: datasets {datasets!r:.80}; expected a list of {{path, coordinateTransformations}}"
        )
    levels, scales = [], []
    for index, dataset in enumerate(datasets):
        dataset = dataset if isinstance(dataset, dict) else {}
        path, transforms = dataset.get("path"), dataset.get("coordinateTransformations")
        first = transforms[0] if isinstance(transforms, list) and transforms else None
        scale = first.get("scale") if isinstance(first, dict) and first.get("type") == "scale" else None
        if not isinstance(path, str) or not path:
            raise ValueError(
                f"{where}: dataset {index} has no path; expected {{path, coordinateTransformations}}"
            )
        if not isinstance(scale, list) or len(scale) != ndim or not all(
            isinstance(value, (int, float)) and value > 0 for value in scale
        ):
            raise ValueError(
                f"{where}: dataset {path!r}: coordinateTransformations {transforms!r:.120}; expected a scale "
                f"of {ndim} positive numbers first"
            )
        levels.append(path)
        scales.append(tuple(float(value) for value in scale))
    return tuple(levels), tuple(scales)


def _label_names(group: Any, version: str) -> tuple[str, ...]:
    """The names listed in the image's ``labels/`` group (empty where there is none)."""
    try:
        labels = group["labels"]
    except KeyError:
        return ()
    attributes = dict(labels.attrs)
    listed = attributes.get("ome", {}).get("labels") if version == "0.5" else attributes.get("labels")
    return tuple(str(name) for name in listed) if isinstance(listed, list) else ()
