"""Predict an OME-Zarr image into its NGFF label image (:mod:`unetdist.inference.ngff_labels`).

    summary = predict_ngff(model, prepare_ngff(location, stem), rank=0, world_size=1)
    summary = predict_ngff(model, job, instances=InstanceDecoder.of(meta))    # uint32 instance ids

Every rank calls :func:`predict_ngff` together: each t/z plane is predicted block by block, the
blocks split over ranks (:func:`~unetdist.inference.zarr_io.predict_blocks`), into label level 0
as class ids; with ``instances``, the blocks' probabilities go to a scratch array instead and each
plane is decoded whole, by one rank (planes split over ranks), into uint32 instance ids numbered
per plane (:mod:`unetdist.inference.zarr_instances`). Then the pyramid levels (chunks split over
ranks), and rank 0 publishes the label image.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from torch import nn

from unetdist.data import remote
from unetdist.inference.instance_decoding import InstanceDecoder
from unetdist.inference.ngff_labels import LabelWriter, NgffJob, PlaneOutputs, add_to_labels_list, publish
from unetdist.inference.zarr_instances import (
    KeepProbabilities,
    ProbabilityScratch,
    run_together,
    scratch_location,
)
from unetdist.inference.zarr_io import BlockOutputs, predict_blocks


def predict_ngff(
    model: nn.Module,
    job: NgffJob,
    *,
    rank: int = 0,
    world_size: int = 1,
    block: int | None = None,
    instances: InstanceDecoder | None = None,
    **predict_options: Any,
) -> dict[str, Any]:
    """Predict ``job``'s image into its label image (see the module docstring).

    Raises OutputError for a label image that cannot be made; FailedElsewhere on the ranks that did
    not fail. ``predict_options`` go to ``TilePredictor``."""
    import zarr

    started = time.perf_counter()
    source = zarr.open_array(
        store=remote.zarr_store(remote.join(job.location, job.image.levels[job.level])), mode="r"
    )
    writer = LabelWriter(job, instances is not None)
    planes = job.planes()
    scratch = None
    if instances is not None:
        scratch = ProbabilityScratch(scratch_location(job.target.location), job.label_shapes[0][:-2])
    axes = [axis["name"] for axis in job.label_axes]
    for plane in planes:
        where = "".join(f", {axis}={position}" for axis, position in zip(axes, plane, strict=False))
        outputs: BlockOutputs = PlaneOutputs(writer, plane)
        if scratch is not None:
            outputs = KeepProbabilities(outputs, scratch, plane, write_outputs=False)
        predict_blocks(
            model,
            job.plane_source(source, plane),
            f"{job.shown} (level {job.level}{where})",
            outputs,
            rank=rank,
            world_size=world_size,
            block=block,
            **predict_options,
        )
    if scratch is not None:

        def decode() -> None:  # each rank its planes: probabilities -> uint32 ids, numbered per plane
            labels = writer.array(0)
            for plane in planes[rank::world_size]:
                labels[(*plane, slice(None), slice(None))] = instances(scratch.read(plane)).astype(np.uint32)

        run_together(decode, job.shown)
        run_together(lambda: scratch.delete() if rank == 0 else None, job.shown)
    for level in range(1, len(job.label_shapes)):
        run_together(lambda level=level: writer.make_level(level, rank, world_size), job.shown)
    listed: list[str] = []

    def finish() -> None:
        if rank == 0:
            publish(job.target)
            if job.target.in_image:
                listed.extend(add_to_labels_list(job.location, job.image.version, job.name))

    run_together(finish, job.shown)
    summary = {"planes": len(planes), "levels": len(job.label_shapes), "shape": job.label_shapes[0]}
    return {**summary, "labels": listed, "seconds": time.perf_counter() - started}
