"""What a run trained on: each split's data described for the record (MLflow's dataset inputs).

A pure description of an opened :class:`~unetdist.data.sources.base.Source` and the data
config that opened it; ``unetdist.tracking`` turns it into MLflow's dataset inputs (the
run page's Datasets row)::

    sources = split_sources(train_loader, val_loader)          # {"train": Source, "val": Source}
    lineage = [describe_split(config.data, split, source) for split, source in sources.items()]

Where data lives is written as ``redact`` shows it, and a URL without its query (a
presigned URL's signature changes with every job); a local path is made absolute. A unit's
name (``Source.names``: a path, or a message such as ``ome-zarr URL (z=3)``) enters the
digest with each URL in it so treated.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from unetdist.config import DataConfig
from unetdist.data import remote
from unetdist.data.layout import STORE_NAME
from unetdist.data.sources import mask_kind_of
from unetdist.data.sources.base import Source
from unetdist.redaction import redact

CONTEXTS = {"train": "training", "val": "validation"}  # MLflow's input tag mlflow.data.context
DIGEST_HEX_CHARS = 16  # MLflow keeps at most 36
_URL = re.compile(r"""[A-Za-z][A-Za-z0-9+.\-]*://[^\s'"<>]+""")
_GLOB = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class SplitLineage:
    """One split as the run's record shows it; ``digest`` names exactly what was read."""

    name: str  # "<root or store basename>-<split>"
    split: str
    context: str  # "training" | "validation"
    source: str  # the shards' folder, the Zarr store, the images' folder; credentials redacted, no query
    format: str  # webdataset | zarr | ome-zarr
    digest: str
    samples: int
    units: int
    unit_name: str  # "shard", "array", "image"
    keys: dict[str, Any] = field(default_factory=dict)  # config key -> the value used to read

    def profile(self) -> dict[str, Any]:
        """Counts, format and keys, flat: what the MLflow UI lists as ``key: value``."""
        return {
            "format": self.format,
            "samples": self.samples,
            "units": self.units,
            "unit": self.unit_name,
            **self.keys,
        }


def describe_split(data: DataConfig, split: str, source: Source) -> SplitLineage:
    """The record of ``split`` ("train" or "val"), read from the opened ``source`` and ``data``."""
    if split not in CONTEXTS:
        raise ValueError(f"split must be one of {sorted(CONTEXTS)}, got {split!r}")
    names = [_URL.sub(lambda url: location(url[0]), name) for name in source.names]
    counts = [int(count) for count in source.counts]
    keys = read_keys(data, split)
    where = split_location(data, keys, names)
    home = data.root or (data.zarr_store if data.format == "zarr" else "")  # the data set's own folder
    return SplitLineage(
        name=f"{_basename(location(home) if home else where)}-{split}",
        split=split,
        context=CONTEXTS[split],
        source=where,
        format=data.format,
        digest=sample_list_digest(data.format, source.unit_name, names, counts, keys),
        samples=sum(counts),
        units=len(counts),
        unit_name=source.unit_name,
        keys=keys,
    )


def sample_list_digest(
    data_format: str, unit_name: str, names: list[str], counts: list[int], keys: dict[str, Any]
) -> str:
    """Short sha256 hex over the units (location and sample count, in order) and how they are read.

    The same for the same data read the same way; another unit, a changed count or other
    keys give another digest. MLflow keeps one dataset per (name, digest) in an experiment
    and shows that one's source and profile, so everything shown is in the digest.
    """
    if len(names) != len(counts):
        raise ValueError(f"{len(names)} unit names for {len(counts)} sample counts")
    described = {
        "format": data_format,
        "unit": unit_name,
        "units": [[name, int(count)] for name, count in zip(names, counts, strict=True)],
        "keys": keys,
    }
    text = json.dumps(described, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_HEX_CHARS]


def read_keys(data: DataConfig, split: str) -> dict[str, Any]:
    """The config keys that say which fields, arrays or images a split is read from."""
    keys: dict[str, Any] = {}
    if data.format == "webdataset":
        # which shards (data.train_shards or the root's) is in the units' names
        keys = {key: getattr(data, key) for key in ("image_key", "mask_key", "weight_key")}
    elif data.format == "zarr":
        store = data.zarr_store or (remote.join(data.root, STORE_NAME) if data.root else "")
        keys["zarr_store"] = location(store)
        keys.update({key: getattr(data, key) for key in ("image_array", "mask_array", "weight_array")})
    elif data.format == "ome-zarr":
        images = data.val_images if split == "val" and data.val_images else data.images
        keys = {"images": [location(image) for image in images], "labels": data.labels}
        keys.update({"level": data.level, "channels": list(data.channels)})
    own_arrays = data.format == "ome-zarr" or (data.format == "zarr" and data.image_array)
    if own_arrays and not data.val_images:
        keys["val_fraction"] = data.val_fraction  # validation is held out of the same images
    keys["mask_kind"] = mask_kind_of(data)[0]  # as read: "auto" resolved
    return {f"data.{key}": value for key, value in keys.items() if value not in ("", [])}


def split_location(data: DataConfig, keys: dict[str, Any], names: list[str]) -> str:
    """Where a split lives: its shards' folder, its Zarr store, its OME-Zarr images (their folder)."""
    if data.format == "zarr":
        return keys["data.zarr_store"]
    if data.format == "ome-zarr":  # the configured images: a unit's name is a message about a plane
        return common_location([_before_glob(image) for image in keys.get("data.images", [])] or names)
    return common_location(sorted({_folder(location(name)) for name in names}))


def location(path_or_url: str) -> str:
    """Where data lives as it may be logged: a URL redacted and without query or fragment; a
    local path (or ``file://`` URL) absolute."""
    text = str(path_or_url)
    if "://" not in text:
        return os.path.abspath(text) if text else text
    parts = urlsplit(redact(text))
    if parts.scheme == "file":
        return os.path.abspath(parts.path)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def common_location(locations: list[str]) -> str:
    """The folder all ``locations`` are in (the one location when there is one)."""
    if len(locations) == 1:
        return locations[0]
    prefix = os.path.commonprefix(locations)
    folder = prefix[: prefix.rfind("/")] if "/" in prefix else ""
    if not folder or folder.endswith(":/"):  # nothing shared beyond a scheme: name them
        return ", ".join(locations[:3]) + (f" and {len(locations) - 3} more" if len(locations) > 3 else "")
    return folder


def split_sources(train_loader: Any, val_loader: Any | None) -> dict[str, Source]:
    """The sources ``build_train_loader`` and ``build_val_loader`` opened, by split (val when present)."""
    sources = {"train": train_loader.source}
    if val_loader is not None:
        sources["val"] = val_loader.source
    return sources


def _folder(where: str) -> str:
    """The folder of a file's location; a URL keeps at least its bucket or host."""
    scheme, _, path = where.rpartition("://")
    if "/" not in path:
        return where
    folder = path.rsplit("/", 1)[0] or "/"
    return f"{scheme}://{folder}" if scheme else folder


def _before_glob(pattern: str) -> str:
    """The folder of a glob pattern's first wildcard ("/plates/*.zarr" -> "/plates"); a path as it is."""
    wildcard = _GLOB.search(pattern)
    return _folder(pattern[: wildcard.start()] + "x") if wildcard else pattern


def _basename(where: str) -> str:
    parts = urlsplit(where) if "://" in where else None
    path = parts.path if parts else where
    return path.rstrip("/").rsplit("/", 1)[-1] or (parts.hostname if parts else "") or "data"
