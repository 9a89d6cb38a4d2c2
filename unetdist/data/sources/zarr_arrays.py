"""A Zarr store of the user's own arrays (``data.zarr_store`` + ``data.image_array`` ...), read in
place as pre-tiled samples: image ``[N, C, H, W]`` (or ``[N, H, W]``: one channel), mask
``[N, H, W]``, optionally weight ``[N, H, W]``, anywhere in the store, Zarr v2 or v3, local or
at a URL.

The samples are the rows; validation is the last ``data.val_fraction`` of them (training keeps
the first rows, so its blocks stay aligned with the chunks). Reading is
:class:`~unetdist.data.sources.zarr_tiles.ZarrTiles`', with its direct chunk path where the
codecs allow.
"""

from __future__ import annotations

import math

from unetdist.config import DataConfig
from unetdist.data.fetch import Fetcher
from unetdist.data.remote import display, zarr_store
from unetdist.data.samples import SampleChecks
from unetdist.data.sources.zarr_tiles import ZarrTiles

EXPECTED = (
    "expected data.image_array [N, C, H, W] or [N, H, W] and data.mask_array [N, H, W] (integer), "
    "optionally data.weight_array [N, H, W] (float), with the same N, H and W"
)


def held_out_rows(total: int, fraction: float) -> int:
    """Rows kept for validation: ``ceil(fraction * total)``, at least one when ``fraction`` > 0."""
    return min(total - 1, max(1, math.ceil(fraction * total))) if fraction > 0 and total > 1 else 0


def _arrays_in(group) -> list[str]:
    """Every array in the store with its shape, for the message when a named one is missing."""
    import zarr

    found = [f"{path} {list(node.shape)} {node.dtype}" for path, node in group.members(max_depth=None)
             if isinstance(node, zarr.Array)]
    return found[:12] or ["no arrays"]


def check_arrays(store: str, paths: dict[str, str]) -> int:
    """The sample count N of the named arrays; a ValueError naming the store, what it holds and
    what was expected when an array is missing or the shapes disagree."""
    import zarr

    where = f"zarr store {display(store)}"
    try:
        root = zarr.open_group(zarr_store(store), mode="r")
    except Exception as err:  # noqa: BLE001 - zarr's own errors name no setting
        raise ValueError(f"{where}: cannot open it as a Zarr group ({type(err).__name__}: {err}); {EXPECTED}") from None
    shapes = {}
    for name, path in paths.items():
        if not path:
            continue
        node = root.get(path)
        if not isinstance(node, zarr.Array):
            held = ", ".join(_arrays_in(root))
            raise ValueError(f"{where}: no array {path!r} (data.{name}_array); it holds {held}; {EXPECTED}")
        shapes[name] = tuple(node.shape)
    image, mask = shapes["image"], shapes["mask"]
    weight = shapes.get("weight", mask)
    if len(image) not in (3, 4) or len(mask) != 3 or image[0] != mask[0] or image[-2:] != mask[1:] or weight != mask:
        found = "; ".join(f"{name} {list(shape)}" for name, shape in shapes.items())
        raise ValueError(f"{where}: arrays {found}; {EXPECTED}")
    return image[0]


def open_zarr_arrays(data: DataConfig, split: str, checks: SampleChecks, fetcher: Fetcher | None) -> ZarrTiles:
    """The ``split`` rows of the user's arrays: the first rows train, the last ``data.val_fraction`` validate."""
    if not (data.zarr_store and data.image_array and data.mask_array):
        raise ValueError("a Zarr store of your own arrays needs data.zarr_store, data.image_array and data.mask_array")
    paths = {"image": data.image_array, "mask": data.mask_array, "weight": data.weight_array}
    total = check_arrays(data.zarr_store, paths)
    held_out = held_out_rows(total, data.val_fraction)
    rows = (0, total - held_out) if split == "train" else (total - held_out, total)
    return ZarrTiles(data.zarr_store, split, checks, fetcher, arrays={k: v for k, v in paths.items() if v}, rows=rows)
