"""Instance ids of Zarr and OME-Zarr images: probabilities made block by block, decoded whole.

A cell cut by a block border must not become two, so an image's (plane's) probabilities are
decoded all at once, while :func:`~unetdist.inference.zarr_io.predict_blocks` makes them a block
at a time, split over the ranks. With ``--instances``, every block's float16 probabilities go to
a scratch Zarr array beside the output (:class:`ProbabilityScratch`, through
:class:`KeepProbabilities`); once all blocks are there, each plane is read back and decoded whole
by one rank (planes split over ranks), and the scratch is deleted::

    summary = predict_zarr_instances(model, array, "big", {...outputs...}, decoder, rank=0, world_size=1)

Decoding from float16 probabilities may differ from the in-memory decoding of an image file
where a probability lies within float16 rounding of a threshold. The plane's probabilities and
its decoding need memory for the whole plane (about 40 bytes per pixel): the size limit of
``--instances`` on Zarr inputs. A 3-D model's volume is one "plane", decoded in 3-D (about 35
bytes per voxel for the boundary target, 65 for the semantic one: 1 GiB holds ~250^3 at most).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

import numpy as np
from torch import nn

from unetdist.data import remote
from unetdist.inference.instance_decoding import InstanceDecoder
from unetdist.inference.zarr_io import (
    Block,
    BlockOutputs,
    OutputError,
    ZarrOutputs,
    predict_blocks,
    raise_if_any_failed,
)
from unetdist.inference.zarr_sources import one_line


class ProbabilityScratch:
    """float16 ``[*planes, K, *spatial]`` probabilities at ``location``, chunked by blocks."""

    def __init__(self, location: str, planes: tuple[int, ...] = ()) -> None:
        self.location, self.planes, self.created = location, tuple(planes), False

    def create(self, num_classes: int, shape: tuple[int, ...], block_shape: tuple[int, ...]) -> None:
        """Make the (empty) array once, replacing a scratch left by a run that stopped. Rank 0 only."""
        if self.created:
            return
        import zarr

        try:
            zarr.create_array(
                store=remote.zarr_store(self.location, writable=True),
                shape=(*self.planes, num_classes, *shape),
                chunks=(*(1 for _ in self.planes), num_classes, *block_shape),
                dtype=np.float16,
                fill_value=0.0,
                overwrite=True,
            )
        except Exception as err:  # zarr's, obstore's and the file system's errors: a bad output
            raise OutputError(f"{remote.display(self.location)}: cannot create: {one_line(err)}") from err
        self.created = True

    def _array(self) -> Any:
        import zarr

        return zarr.open_array(store=remote.zarr_store(self.location, writable=True), mode="r+")

    def writer(self, plane: tuple[int, ...] = ()) -> Callable[[Block, np.ndarray], None]:
        array = self._array()

        def write(block: Block, probabilities: np.ndarray) -> None:
            spatial = (slice(block[axis], block[axis + 1]) for axis in range(0, len(block), 2))
            array[(*plane, slice(None), *spatial)] = probabilities.astype(np.float16)

        return write

    def read(self, plane: tuple[int, ...] = ()) -> np.ndarray:
        """float32 ``[K, *spatial]`` probabilities of one plane."""
        return np.asarray(self._array()[plane], dtype=np.float32)

    def delete(self) -> None:
        """Remove the scratch array (rank 0, once every rank has read what it needs)."""
        if not remote.is_remote(self.location):
            shutil.rmtree(remote.local_path(self.location), ignore_errors=True)
            return
        import obstore

        store = remote.zarr_store(self.location, writable=True).store  # obstore's, rooted at the scratch
        keys = [item["path"] for batch in obstore.list(store) for item in batch]
        if keys:
            obstore.delete(store, keys)


class KeepProbabilities:
    """A :class:`~unetdist.inference.zarr_io.BlockOutputs` that passes blocks on to ``outputs``
    (creation always; writes only with ``write_outputs``) and keeps their probabilities in
    ``scratch`` at ``plane``."""

    def __init__(
        self,
        outputs: BlockOutputs,
        scratch: ProbabilityScratch,
        plane: tuple[int, ...] = (),
        write_outputs: bool = True,
    ) -> None:
        self.outputs, self.scratch, self.plane, self.write_outputs = outputs, scratch, plane, write_outputs

    def create(self, shape: tuple[int, ...], num_classes: int, block_shape: tuple[int, ...]) -> None:
        self.outputs.create(shape, num_classes, block_shape)
        self.scratch.create(num_classes, shape, block_shape)

    def open(self) -> Callable[[Block, np.ndarray], None]:
        passed_on = self.outputs.open() if self.write_outputs else None
        keep = self.scratch.writer(self.plane)

        def write(block: Block, probabilities: np.ndarray) -> None:
            if passed_on is not None:
                passed_on(block, probabilities)
            keep(block, probabilities)

        return write


def run_together(step: Callable[[], None], name: str) -> None:
    """``step()`` on every rank, then every rank raises if one failed (zarr_io.raise_if_any_failed)."""
    failure: BaseException | None = None
    try:
        step()
    except Exception as err:  # let the other ranks reach the collective, then fail
        failure = err
    raise_if_any_failed(failure, name)


def scratch_location(output_location: str) -> str:
    """Where the probabilities of the output at ``output_location`` wait: a hidden name beside it."""
    parent, _, name = output_location.rstrip("/").rpartition("/")
    hidden = f".{name}.probabilities.partial"
    return f"{parent}/{hidden}" if parent else hidden


def predict_zarr_instances(
    model: nn.Module,
    array: Any,
    name: str,
    locations: dict[str, str | os.PathLike[str] | None],
    decoder: InstanceDecoder,
    *,
    rank: int = 0,
    world_size: int = 1,
    block: int | None = None,
    **predict_options: Any,
) -> dict[str, Any]:
    """:func:`~unetdist.inference.zarr_io.predict_zarr` into ``locations["labels"]`` (and
    ``locations["probabilities"]``, None: not written), plus uint32 HxW (ZxYxX) instance ids at
    ``locations["instances"]``, decoded by rank 0 from the whole image's probabilities."""
    instances_location = str(locations["instances"])
    scratch = ProbabilityScratch(scratch_location(instances_location))
    outputs = ZarrOutputs(*(None if locations.get(key) is None else str(locations[key])
                            for key in ("labels", "probabilities")))  # fmt: skip
    summary = predict_blocks(model, array, name, KeepProbabilities(outputs, scratch), rank=rank,
                             world_size=world_size, block=block, **predict_options)  # fmt: skip

    def decode() -> None:
        if rank != 0:
            return
        import zarr

        ids = decoder(scratch.read()).astype(np.uint32)
        sides = zip(summary["block_shape"], ids.shape, strict=True)
        chunks = tuple(min(side, length) for side, length in sides)
        try:
            target = zarr.create_array(
                store=remote.zarr_store(instances_location, writable=True),
                shape=ids.shape,
                chunks=chunks,
                dtype=np.uint32,
                fill_value=0,
                overwrite=True,
            )
        except Exception as err:  # zarr's, obstore's and the file system's errors: a bad output
            shown = remote.display(instances_location)
            raise OutputError(f"{shown}: cannot create: {one_line(err)}") from err
        target[:] = ids
        summary["instances"] = int(ids.max())
        scratch.delete()

    run_together(decode, name)
    return summary

