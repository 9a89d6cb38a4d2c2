"""Instance scores of a validation pass (``val/ap50``, ``val/ap75``, ``val/ap90``) and the decoding
tuned on the last one: what users of instance segmentation look at, next to the pixel Dice.

The trainer feeds each validation batch that carries the true instance ids (data with instance
masks) through :meth:`InstanceValidation.add`: the tile's probabilities are decoded into instances
on the host (:func:`unetdist.instances.decode_instances`) and matched one-to-one to the truth
(:func:`unetdist.instance_metrics.match_counts`). The counts add up over tiles and ranks, so the
trainer all-reduces them and the AP is exact for the whole validation split::

    scores = InstanceValidation(params, keep_for_tuning=True)
    for batch in val_loader:
        scores.add(logits, batch["instances"])
    all_reduce_sum(counts := torch.from_numpy(scores.counts))
    metrics = ap_metrics(counts.numpy())
    tuned, ap = tune_decoding(scores, params.target, all_reduce_sum)   # the last validation only

Volumes work the same way: ``logits`` [N, K, z, y, x] and instances [N, Z, Y, X]; give their decoding
``DecodeParams.defaults(target, 3)`` (min sizes in voxels) and ``tune_decoding(..., spatial_dims=3)``.

Tiles are scored as tiles: an object cut by a tile's edge counts as the part inside it, the same
in truth and prediction. For tuning, the tiles' probabilities are kept as float16 up to a memory
budget (the first tiles of the pass, so every run keeps the same ones); the rest are left out of
the tuning only, and the log says how many. (A 3 x 64 x 128 x 128 volume tile takes 6 MiB: the
budget holds about ten.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from unetdist.decoding import best_params, decoding_grid, tuning_counts
from unetdist.geometry import center_crop
from unetdist.instance_metrics import TRAIN_IOU_THRESHOLDS, ap_names, average_precision, match_counts
from unetdist.instances import DecodeParams, decode_instances

log = logging.getLogger(__name__)

# Probabilities kept per rank for tuning: ~170 tiles of 3 x 256 x 256 in float16.
TUNING_BUDGET_BYTES = 64 * 2**20


class InstanceValidation:
    """Counts of matched / spurious / missed instances over a validation pass, per IoU threshold."""

    def __init__(self, params: DecodeParams, keep_for_tuning: bool = False,
                 budget_bytes: int = TUNING_BUDGET_BYTES) -> None:
        self.params = params
        self.counts = np.zeros((len(TRAIN_IOU_THRESHOLDS), 3), dtype=np.int64)
        self.keep_for_tuning = keep_for_tuning
        self.budget_bytes = budget_bytes
        self.kept_probabilities: list[np.ndarray] = []
        self.kept_truths: list[np.ndarray] = []
        self.kept_bytes = 0
        self.tiles_left_out = 0
        self.spatial_dims: int | None = None  # of the tiles added (2 or 3); None: none yet

    def add(self, logits: torch.Tensor, instances: torch.Tensor) -> np.ndarray:
        """Score one batch: ``logits`` [N, K, h, w], ``instances`` [N, H, W] true ids (cropped to the
        logits). Returns the predicted instances [N, h, w] (for the panels). Volumes: [N, K, z, y, x],
        [N, Z, Y, X] and [N, z, y, x]."""
        self.spatial_dims = logits.ndim - 2
        probabilities = torch.softmax(logits.float(), dim=1).cpu().numpy()
        truths = center_crop(instances, logits.shape[2:]).cpu().numpy()
        predicted = np.zeros(truths.shape, dtype=np.int64)
        for index, (tile, truth) in enumerate(zip(probabilities, truths, strict=True)):
            predicted[index] = decode_instances(tile, self.params)
            self.counts += match_counts(truth, predicted[index], TRAIN_IOU_THRESHOLDS)
            if self.keep_for_tuning:
                self._keep(tile, truth)
        return predicted

    def _keep(self, probabilities: np.ndarray, truth: np.ndarray) -> None:
        size = probabilities.size * 2 + truth.size * 4
        if self.kept_bytes + size > self.budget_bytes:
            self.tiles_left_out += 1
            return
        self.kept_probabilities.append(probabilities.astype(np.float16))
        self.kept_truths.append(truth.astype(np.int32))
        self.kept_bytes += size


def ap_metrics(counts: np.ndarray, prefix: str = "val/") -> dict[str, float]:
    """``{"val/ap50": ..., "val/ap75": ..., "val/ap90": ...}`` of summed [T, 3] counts."""
    values = average_precision(np.asarray(counts))
    return {f"{prefix}{name}": float(value) for name, value in zip(ap_names(TRAIN_IOU_THRESHOLDS), values, strict=True)}


def tune_decoding(
    scores: InstanceValidation,
    target: str,
    sum_over_ranks: Callable[[torch.Tensor], torch.Tensor],
    spatial_dims: int | None = None,
) -> tuple[DecodeParams, float]:
    """The decoding of the highest AP@0.5 over the kept tiles of all ranks, and that AP.

    Every rank calls this (the counts of the grid are summed over ranks), with its own tiles.
    ``spatial_dims``: 3 for volumes (the grid's min sizes in voxels); None: that of the tiles
    ``scores`` saw, 2 if none. Give it where a rank may have seen no tile: every rank must make
    the same grid."""
    if spatial_dims is None:
        spatial_dims = scores.spatial_dims or 2
    if scores.tiles_left_out:
        log.info("decoding tuned on %d validation tiles of this rank; %d more left out (memory budget %d MiB)",
                 len(scores.kept_truths), scores.tiles_left_out, scores.budget_bytes // 2**20)
    grid = decoding_grid(target, spatial_dims=spatial_dims)
    probabilities = [tile.astype(np.float32) for tile in scores.kept_probabilities]
    counts = torch.from_numpy(tuning_counts(probabilities, scores.kept_truths, grid))
    counts = sum_over_ranks(counts)
    return best_params(grid, counts.numpy())
