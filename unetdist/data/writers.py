"""Writing a split in each on-disk format of :mod:`unetdist.data.layout`: tar shards, pre-tiled
Zarr, whole-image Zarr; and the per-split writers :func:`unetdist.data.prepare.prepare_dataset`
drives (:func:`open_split_writer`).

Writers sit together here, apart from the readers in :mod:`unetdist.data.sources`: the readers
are pickled into every DataLoader worker and import only what reading needs, while writing
pulls in webdataset's ShardWriter and zarr's array creation. What both sides must agree on
(names, keys, array layout) is in :mod:`unetdist.data.layout`.

Pre-tiled chunking: ``chunk_tiles`` whole tiles per chunk along N (default: ~1 MiB of image
per chunk), no sharding. Measured here (2 cores, 256x256 uint16, local disk, zarr 3.1): a
read of 8 consecutive tiles is ~6,400 tiles/s with 8-tile chunks vs ~2,000 with 1-tile
chunks (zarr's per-call overhead is ~0.7 ms), and the sharding codec costs 2-3x on reads;
larger chunks gain little more while every chunk is a block the sequence keeps together
(see :mod:`unetdist.data.sequence`), so ~1 MiB keeps the shuffle fine and reads cheap.

Codecs (``ZarrWriter(codec=...)``, ``prepare --zarr-codec``): ``none`` (the default),
``lz4`` (Blosc lz4, integers bit-shuffled) or ``zstd`` (level 1; the earlier default,
and such stores still read). A worker pays the decoding of every chunk it reads, and
that is what kept Zarr loading behind: with 2 workers on 2 cores a 16-tile batch costs
a worker ~9 ms in all (mostly the hand-over to the training process), of which zstd took
~4 ms (1.4 ms per 1 MiB image chunk, 0.7 per mask chunk). ``python -m unetdist.bench
data --workers 2``, loader vs in-memory ceiling, interleaved runs here (other load on
the cores moves single runs by +-0.1): zstd 0.55-0.72, lz4 0.57-0.79, none 0.79-0.98
(median 0.88 of 14), the (uncompressed) tar shards 0.83-0.98 (median 0.90 of 11).
Stored/raw size and single-core read speed (decoded MB/s, file read and copy into the
batch included) of 256x256 tiles::

                                            none          lz4             zstd
    bench: random 12-bit uint16             1.00  5 GB/s  0.75  0.9-1.8   0.86  0.75
           its masks (random 0/1)           1.00  5.5     0.13  1.0       0.19  0.73
    synthetic cells (prepare --synthetic)   1.00  7       0.98  1.2       0.93  0.71
    the same as 12-bit uint16, shot noise   1.00  7       0.72  1.7       0.80  0.76
           cell masks                       1.00  7.5     0.10  1.3       0.08  0.78
           border weights (float32)         1.00  6       0.43  2.0       0.26  1.1

Camera-like images hardly compress (their low bits are noise); masks and weights do, so
a 12-bit store with weights shrinks to 0.47 (lz4) or 0.39 (zstd) of its raw size, the
trade to make where disk space or a slow file system, not the CPU, limits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from unetdist.data.layout import (
    CODECS,
    DEFAULT_CODEC,
    FOREGROUND_CAP,
    FOREGROUND_SEED,
    MASK_DTYPES,
    SHARD_PATTERNS,
    STORE_NAME,
    WHOLE_IMAGES,
    foreground_points,
)
from unetdist.data.sources.tar_index import write_local_index

TARGET_CHUNK_BYTES = 1 << 20
MAX_CHUNK_TILES = 64
IMAGE_CHUNK = 256  # pixels per side of a whole image's 2-D chunks
VOLUME_CHUNK = 64  # voxels per side of a whole volume's 3-D chunks (256 kB of uint8 per channel)
# The mtime of every tar member: fixed, so the same tiles give the same shard bytes; a float like
# webdataset's default time.time(), so the layout stays as it was (a PAX header per member holds it).
SHARD_MTIME = 0.0


def compressors(codec: str, dtype: np.dtype) -> list:
    """The zarr compressors of ``codec`` (:data:`~unetdist.data.layout.CODECS`) for an array of ``dtype``."""
    from zarr.codecs import BloscCodec, BloscShuffle, ZstdCodec

    if codec == "none":
        return []
    if codec == "zstd":
        return [ZstdCodec(level=1)]
    if codec == "lz4":
        # bit-shuffling packs the unused high bits of 12-bit images and of class ids into
        # zero runs; it only costs on float weight maps (ratio 0.78 vs 0.43 unshuffled)
        shuffle = BloscShuffle.noshuffle if dtype.kind == "f" else BloscShuffle.bitshuffle
        return [BloscCodec(cname="lz4", clevel=5, shuffle=shuffle, typesize=dtype.itemsize)]
    raise ValueError(f"zarr codec {codec!r}: expected one of {', '.join(CODECS)}")


def mask_dtype(mask: np.ndarray) -> np.dtype:
    """The stored dtype of a mask: uint16 or uint32 instance ids as they are, anything else uint8
    (0/1 or class ids; :mod:`unetdist.data.layout`)."""
    dtype = np.dtype(mask.dtype)
    return dtype if dtype in MASK_DTYPES else np.dtype(np.uint8)


def chunk_tiles_for(channels: int, tile_size: int, itemsize: int) -> int:
    """Tiles per chunk: about ``TARGET_CHUNK_BYTES`` of image, between 1 and ``MAX_CHUNK_TILES``."""
    tile_bytes = channels * tile_size * tile_size * itemsize
    return int(min(MAX_CHUNK_TILES, max(1, round(TARGET_CHUNK_BYTES / tile_bytes))))


# ---------------------------------------------------------------- format writers


class ZarrWriter:
    """Appends tiles of one split to a pre-tiled store in whole chunks (chunk-aligned writes).

    ``codec`` (one of :data:`~unetdist.data.layout.CODECS`) compresses the image, mask and
    weight arrays; see the module docstring for what each costs in reading speed and saves on disk.
    """

    def __init__(self, store: Path, split: str, chunk_tiles: int = 0, codec: str = DEFAULT_CODEC) -> None:
        if codec not in CODECS:
            raise ValueError(f"zarr codec {codec!r}: expected one of {', '.join(CODECS)}")
        self.store, self.split, self.chunk_tiles, self.codec = store, split, chunk_tiles, codec
        self.group = None
        self.pending: list[dict] = []
        self.count = 0
        self.stems: list[str] = []

    def _create(self, sample: dict) -> None:
        import zarr
        from zarr.codecs import ZstdCodec

        image = sample["image"]
        channels, size = image.shape[0], image.shape[-1]
        if not self.chunk_tiles:
            self.chunk_tiles = chunk_tiles_for(channels, size, image.dtype.itemsize)
        root = zarr.open_group(str(self.store), mode="a")
        self.group = root.create_group(self.split, overwrite=True)
        n = self.chunk_tiles
        self.group.create_array(
            "image",
            shape=(0, channels, size, size),
            dtype=image.dtype,
            chunks=(n, channels, size, size),
            compressors=compressors(self.codec, image.dtype),
        )
        self._create_mask(mask_dtype(sample["mask"]), size)
        if sample.get("weight") is not None:
            self.group.create_array(
                "weight",
                shape=(0, size, size),
                dtype=np.float32,
                chunks=(n, size, size),
                compressors=compressors(self.codec, np.dtype(np.float32)),
            )
        # read once per 65,536 tiles and cached: its codec costs nothing per batch
        self.group.create_array(
            "origin", shape=(0, 3), dtype=np.int32, chunks=(1 << 16, 3), compressors=[ZstdCodec(level=1)]
        )

    def _create_mask(self, dtype: np.dtype, size: int, rows: np.ndarray | None = None) -> None:
        mask = self.group.create_array(
            "mask",
            shape=(0, size, size),
            dtype=dtype,
            chunks=(self.chunk_tiles, size, size),
            compressors=compressors(self.codec, dtype),
            overwrite=rows is not None,
        )
        if rows is not None and len(rows):
            mask.append(rows.astype(dtype))

    def _widen_mask(self, dtype: np.dtype) -> None:
        """Rewrite the mask array as ``dtype`` (instance ids past uint16 in a later image: rare)."""
        mask = self.group["mask"]
        self._create_mask(dtype, mask.shape[-1], mask[...])

    def write(self, stem: str, top: int, left: int, image: np.ndarray, mask: np.ndarray, weight) -> None:
        if not self.stems or self.stems[-1] != stem:
            self.stems.append(stem)
        sample = {"image": image, "mask": mask, "weight": weight, "origin": (len(self.stems) - 1, top, left)}
        if self.group is None:
            self._create(sample)
        wider = np.promote_types(self.group["mask"].dtype, mask_dtype(mask))
        if wider != self.group["mask"].dtype:
            self._flush()
            self._widen_mask(wider)
        self.pending.append(sample)
        if len(self.pending) == self.chunk_tiles:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        self.group["image"].append(np.stack([s["image"] for s in self.pending]))
        mask = self.group["mask"]
        mask.append(np.stack([s["mask"] for s in self.pending]).astype(mask.dtype))
        if "weight" in self.group:
            self.group["weight"].append(np.stack([s["weight"] for s in self.pending]).astype(np.float32))
        self.group["origin"].append(np.asarray([s["origin"] for s in self.pending], dtype=np.int32))
        self.count += len(self.pending)
        self.pending = []

    def close(self) -> None:
        self._flush()
        if self.group is not None:
            self.group.attrs.update({"images": self.stems, "chunk_tiles": self.chunk_tiles})


class ZarrImageWriter:
    """Whole images of one split: ``SPLIT/images/<i>`` [C,H,W], ``masks/<i>`` [H,W] (uint8, or
    uint16/uint32 instance ids: :func:`mask_dtype`), ``weights/<i>`` [H,W] float32, chunked in
    ``chunk`` x ``chunk`` pixel squares (all channels in a chunk), so a tile read decodes only the
    chunks it overlaps, and ``foreground/<i>`` (:func:`~unetdist.data.layout.foreground_points`).
    Volumes ([C,Z,Y,X], [Z,Y,X]) likewise, chunked in ``VOLUME_CHUNK`` cubes. The group attributes
    list the stems, the [C,H,W] (or [C,Z,Y,X]) shape of each image, where each lies in its source
    image (``offsets``: a region held out of it, prepare's region split), the foreground tables'
    cap, seed and row counts, and for volumes ``spatial_dims`` and each one's ``spacing``."""

    def __init__(
        self, store: Path, split: str, chunk: int = IMAGE_CHUNK, foreground_cap: int = FOREGROUND_CAP
    ) -> None:
        self.store, self.split, self.chunk, self.foreground_cap = store, split, chunk, foreground_cap
        self.group = None
        self.stems: list[str] = []
        self.shapes: list[list[int]] = []
        self.foreground_counts: list[int] = []
        self.offsets: list[list[int]] = []
        self.spacings: list[list[float]] = []

    def write_image(
        self,
        stem: str,
        image: np.ndarray,
        mask: np.ndarray,
        weight: np.ndarray | None,
        offset: tuple[int, ...] = (0, 0),
        spacing: tuple[float, ...] | None = None,
    ) -> None:
        """Store ``image`` whole; ``offset``: the corner of this region in the source image (keys
        say it); ``spacing``: a volume's voxel size (z, y, x)."""
        import zarr
        from zarr.codecs import ZstdCodec

        if mask.ndim not in (2, 3) or image.shape[1:] != mask.shape or (self.shapes and len(self.shapes[0]) != image.ndim):
            raise ValueError(f"{stem}: image {image.shape} and mask {mask.shape}: expected [C, *S] and [*S], "
                             "S 2-D or 3-D, one kind per split")  # fmt: skip
        if self.group is None:
            root = zarr.open_group(str(self.store), mode="a")
            self.group = root.create_group(self.split, overwrite=True)
            for name in ("images", "masks", "foreground") + (("weights",) if weight is not None else ()):
                self.group.create_group(name)
        index, zstd = str(len(self.stems)), [ZstdCodec(level=1)]
        # a 3-D window reads every chunk it meets along z as well: cubes of VOLUME_CHUNK keep that to a few
        side = self.chunk if mask.ndim == 2 else VOLUME_CHUNK
        chunks = tuple(min(side, length) for length in mask.shape)
        points = foreground_points(mask, self.foreground_cap)
        fields = [
            ("images", image, (image.shape[0], *chunks)),
            ("masks", mask.astype(mask_dtype(mask), copy=False), chunks),
            ("foreground", points, (max(len(points), 1), mask.ndim)),
        ]
        if weight is not None:
            fields.append(("weights", weight.astype(np.float32), chunks))
        for name, array, array_chunks in fields:
            out = self.group[name].create_array(
                index, shape=array.shape, dtype=array.dtype, chunks=array_chunks, compressors=zstd
            )
            out[...] = array
        self.stems.append(stem)
        self.shapes.append([int(v) for v in image.shape])
        self.foreground_counts.append(len(points))
        self.offsets.append([int(v) for v in offset] if len(offset) == mask.ndim else [0] * mask.ndim)
        self.spacings.append([float(v) for v in spacing] if spacing is not None else [1.0] * mask.ndim)

    def close(self) -> None:
        if self.group is not None:
            foreground = {
                "cap": self.foreground_cap,
                "seed": FOREGROUND_SEED,
                "counts": self.foreground_counts,
            }
            volumes = {"spatial_dims": 3, "spacing": self.spacings} if len(self.shapes[0]) == 4 else {}
            self.group.attrs.update(
                {
                    "layout": WHOLE_IMAGES,
                    "images": self.stems,
                    "shapes": self.shapes,
                    "offsets": self.offsets,
                    "chunk": self.chunk,
                    "foreground": foreground,
                    **volumes,
                }
            )


# ---------------------------------------------------------------- prepare's per-split writers
#
# One interface over the formats: ``write(stem, sample)`` takes a tile of prepare's
# ``_tiles`` (webdataset fields plus ``__origin__``), ``write_image`` a whole image (whole-image
# stores only); ``shards`` / ``shard_counts`` list the tar shards written (empty for Zarr).


class TarSplitWriter:
    """Tiles -> ``<split>-%06d.tar`` shards, each with its index beside it (``SHARD.index.json``,
    :func:`~unetdist.data.sources.tar_index.write_local_index`: remote shards are read by it);
    records each shard's name and sample count.

    Members carry a fixed mtime (:data:`SHARD_MTIME`), not the time of writing: the same tiles
    give the same shard bytes, so a re-run or a second copy has the same sha256 in its index.
    """

    def __init__(self, out_dir: Path, split: str, shard_size: int) -> None:
        import webdataset as wds

        self.shards: list[str] = []
        self.shard_counts: list[int] = []
        self.in_shard = 0
        self.failed = False

        def finished(name: str) -> None:
            if not self.failed:  # a failed split is thrown away: no need to index its last shard
                write_local_index(name)
            self.shards.append(Path(name).name)
            self.shard_counts.append(self.in_shard)
            self.in_shard = 0

        pattern = str(out_dir / SHARD_PATTERNS[split])
        self.writer = wds.ShardWriter(
            pattern, maxcount=shard_size, verbose=0, post=finished, mtime=SHARD_MTIME
        )

    def write(self, stem: str, sample: dict) -> None:
        self.writer.write({key: value for key, value in sample.items() if key != "__origin__"})
        self.in_shard += 1

    def __enter__(self) -> TarSplitWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.failed = exc_type is not None
        self.writer.close()


class ZarrTileSplitWriter:
    """Tiles -> the split's arrays of ``out_dir/data.zarr`` (:class:`ZarrWriter`)."""

    def __init__(self, out_dir: Path, split: str, codec: str | None = None) -> None:
        self.writer = ZarrWriter(out_dir / STORE_NAME, split, codec=codec or DEFAULT_CODEC)

    @property
    def shards(self) -> list[str]:
        return []  # one store, no shards

    @property
    def shard_counts(self) -> list[int]:
        return []

    def write(self, stem: str, sample: dict) -> None:
        _, top, left = sample["__origin__"]
        self.writer.write(stem, top, left, sample["image.npy"], sample["mask.npy"], sample.get("weight.npy"))

    def __enter__(self) -> ZarrTileSplitWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.writer.close()


class ZarrImageSplitWriter(ZarrTileSplitWriter):
    """Whole images (``--whole-images``) -> ``out_dir/data.zarr``: tiles are sampled from them when training."""

    def __init__(self, out_dir: Path, split: str) -> None:
        self.writer = ZarrImageWriter(out_dir / STORE_NAME, split)

    def write_image(
        self,
        stem: str,
        image: np.ndarray,
        mask: np.ndarray,
        weight: np.ndarray | None,
        offset: tuple[int, ...] = (0, 0),
        spacing: tuple[float, ...] | None = None,
    ) -> None:
        self.writer.write_image(stem, image, mask, weight, offset, spacing)


def open_split_writer(
    output_format: str,
    out_dir: Path,
    split: str,
    *,
    shard_size: int,
    whole_images: bool = False,
    zarr_codec: str | None = None,
):
    """The writer of ``split`` in ``output_format`` ("webdataset" or "zarr"); use it as a context manager."""
    if whole_images:
        return ZarrImageSplitWriter(out_dir, split)
    if output_format == "zarr":
        return ZarrTileSplitWriter(out_dir, split, zarr_codec)
    return TarSplitWriter(out_dir, split, shard_size)
