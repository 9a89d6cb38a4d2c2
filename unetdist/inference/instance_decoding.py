"""How ``predict --instances`` turns class probabilities into instance ids.

The model carries its decoding (``load_model``'s ``meta["decoding"]``: the thresholds tuned on
validation when it was trained, see :mod:`unetdist.inference.loading`); a model without one
decodes with the defaults of its training target (a 3-D model's: min size in voxels). Command-line options override single fields;
``--tune`` replaces the whole (:mod:`unetdist.inference.tuning`)::

    decoder = InstanceDecoder.of(meta, {"threshold": 0.6})       # stored params, threshold 0.6
    instances = decoder(probabilities)                           # [K, H, W] -> HxW uint16/uint32 ids

``border_class`` (``--border-class``) keeps the decoding of models trained with a border class
before the boundary target existed: the argmax class labels, the border class's pixels grown
into from the cell interiors (:func:`unetdist.instances.instances_from_labels`).

The probabilities are decoded whole: a Zarr or OME-Zarr image's instances need its (plane's)
probabilities in memory once (:mod:`unetdist.inference.zarr_instances`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from unetdist.data import remote
from unetdist.inference.engine import InputError, labels_from_probabilities
from unetdist.instances import DecodeParams, decode_instances, instances_from_labels

DECODING_JSON = "decoding.json"  # what --tune chose, in --output
OVERRIDABLE = ("threshold", "seed_threshold", "min_size", "min_distance")


@dataclass(frozen=True)
class InstanceDecoder:
    """``params`` applied to probabilities, or (``border_class`` set) the class-label decoding."""

    params: DecodeParams
    border_class: int | None = None

    @classmethod
    def of(
        cls,
        meta: dict[str, Any],
        overrides: dict[str, Any] | None = None,
        border_class: int | None = None,
        tuned: DecodeParams | None = None,
    ) -> InstanceDecoder:
        """The model's decoding (``tuned`` instead when given) with ``overrides`` (fields of
        ``OVERRIDABLE``; None values ignored). A bad value is an InputError naming its option."""
        params = tuned or (
            DecodeParams.from_dict(meta["decoding"])
            if meta.get("decoding")
            else DecodeParams.defaults(meta.get("target") or "semantic", meta.get("spatial_dims") or 2)
        )
        chosen = {key: value for key, value in (overrides or {}).items() if value is not None}
        try:
            params = dataclasses.replace(params, **chosen)
        except (ValueError, TypeError) as err:
            options = " ".join(f"--{key.replace('_', '-')} {value}" for key, value in chosen.items())
            raise InputError(f"{options}: {err}") from err
        if border_class is not None and border_class < 1:
            raise InputError(f"--border-class {border_class}: expected a class id >= 1 (0 is the background)")
        return cls(params, border_class)

    def __call__(self, probabilities: np.ndarray) -> np.ndarray:
        """HxW instance ids (0 background, 1..N; uint16, uint32 past 65,535) of [K, H, W] probabilities;
        ZxYxX ids of a volume's [K, Z, Y, X]."""
        if self.border_class is not None:
            return instances_from_labels(
                labels_from_probabilities(probabilities),
                border_class=self.border_class,
                min_distance=self.params.min_distance,
                min_size=self.params.min_size,
            )
        return decode_instances(probabilities, self.params)

    def check_classes(self, num_classes: int | None, model: str) -> None:
        """An InputError when the model's class count cannot be decoded so."""
        if num_classes is None:
            return
        if self.border_class is not None and self.border_class >= num_classes:
            raise InputError(
                f"--border-class {self.border_class}: {model} has classes 0-{num_classes - 1} only"
            )
        if self.border_class is None and self.params.target == "boundary" and num_classes != 3:
            raise InputError(
                f"{model}: its decoding is for the boundary target (background / interior / boundary), "
                f"but the model has {num_classes} classes"
            )

    def describe(self) -> str:
        if self.border_class is not None:
            params = self.params
            return (f"class labels, border class {self.border_class}, min distance {params.min_distance}, "
                    f"min size {params.min_size}")  # fmt: skip
        return ", ".join(f"{key} {value}" for key, value in self.params.to_dict().items())


def write_decoding_json(output: str, params: DecodeParams, details: dict[str, Any]) -> str:
    """``<output>/decoding.json``: ``{"decoding": params.to_dict(), **details}``; its location."""
    location = remote.join(output, DECODING_JSON)
    text = json.dumps({"decoding": params.to_dict(), **details}, indent=2) + "\n"
    if remote.is_remote(location):
        remote.write_bytes(location, text.encode())
    else:
        with open(remote.local_path(location), "w", encoding="utf-8") as file:
            file.write(text)
    return location
