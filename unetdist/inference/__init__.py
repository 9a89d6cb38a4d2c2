"""Inference at any image size: tiling, the predictor, model loading, file and Zarr I/O.

From Python::

    from unetdist.inference import load_model, predict_array
    model, meta = load_model("runs/quickstart/checkpoints/step-00000200.pt")   # or "runs:/<id>/model"
    labels = predict_array(model, image)            # HxW uint8 class ids, any image size
    probabilities = predict_array(model, image, return_probabilities=True)   # [K, H, W] float32

From the shell: ``python -m unetdist.predict`` (see unetdist.inference.cli).
"""

from unetdist.inference.engine import (
    ChannelStats,
    InputError,
    ModelGeometry,
    TilePredictor,
    as_chw,
    labels_from_probabilities,
    predict_array,
)

__all__ = [
    "ChannelStats",
    "InputError",
    "ModelGeometry",
    "TilePredictor",
    "as_chw",
    "labels_from_probabilities",
    "predict_array",
]
