"""Where prepare's image/mask pairs come from: folders, the user's own shards, OME-Zarr (NGFF) images.

A source lists its images first (:meth:`PairSource.items`: each image's stem and the group it is
split with), then reads the pairs of one split (:meth:`PairSource.read`);
:func:`unetdist.data.prepare.prepare_pairs` splits, checks, tiles and writes them:

- :class:`FolderPairs` (``--images``, ``--masks``): TIFF/PNG files matched by stem; an
  OME-TIFF (``x.ome.tif``, stem ``x``) is read by its axes, one image per T/Z plane.
- :class:`ShardPairs` (``--from-shards``): WebDataset shards in the user's naming, each sample one
  image; ``--image-key``/``--mask-key`` name its members as ``data.image_key``/``data.mask_key`` do.
- :class:`NgffPairs` (``--from-ome-zarr``, ``--labels``): OME-Zarr images and a label image of
  each, one image per t/z plane.
- volumes (``--spatial-dims 3``): :class:`unetdist.data.volumes.VolumePairs`, one volume per file.

Planes of one stack or one NGFF image are near copies of their neighbours, so they form a group
that stays in one split: no plane of a validation stack is trained on. Sources are context
managers: shards at URLs are downloaded once, into a temporary folder, and read from there.
Every problem is one :class:`~unetdist.data.imageio.PrepareError` line naming the file, shard
and sample key, or URL, and what was expected.
"""

from __future__ import annotations

import itertools
import math
import re
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from unetdist.data.imageio import (
    PrepareError,
    is_ome_tiff,
    match_by_stem,
    ome_plane_counts,
    read_array,
    read_ome_tiff,
    tiff_series,
)
from unetdist.data.remote import display, download_file, is_remote, local_path, zarr_store
from unetdist.data.samples import decode_field, member_names


@dataclass
class Pair:
    """One image and its label image as read, for prepare to check: ``image`` HxW, CxHxW or HxWxC
    (the mask's size decides), ``mask`` the labels; the ``where``s prefix messages about each."""

    stem: str
    image: np.ndarray
    mask: np.ndarray
    image_where: str
    mask_where: str
    mask_name: str  # the mask as the image's message names it
    image_axes: str | None = None  # TIFF axis letters if known ("" none); None: read from image_where
    spacing: tuple[float | None, ...] | None = None  # a volume's (z, y, x) from its metadata, where it says


class PairSource:
    """The base of prepare's inputs: list the images, then read a split's pairs."""

    def items(self) -> list[tuple[str, str]]:
        """(stem, group) of every image, in a stable order; called once, before :meth:`read`."""
        raise NotImplementedError

    def read(self, stems: Sequence[str]) -> Iterator[Pair]:
        """The pairs of ``stems`` (all listed by :meth:`items`), in the order the source reads best."""
        raise NotImplementedError

    def provenance(self) -> dict:
        """What dataset.json's "source" records of the input."""
        raise NotImplementedError

    def __enter__(self) -> PairSource:
        return self

    def __exit__(self, *exc) -> None:
        pass


# ---------------------------------------------------------------- folders (TIFF, PNG, OME-TIFF)


class FolderPairs(PairSource):
    """``images_dir`` and ``masks_dir`` files matched by stem. An OME-TIFF image of T x Z > 1
    planes gives one image per plane, ``x_t0_z3``; its mask holds one HxW plane per image plane
    (``x.ome.tif`` of axes ZYX, or a TIFF of [T*Z, H, W], planes in T, Z order)."""

    def __init__(self, images_dir: str | Path, masks_dir: str | Path) -> None:
        self.images_dir, self.masks_dir = Path(images_dir), Path(masks_dir)
        self._files: dict[str, tuple[Path, Path, tuple[int, int] | None]] = {}  # stem -> image, mask, plane
        self._stack: tuple[Path, np.ndarray, np.ndarray] | None = None  # the last stack read, by plane

    def items(self) -> list[tuple[str, str]]:
        items = []
        for stem, image, mask in match_by_stem(self.images_dir, self.masks_dir):
            counts = ome_plane_counts(*tiff_series(image), image) if is_ome_tiff(image) else (1, 1)
            if counts == (1, 1):
                self._files[stem] = (image, mask, None)
                items.append((stem, stem))
                continue
            for t, z in itertools.product(range(counts[0]), range(counts[1])):
                self._files[f"{stem}_t{t}_z{z}"] = (image, mask, (t, z))
                items.append((f"{stem}_t{t}_z{z}", stem))
        return items

    def read(self, stems: Sequence[str]) -> Iterator[Pair]:
        for stem in stems:  # prepare keeps a group's planes together: each stack is read once
            image_path, mask_path, plane = self._files[stem]
            if plane is None:
                if is_ome_tiff(image_path):
                    image, axes = read_ome_tiff(image_path)[0][0, 0], "CYX"
                else:
                    image, axes = read_array(image_path), None
                mask = _read_mask(mask_path)
                yield Pair(stem, image, mask, str(image_path), str(mask_path), mask_path.name, axes)
                continue
            images, masks = self._planes(image_path, mask_path)
            t, z = plane
            where = f" plane t={t} z={z}"
            yield Pair(stem, images[t, z], masks[t, z], f"{image_path}{where}", f"{mask_path}{where}",
                       mask_path.name, "CYX")  # fmt: skip

    def _planes(self, image_path: Path, mask_path: Path) -> tuple[np.ndarray, np.ndarray]:
        """([T, Z, C, H, W] image planes, [T, Z, H, W] mask planes) of an OME-TIFF stack and its mask."""
        if self._stack is None or self._stack[0] != image_path:
            images, axes = read_ome_tiff(image_path)
            t, z, _, height, width = images.shape
            if is_ome_tiff(mask_path):
                planes, mask_axes = read_ome_tiff(mask_path)
                found = f"axes {mask_axes}, shape {planes.shape} as TZCYX"
            else:
                planes = read_array(mask_path)
                found = f"shape {planes.shape}"
            if math.prod(planes.shape[:-2]) != t * z or planes.shape[-2:] != (height, width):
                raise PrepareError(
                    f"{mask_path}: {found}, for {image_path.name} of T={t} x Z={z} planes of "
                    f"{height}x{width} (axes {axes}); expected one HxW mask plane per image plane "
                    f"(e.g. ZYX [{z}, {height}, {width}]): each plane is prepared as its own 2-D image"
                )
            self._stack = (image_path, images, planes.reshape(t, z, height, width))
        return self._stack[1], self._stack[2]

    def provenance(self) -> dict:
        return {"images": str(self.images_dir.resolve()), "masks": str(self.masks_dir.resolve())}


def _read_mask(path: Path) -> np.ndarray:
    """A mask file; an OME-TIFF's singleton T, Z and C axes dropped (prepare checks what is left)."""
    if not is_ome_tiff(path):
        return read_array(path)
    planes = read_ome_tiff(path)[0]
    planes = planes.reshape(-1, *planes.shape[-2:])
    return planes[0] if len(planes) == 1 else planes


# ---------------------------------------------------------------- the user's WebDataset shards

# webdataset's rule: a member's sample key ends at the first dot of its file name
_MEMBER = re.compile(r"^((?:.*/)?[^./]+)\.([^/]+)$")


@dataclass(frozen=True)
class _ShardSample:
    shard: int  # index in the expanded pattern
    order: int  # position in the shard
    key: str
    image: str  # the member names after the key
    mask: str


class ShardPairs(PairSource):
    """Samples of the tar shards ``pattern`` (a brace pattern of paths or URLs), each one image:
    the members ``--image-key`` and ``--mask-key`` name (:func:`~unetdist.data.samples.member_names`).
    Read in order, shard by shard; the stem is the sample key ('/' -> '_')."""

    def __init__(self, pattern: str, image_key: str = "image", mask_key: str = "mask") -> None:
        self.pattern, self.image_key, self.mask_key = pattern, image_key, mask_key
        self._shards: list[tuple[str, Path]] = []  # (name for messages, local file)
        self._samples: dict[str, _ShardSample] = {}
        self._downloads: tempfile.TemporaryDirectory | None = None

    def items(self) -> list[tuple[str, str]]:
        import braceexpand

        for index, shard in enumerate(braceexpand.braceexpand(self.pattern)):
            self._shards.append((display(shard), self._local(index, shard)))
        for index, (name, path) in enumerate(self._shards):
            for order, (key, members) in enumerate(_shard_members(name, path).items()):
                self._add(_ShardSample(index, order, key, *self._names(name, key, members)))
        if not self._samples:
            shards = len(self._shards)
            raise PrepareError(f"--from-shards {display(self.pattern)}: no samples in {shards} shard(s)")
        return [(stem, stem) for stem in self._samples]

    def _local(self, index: int, shard: str) -> Path:
        if is_remote(shard):
            if self._downloads is None:
                self._downloads = tempfile.TemporaryDirectory(prefix="unetdist-shards-")
            path = Path(self._downloads.name) / f"{index:06d}.tar"
            download_file(shard, path)
            return path
        path = Path(local_path(shard))
        if not path.is_file():
            raise PrepareError(f"{shard}: no such shard (--from-shards {self.pattern})")
        return path

    def _names(self, name: str, key: str, members: set[str]) -> tuple[str, str]:
        """The image and mask member names of a sample."""
        keys = {"image": self.image_key, "mask": self.mask_key}
        found = {option: next((member for member in member_names(stem) if member in members), None)
                 for option, stem in keys.items()}  # fmt: skip
        missing = [f"--{option}-key {keys[option]} ({', '.join(member_names(keys[option]))})"
                   for option, member in found.items() if member is None]  # fmt: skip
        if missing:
            raise PrepareError(
                f"{name} sample {key}: no member for {' or '.join(missing)}; it has {sorted(members)}: set "
                "--image-key and --mask-key to the image's and the mask's names after the key "
                "(e.g. --image-key png --mask-key seg.png)"
            )
        return found["image"], found["mask"]

    def _add(self, sample: _ShardSample) -> None:
        stem = sample.key.replace("/", "_")
        other = self._samples.get(stem)
        if other is not None:
            raise PrepareError(
                f"{self._shards[sample.shard][0]} sample {sample.key}: the key {other.key!r} of a sample in "
                f"{self._shards[other.shard][0]} again; expected unique sample keys"
            )
        self._samples[stem] = sample

    def read(self, stems: Sequence[str]) -> Iterator[Pair]:
        wanted = sorted(stems, key=lambda stem: (self._samples[stem].shard, self._samples[stem].order))
        for shard, group in itertools.groupby(wanted, key=lambda stem: self._samples[stem].shard):
            name, path = self._shards[shard]
            with tarfile.open(path, "r:*") as tar:
                for stem in group:
                    yield self._pair(name, tar, stem)

    def _pair(self, name: str, tar: tarfile.TarFile, stem: str) -> Pair:
        sample = self._samples[stem]
        arrays, wheres = [], []
        for member in (sample.image, sample.mask):
            where = f"{name} sample {sample.key} member {member}"
            try:
                data = tar.extractfile(f"{sample.key}.{member}").read()
            except (OSError, tarfile.TarError) as err:  # a truncated shard
                raise PrepareError(f"{where}: cannot read: {err}") from err
            try:
                arrays.append(decode_field(member, data))
            except Exception as err:  # any decoder failure is bad data, named here
                raise PrepareError(f"{where}: cannot decode: {err}") from err
            wheres.append(where)
        return Pair(stem, arrays[0], arrays[1], wheres[0], wheres[1], sample.mask, "")

    def provenance(self) -> dict:
        return {"shards": display(self.pattern), "image_key": self.image_key, "mask_key": self.mask_key}

    def __exit__(self, *exc) -> None:
        if self._downloads is not None:
            self._downloads.cleanup()


def _shard_members(name: str, path: Path) -> dict[str, set[str]]:
    """{sample key: its member names after the key}, in the shard's order."""
    samples: dict[str, set[str]] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                match = _MEMBER.match(member.name)
                if member.isfile() and match:
                    samples.setdefault(match.group(1), set()).add(match.group(2))
    except tarfile.TarError as err:
        raise PrepareError(f"{name}: not a readable tar shard: {err}") from None
    return samples


# ---------------------------------------------------------------- OME-Zarr (NGFF) images


@dataclass(frozen=True)
class _NgffPlan:
    """How one NGFF image and its label image are read at the chosen level."""

    url: str
    label_url: str
    image_path: str  # the level's array in each group
    label_path: str
    image_index: tuple[str, ...]  # per axis: "t", "z", "c" or "yx" (y or x)
    label_index: tuple[str, ...]
    planes: tuple[int, int]  # (T, Z) at the level


class NgffPairs(PairSource):
    """NGFF images (:func:`~unetdist.data.ngff.read_image`) with their label image ``labels/<labels>``
    at ``level``; each t/z plane is one 2-D image (``NAME_t0_z3``), of the ``channels`` (indices;
    None: all). NAME: the path from the ``.zarr`` folder on, ``plate.ome.zarr/A/1/0`` -> ``plate_A_1_0``."""

    def __init__(
        self, urls: Sequence[str], labels: str | None, level: int = 0, channels: Sequence[int] | None = None
    ) -> None:
        self.urls, self.labels, self.level = list(urls), labels, level
        self.channels = None if channels is None else list(channels)
        self._planes: dict[str, tuple[_NgffPlan, int, int]] = {}
        self._arrays: dict[tuple[str, str], object] = {}  # opened once: at a URL, opening is a request

    def items(self) -> list[tuple[str, str]]:
        from unetdist.data.ngff import label_image, read_image

        items = []
        for url in self.urls:
            try:
                image = read_image(url)
                if not self.labels or (image.labels and self.labels not in image.labels):
                    given = f"no label image {self.labels!r}" if self.labels else "no --labels"
                    raise PrepareError(f"ome-zarr {display(url)}: {given}; its labels/ lists "
                                       f"{list(image.labels)}: set --labels NAME to one of them")  # fmt: skip
                plan = self._plan(image, label_image(image, self.labels))
            except PrepareError:
                raise
            except ValueError as err:  # ngff's one-line errors, each naming the URL
                raise PrepareError(str(err)) from None
            base = ngff_stem(url)
            for t, z in itertools.product(range(plan.planes[0]), range(plan.planes[1])):
                stem = f"{base}_t{t}_z{z}" if plan.planes != (1, 1) else base
                self._planes[stem] = (plan, t, z)
                items.append((stem, url))
        return items

    def _plan(self, image, label) -> _NgffPlan:
        where = f"ome-zarr {display(image.url)}"
        if not 0 <= self.level < len(image.levels):
            raise PrepareError(f"{where}: --level {self.level}; it has levels 0-{len(image.levels) - 1}")
        roles = _axis_roles(image, where)
        label_roles = _axis_roles(label, f"ome-zarr {display(label.url)}")
        # the label level of the image level's y/x scale (a label pyramid may have other levels)
        scale = _spatial(roles, image.scales[self.level])
        label_level = next((level for level, levels in enumerate(label.scales)
                            if np.allclose(_spatial(label_roles, levels), scale)), None)  # fmt: skip
        if label_level is None:
            raise PrepareError(
                f"{where}: labels/{self.labels} has no level of the y/x scale {scale} of level {self.level}; "
                f"its levels' y/x scales: {[_spatial(label_roles, levels) for levels in label.scales]}"
            )
        shape = self._array(image.url, image.levels[self.level]).shape
        label_shape = self._array(label.url, label.levels[label_level]).shape
        planes = _planes(roles, shape)
        label_planes = _planes(label_roles, label_shape)
        if _spatial(roles, shape) != _spatial(label_roles, label_shape) or planes != label_planes:
            raise PrepareError(
                f"{where}: level {self.level} {list(shape)} (axes {''.join(image.axes)}) against labels/"
                f"{self.labels} level {label_level} {list(label_shape)} (axes {''.join(label.axes)}); "
                "expected the same t, z, y and x sizes"
            )
        channels = shape[roles.index("c")] if "c" in roles else 1
        bad = [c for c in self.channels or () if not 0 <= c < channels]
        if bad:
            raise PrepareError(
                f"{where}: --channels {bad} out of range; it has {channels} channel(s), 0-{channels - 1}"
            )
        return _NgffPlan(image.url, label.url, image.levels[self.level], label.levels[label_level], roles,
                         label_roles, (planes.get("t", 1), planes.get("z", 1)))  # fmt: skip

    def read(self, stems: Sequence[str]) -> Iterator[Pair]:
        for stem in stems:
            plan, t, z = self._planes[stem]
            plane = f" plane t={t} z={z}" if plan.planes != (1, 1) else ""
            image = self._array(plan.url, plan.image_path)[_index(plan.image_index, t, z, slice(None))]
            if "c" in plan.image_index and self.channels is not None:
                image = image[self.channels]
            mask = self._array(plan.label_url, plan.label_path)[_index(plan.label_index, t, z, 0)]
            yield Pair(stem, image, mask, f"ome-zarr {display(plan.url)}{plane}",
                       f"ome-zarr {display(plan.label_url)}{plane}", f"labels/{self.labels}", "")  # fmt: skip

    def _array(self, url: str, path: str):
        if (url, path) not in self._arrays:
            import zarr

            self._arrays[url, path] = zarr.open_array(zarr_store(url), path=path, mode="r")
        return self._arrays[url, path]

    def provenance(self) -> dict:
        return {"ome_zarr": [display(url) for url in self.urls], "labels": self.labels, "level": self.level,
                "channels": self.channels}  # fmt: skip


def ngff_stem(url: str) -> str:
    """An NGFF image's stem: its path from the last ``.zarr`` folder on, suffix dropped, '/' -> '_'."""
    path = urlsplit(url).path if is_remote(url) else Path(local_path(url)).resolve().as_posix()
    parts = [part for part in path.split("/") if part]
    root = max((i for i, part in enumerate(parts) if part.lower().endswith(".zarr")), default=len(parts) - 1)
    parts = parts[root:]
    parts[0] = re.sub(r"(\.ome)?\.zarr$", "", parts[0], flags=re.IGNORECASE)
    return "_".join(parts)


_ROLES_BY_NAME = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}


def _axis_roles(image, where: str) -> tuple[str, ...]:
    """Per axis of ``image`` (an NgffImage): "t", "c", "z" or "yx" (the last two space axes)."""
    roles = []
    for axis, given in zip(image.axes, image.axis_types, strict=True):
        kind = given if given in ("time", "channel", "space") else _ROLES_BY_NAME.get(axis.lower())
        if kind is None:
            raise PrepareError(
                f"{where}: axis {axis!r} of type {given!r}; expected time, channel or space axes"
            )
        roles.append({"time": "t", "channel": "c", "space": "z"}[kind])
    roles[-2:] = ["yx", "yx"]  # NGFF puts the space axes last: y, x the last two
    return tuple(roles)


def _planes(roles: tuple[str, ...], shape: tuple[int, ...]) -> dict[str, int]:
    """{"t": T, "z": Z} of a shape, for the axes it has."""
    return {role: size for role, size in zip(roles, shape, strict=True) if role in ("t", "z")}


def _spatial(roles: tuple[str, ...], values) -> list:
    """The y and x entries of a per-axis sequence (a shape, a scale)."""
    return [value for role, value in zip(roles, values, strict=True) if role == "yx"]


def _index(roles: tuple[str, ...], t: int, z: int, channel: slice | int) -> tuple:
    """The index of plane (t, z): all of y and x, and ``channel`` of a channel axis."""
    return tuple({"t": t, "z": z, "c": channel, "yx": slice(None)}[role] for role in roles)

