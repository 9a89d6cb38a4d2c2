"""Validation overlay panels: image | ground truth | prediction | error map, one PNG per tile.

``save_panels`` writes one panel per validation tile; ``RunOutputs.log_val_panels`` logs
them as MLflow image series (``val/panel_0``, ``val/panel_1``, ...), so the run page's
image charts step through training for a fixed set of tiles.

Colours: classes use ``PALETTE`` (0 black, 1 white, 2 red, 3 green, ...). In the error
map, correct background is black, correct foreground is a dim grey, a false positive
(predicted foreground on background) is red, a false negative (missed foreground) is blue
and a wrong foreground class is yellow. Pure numpy + Pillow: ~1 ms per 64x64 tile.

A volume tile (image ``[C, Z, Y, X]``, maps ``[z, y, x]``) gives one row per central slice,
xy, then xz, then yz, each row image | truth | prediction | errors (| outlines); rows narrower
than the widest are padded with the separator grey.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PALETTE = np.array(
    [
        [0, 0, 0],
        [255, 255, 255],
        [230, 60, 60],
        [60, 200, 90],
        [70, 120, 240],
        [240, 200, 40],
        [200, 80, 220],
        [60, 210, 220],
    ],
    dtype=np.uint8,
)
ERROR_COLORS = {
    "correct_background": (0, 0, 0),
    "correct_foreground": (90, 90, 90),
    "false_positive": (230, 40, 40),
    "false_negative": (40, 90, 240),
    "wrong_class": (240, 210, 40),
}
OUTLINE_COLORS = {"truth": (60, 220, 255), "prediction": (255, 200, 0)}  # cyan, amber
SEPARATOR_PX = 2
MIN_PANEL_HEIGHT_PX = 160  # small tiles are enlarged (nearest neighbour) to at least this


def center_crop_hw(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Crop the last two axes of ``array`` around the center to ``height x width``."""
    full_h, full_w = array.shape[-2:]
    if height > full_h or width > full_w:
        raise ValueError(f"cannot center-crop {full_h}x{full_w} to the larger {height}x{width}")
    top, left = (full_h - height) // 2, (full_w - width) // 2
    return array[..., top : top + height, left : left + width]


def image_to_rgb(image: np.ndarray) -> np.ndarray:
    """A float image ``[C, H, W]`` (or volume ``[C, Z, Y, X]``; z-scored or not) as uint8 RGB
    ``[H, W, 3]`` (``[Z, Y, X, 3]``), contrast-stretched.

    One channel is shown as grey; three as RGB; other counts show channel 0.
    Each channel is stretched from its 1st to its 99th percentile (of the whole volume, so
    its slices share one scale).
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2:
        image = image[np.newaxis]
    channels = image[:3] if image.shape[0] == 3 else image[:1]
    spatial = tuple(range(1, channels.ndim))
    low = np.percentile(channels, 1, axis=spatial, keepdims=True)
    high = np.percentile(channels, 99, axis=spatial, keepdims=True)
    scaled = np.clip((channels - low) / np.maximum(high - low, 1e-6), 0.0, 1.0)
    rgb = np.moveaxis((scaled * 255.0 + 0.5).astype(np.uint8), 0, -1)
    return np.repeat(rgb, 3, axis=-1) if rgb.shape[-1] == 1 else rgb


def labels_to_rgb(labels: np.ndarray) -> np.ndarray:
    """Class map ``[H, W]`` -> RGB through ``PALETTE`` (classes past its end wrap around)."""
    return PALETTE[np.asarray(labels, dtype=np.int64) % len(PALETTE)]


def error_map(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """RGB map of where ``pred`` is right and how it is wrong (see ``ERROR_COLORS``)."""
    truth = np.asarray(truth)
    pred = np.asarray(pred)
    rgb = np.zeros((*truth.shape, 3), dtype=np.uint8)
    cases = {
        "correct_foreground": (truth == pred) & (truth > 0),
        "false_positive": (truth == 0) & (pred > 0),
        "false_negative": (truth > 0) & (pred == 0),
        "wrong_class": (truth > 0) & (pred > 0) & (truth != pred),
    }
    for name, where in cases.items():
        rgb[where] = ERROR_COLORS[name]
    return rgb


def outlines(instances: np.ndarray) -> np.ndarray:
    """Where an object meets another label (background or another object): its one-pixel rim."""
    instances = np.asarray(instances)
    edge = np.zeros(instances.shape, dtype=bool)
    vertical = instances[1:, :] != instances[:-1, :]
    horizontal = instances[:, 1:] != instances[:, :-1]
    edge[1:, :] |= vertical
    edge[:-1, :] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    return edge & (instances > 0)


def instance_overlay(image_rgb: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """The image with the true objects' outlines (cyan) and the predicted ones' (amber) drawn on it."""
    rgb = image_rgb.copy()
    rgb[outlines(truth)] = OUTLINE_COLORS["truth"]
    rgb[outlines(pred)] = OUTLINE_COLORS["prediction"]
    return rgb


def panel(
    image: np.ndarray,
    truth: np.ndarray,
    pred: np.ndarray,
    truth_instances: np.ndarray | None = None,
    pred_instances: np.ndarray | None = None,
) -> np.ndarray:
    """``image [C, H, W]``, ``truth``/``pred [h, w]`` -> one uint8 RGB strip: image | truth | pred | errors,
    and with the instance ids of both, a fifth part: the image with their outlines (:func:`instance_overlay`).

    ``h, w`` may be smaller than ``H, W`` (valid-conv models predict the center):
    the image is center-cropped to match. A volume (``image [C, Z, Y, X]``, maps ``[z, y, x]``)
    gives three such strips, one under the other: its central xy, xz and yz slices.
    """
    truth = np.asarray(truth)
    pred = np.asarray(pred)
    if truth.shape != pred.shape:
        raise ValueError(f"truth {truth.shape} and prediction {pred.shape} differ in shape")
    if truth.ndim == 3:
        return _volume_panel(np.asarray(image), truth, pred, truth_instances, pred_instances)
    height, width = truth.shape
    image = image_to_rgb(center_crop_hw(np.asarray(image), height, width))
    parts = [image, labels_to_rgb(truth), labels_to_rgb(pred), error_map(truth, pred)]
    if truth_instances is not None and pred_instances is not None:
        parts.append(instance_overlay(image, truth_instances, pred_instances))
    scale = max(1, -(-MIN_PANEL_HEIGHT_PX // height))
    if scale > 1:
        parts = [part.repeat(scale, axis=0).repeat(scale, axis=1) for part in parts]
    separator = np.full((height * scale, SEPARATOR_PX, 3), 128, dtype=np.uint8)
    strip = [parts[0]]
    for part in parts[1:]:
        strip += [separator, part]
    return np.concatenate(strip, axis=1)


def _center_crop(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Crop the trailing ``len(shape)`` axes of ``array`` around the center."""
    full = array.shape[array.ndim - len(shape) :]
    if any(want > have for want, have in zip(shape, full, strict=True)):
        raise ValueError(f"cannot center-crop {'x'.join(map(str, full))} to the larger {'x'.join(map(str, shape))}")
    window = tuple(slice((have - want) // 2, (have - want) // 2 + want) for want, have in zip(shape, full, strict=True))
    return array[(..., *window)]


def _central_slices(volume: np.ndarray) -> list[np.ndarray]:
    """The xy, xz and yz planes through the centre of a ``[Z, Y, X, ...]`` array."""
    depth, height, width = volume.shape[:3]
    return [volume[depth // 2], volume[:, height // 2], volume[:, :, width // 2]]


def _volume_panel(
    image: np.ndarray,
    truth: np.ndarray,
    pred: np.ndarray,
    truth_instances: np.ndarray | None,
    pred_instances: np.ndarray | None,
) -> np.ndarray:
    """:func:`panel` of a volume: one strip per central slice (xy, xz, yz), stacked."""
    image_rgb = image_to_rgb(_center_crop(image, truth.shape))  # one contrast for all three slices
    kinds = [image_rgb, labels_to_rgb(truth), labels_to_rgb(pred), error_map(truth, pred)]
    views = [_central_slices(kind) for kind in kinds]
    rows = [[view[plane] for view in views] for plane in range(3)]
    if truth_instances is not None and pred_instances is not None:
        outlined = zip(_central_slices(image_rgb), _central_slices(np.asarray(truth_instances)),
                       _central_slices(np.asarray(pred_instances)), strict=True)
        for row, (plane_rgb, plane_truth, plane_pred) in zip(rows, outlined, strict=True):
            row.append(instance_overlay(plane_rgb, plane_truth, plane_pred))
    scale = max(1, -(-MIN_PANEL_HEIGHT_PX // truth.shape[1]))  # as a 2-D tile of the xy plane
    width = max(part.shape[1] for row in rows for part in row) * scale
    strips = []
    for row in rows:
        parts = [part.repeat(scale, axis=0).repeat(scale, axis=1) for part in row]
        height = parts[0].shape[0]
        cells = []
        for part in parts:  # the yz plane is Y wide, the others X: every cell gets the widest
            cell = np.full((height, width, 3), 128, dtype=np.uint8)
            cell[:, : part.shape[1]] = part
            cells += [cell, np.full((height, SEPARATOR_PX, 3), 128, dtype=np.uint8)]
        strips += [np.concatenate(cells[:-1], axis=1)]
        strips += [np.full((SEPARATOR_PX, strips[-1].shape[1], 3), 128, dtype=np.uint8)]
    return np.concatenate(strips[:-1], axis=0)


def save_panels(
    step: int,
    image: np.ndarray,
    truth: np.ndarray,
    pred: np.ndarray,
    directory: Path,
    instances: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[tuple[int, Path]]:
    """Write ``directory/step-XXXXXXXX/tile-K.png`` for each tile; returns ``(K, path)`` pairs.

    ``image`` is ``[N, C, H, W]`` float, ``truth`` and ``pred`` are ``[N, h, w]`` class maps;
    ``instances``: the true and predicted instance ids ``[N, h, w]``, outlined on the image.
    Volumes: ``[N, C, Z, Y, X]`` and ``[N, z, y, x]`` (see :func:`panel`).
    """
    from PIL import Image

    image = np.asarray(image)
    truth = np.asarray(truth)
    pred = np.asarray(pred)
    if not (len(image) == len(truth) == len(pred)):
        raise ValueError(
            f"{len(image)} images, {len(truth)} truths and {len(pred)} predictions: expected as many"
        )
    step_dir = directory / f"step-{step:08d}"
    step_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index in range(len(image)):
        path = step_dir / f"tile-{index}.png"
        ids = (None, None) if instances is None else (instances[0][index], instances[1][index])
        Image.fromarray(panel(image[index], truth[index], pred[index], *ids)).save(path, compress_level=1)
        written.append((index, path))
    return written
