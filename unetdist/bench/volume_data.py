"""``python -m unetdist.bench data --spatial-dims 3``: 3-D training windows read from a whole-volume Zarr
store by the training loader, against an in-memory ceiling of the same windows.

    python -m unetdist.bench data --spatial-dims 3 --volumes 4 --volume 64x192x192 --tile 48 --batch 4
    python -m unetdist.bench data --spatial-dims 3 --tile 64 --tile-depth 32 --workers 2

Writes ``--volumes`` synthetic volumes of ``--volume`` voxels (touching ellipsoids,
:func:`unetdist.data.synthetic.synthetic_volume`; uint8 images, class masks) through
:class:`~unetdist.data.writers.ZarrImageWriter` (what ``prepare --spatial-dims 3`` writes: 64^3
chunks, zstd level 1, foreground tables, spacing), then times in alternating rounds
(:func:`unetdist.bench.loader_rounds.rounds`), with ``--workers`` workers each:

- ``loader``: ``build_train_loader(..., spatial_dims=3)`` over the store: windows of
  ``--tile-depth`` x ``--tile`` x ``--tile`` (a third of them centred on foreground voxels), read
  chunk by chunk and decoded, checked, batched with their augmentation parameters;
- ``ceiling``: the same loader, sequence and windows over the volumes already decoded in memory
  (:class:`InMemoryVolumes`): everything but the chunk reads and their decoding.

``loader_vs_ceiling`` is the median of the rounds' ratios (rates: the medians of the windows), in
samples/s and voxels/s (of the input tile). ``zarr_chunk_reads_per_window``: the chunks a window's
reads decode, image and mask together (zarr decodes every chunk a window meets, once per window:
tiles of a batch do not share decoded chunks), counted from the windows of the batches the loader
handed over (their keys are their corners); ``decoded_voxels_per_window_voxel`` what those chunks
hold over what the window uses (a 48^3 window in 64^3 chunks meets 1-8 chunks per array: 2.4 on
average in 64x192x192 volumes, 5.7x its voxels decoded, since z spans one chunk there). ``cpu_augment_tiles_per_s_per_core``: ``to_model_input`` (elastic deformation trilinear,
flips, intensity, noise) of one batch on one thread, as in 2-D.
"""

from __future__ import annotations

import argparse
import math
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from unetdist.bench.loader_rounds import augmentation_rate, median_ratio, rounds
from unetdist.data.sources.zarr_images import ZarrImages

FOREGROUND_FRACTION = 1 / 3  # nnU-Net's oversampling: windows are not all background, as in training
KEY_CORNER = re.compile(r"_z(\d+)_y(\d+)_x(\d+)$")


def parse_volume(text: str) -> tuple[int, int, int]:
    """``ZxYxX`` -> (z, y, x); a ValueError (exit 2) naming the option otherwise."""
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"--volume {text}: expected ZxYxX voxels, e.g. 64x192x192")
    return shape  # type: ignore[return-value]


def write_volumes(store: Path, count: int, shape: tuple[int, int, int]) -> dict[str, list[np.ndarray]]:
    """``count`` synthetic volumes into a whole-volume Zarr store (split ``train``); returns them as
    read back (``images`` [C,Z,Y,X], ``masks`` [Z,Y,X]), the ceiling's in-memory copy."""
    from unetdist.data.synthetic import synthetic_volume
    from unetdist.data.writers import ZarrImageWriter

    writer = ZarrImageWriter(store, "train")
    rng = np.random.default_rng(0)
    volumes: dict[str, list[np.ndarray]] = {"images": [], "masks": []}
    for index in range(count):
        image, instances = synthetic_volume(shape, rng)
        mask = (instances > 0).astype(np.uint8)  # class masks: no weight maps, as a semantic 3-D run reads
        writer.write_image(f"vol{index:03d}", image[None], mask, None, offset=(0, 0, 0), spacing=(1.0, 1.0, 1.0))
        volumes["images"].append(image[None])
        volumes["masks"].append(mask)
    writer.close()
    return volumes


class InMemoryVolumes(ZarrImages):
    """The store's source with its arrays already decoded in memory: the same units, foreground
    tables and windows (the sequence and the words decide them, not the reads), without chunk reads."""

    def __init__(self, volumes: dict[str, list[np.ndarray]], *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.volumes = volumes  # workers fork: they share these pages, nothing is pickled

    def _tile_reads(self, unit: int, *corner: int):
        window = tuple(slice(start, start + size) for start, size in zip(corner, self.checks.tile_shape, strict=True))
        reads = []
        for name in self._fields():
            selection = (slice(None), *window) if name == "images" else window

            # a copy, as zarr hands over a fresh array: what follows (checks, batching) sees the same
            async def read(array: np.ndarray = self.volumes[name][unit], selection=selection) -> np.ndarray:
                return np.ascontiguousarray(array[selection])

            reads.append(read)
        return reads


def chunks_met(corner: tuple[int, ...], tile: tuple[int, ...], chunks: tuple[int, ...],
               shape: tuple[int, ...]) -> tuple[int, int]:
    """(chunks, voxels in them) that the window at ``corner`` of ``tile`` meets in an array of
    ``shape`` chunked by ``chunks``: per axis the chunk indices it spans (the grid is separable)."""
    count, voxels = 1, 1
    for start, size, chunk, length in zip(corner, tile, chunks, shape, strict=True):
        first, last = start // chunk, (start + size - 1) // chunk
        count *= last - first + 1
        voxels *= min((last + 1) * chunk, length) - first * chunk
    return count, voxels


def run(args: argparse.Namespace) -> dict[str, float | int | str]:
    from unetdist.config import DataConfig
    from unetdist.data import build_train_loader
    from unetdist.data.loader import sample_checks

    if args.format not in (None, "zarr"):
        raise ValueError(f"--format {args.format}: volumes are read from whole-volume Zarr stores (--format zarr)")
    if args.source != "local" or args.block_sizes:
        raise ValueError("--source s3 and --block-sizes are for 2-D tiles; --spatial-dims 3 reads local volumes")
    shape = parse_volume(args.volume)
    tile_side = args.tile or 48
    tile = (args.tile_depth or tile_side, tile_side, tile_side)
    if any(size > length for size, length in zip(tile, shape, strict=True)):
        raise ValueError(f"the tile {'x'.join(map(str, tile))} (--tile-depth, --tile) does not fit --volume {args.volume}")
    if args.volumes < 1:
        raise ValueError(f"--volumes {args.volumes}: expected at least one volume")
    batch, batches, repeats = args.batch or 4, args.batches or 24, args.repeats or 7
    with tempfile.TemporaryDirectory(prefix="unetdist-bench-volumes-") as scratch:
        folder = Path(args.dir or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        volumes = write_volumes(folder / "data.zarr", args.volumes, shape)
        data = DataConfig(format="zarr", root=str(folder), tile_size=tile_side, tile_depth=args.tile_depth,
                          num_workers=args.workers, augment_on="device", augment_elastic=True, augment_intensity=True,
                          augment_noise_std=0.01, tiles_per_image=64, prefetch_factor=4, mask_kind="classes",
                          foreground_fraction=FOREGROUND_FRACTION)  # fmt: skip
        options = dict(rank=0, world_size=1, seed=0, micro_batch_size=batch, in_channels=1, num_classes=2,
                       use_weight_map=False, spatial_dims=3)  # fmt: skip
        checks = sample_checks(data, 1, 2, False, spatial_dims=3)
        ceiling = InMemoryVolumes(volumes, str(folder / "data.zarr"), "train", checks, data.tiles_per_image,
                                  foreground_fraction=FOREGROUND_FRACTION)  # fmt: skip
        buffered = data.prefetch_factor * max(1, args.workers)
        contestants = {
            "loader": (iter(build_train_loader(data, **options)), buffered),
            "ceiling": (iter(build_train_loader(data, **options, source=ceiling)), buffered),
        }
        rates, other_cores = rounds(contestants, batches, batch, repeats)
        # the windows the loader reads next (their keys are their corners): what their reads decode
        handed = [next(contestants["loader"][0]) for _ in range(max(4, 64 // batch))]
        del contestants  # their workers stop
        import zarr

        group = zarr.open_group(str(folder / "data.zarr"), mode="r", path="train")
        image_chunks, mask_chunks = group["images"]["0"].chunks[1:], group["masks"]["0"].chunks
    met = []
    for sample in handed:
        for key in sample["key"]:
            corner = tuple(int(value) for value in KEY_CORNER.search(key).groups())
            met.append([*chunks_met(corner, tile, image_chunks, shape), *chunks_met(corner, tile, mask_chunks, shape)])
    image_met, image_voxels, mask_met, _ = np.mean(met, axis=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    augment_rate = augmentation_rate(handed[0], "cpu", 4)
    torch.set_num_threads(threads)
    device_rate = augmentation_rate(handed[0], args.device, 20) if args.device != "cpu" else None
    medians = {name: float(np.median(values)) for name, values in rates.items()}
    tile_voxels = math.prod(tile)
    return {
        "format": "zarr",
        "spatial_dims": 3,
        "workers": args.workers,
        "batch": batch,
        "volumes": args.volumes,
        "volume": "x".join(map(str, shape)),
        "tile": "x".join(map(str, tile)),
        "zarr_chunk": "x".join(map(str, image_chunks)),
        "samples_per_s": round(medians["loader"], 1),
        "voxels_per_s": round(medians["loader"] * tile_voxels),
        "mb_per_s": round(medians["loader"] * tile_voxels * 2 / 1e6, 1),  # uint8 image and uint8 mask
        "ceiling_samples_per_s": round(medians["ceiling"], 1),
        "ceiling_voxels_per_s": round(medians["ceiling"] * tile_voxels),
        "loader_vs_ceiling": round(median_ratio(rates["loader"], rates["ceiling"]), 3),
        "loader_vs_ceiling_windows": "/".join(f"{a / b:.2f}" for a, b in zip(rates["loader"], rates["ceiling"], strict=True)),
        "zarr_chunk_reads_per_window": round(float(image_met + mask_met), 2),
        "zarr_image_chunks_per_window": round(float(image_met), 2),
        "decoded_voxels_per_window_voxel": round(float(image_voxels) / tile_voxels, 2),
        "windows_counted": len(met),
        **({} if not other_cores else {"other_load_cores": round(float(np.median(other_cores)), 2),
                                       "other_load_cores_max": round(max(other_cores), 2)}),
        "tiles_per_s_per_core": round(medians["loader"] / max(1, args.workers), 1),
        "cpu_augment_tiles_per_s_per_core": round(augment_rate, 1),
        **({} if device_rate is None else {"device": args.device, "device_augment_tiles_per_s": round(device_rate, 1)}),
    }
