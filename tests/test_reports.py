"""unetdist.reports: overlay panels from real arrays, written as real PNGs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from unetdist.reports import (
    ERROR_COLORS,
    MIN_PANEL_HEIGHT_PX,
    OUTLINE_COLORS,
    PALETTE,
    error_map,
    panel,
    save_panels,
)


def test_error_map_colours_each_case():
    truth = np.array([[0, 0, 1, 1, 2]])
    pred = np.array([[0, 1, 0, 1, 1]])
    rgb = error_map(truth, pred)
    expected = ["correct_background", "false_positive", "false_negative", "correct_foreground", "wrong_class"]
    assert [tuple(rgb[0, i]) for i in range(5)] == [ERROR_COLORS[name] for name in expected]


def test_panel_crops_image_to_valid_output_and_enlarges_small_tiles():
    rng = np.random.default_rng(0)
    image = rng.standard_normal((1, 44, 44)).astype(np.float32)  # valid-conv input larger than output
    truth = np.zeros((20, 20), np.int64)
    truth[5:15, 5:15] = 1
    strip = panel(image, truth, truth)
    scale = -(-MIN_PANEL_HEIGHT_PX // 20)
    assert strip.dtype == np.uint8 and strip.shape == (20 * scale, 4 * 20 * scale + 3 * 2, 3)
    truth_part = strip[:, 20 * scale + 2 : 2 * 20 * scale + 2]
    assert tuple(truth_part[10 * scale, 10 * scale]) == tuple(PALETTE[1])
    assert tuple(truth_part[0, 0]) == tuple(PALETTE[0])
    error_part = strip[:, -20 * scale :]
    assert set(map(tuple, error_part.reshape(-1, 3))) <= {
        ERROR_COLORS["correct_background"],
        ERROR_COLORS["correct_foreground"],
    }


def test_panel_rejects_mismatched_maps():
    with pytest.raises(ValueError, match="differ in shape"):
        panel(np.zeros((1, 8, 8)), np.zeros((8, 8)), np.zeros((6, 6)))


def test_save_panels_writes_one_png_per_tile(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.standard_normal((3, 3, 32, 32)).astype(np.float32)  # RGB input
    truth = rng.integers(0, 3, (3, 32, 32))
    pred = rng.integers(0, 3, (3, 32, 32))
    written = save_panels(40, image, truth, pred, tmp_path)
    assert [index for index, _ in written] == [0, 1, 2]
    for _, path in written:
        assert path.parent.name == "step-00000040"
        with Image.open(path) as png:
            assert png.mode == "RGB" and png.size[1] >= MIN_PANEL_HEIGHT_PX


def test_panel_with_instances_outlines_true_and_predicted_objects():
    image = np.zeros((1, 20, 20), np.float32)
    truth = np.zeros((20, 20), np.int64)
    truth[2:8, 2:8], truth[2:8, 8:14] = 1, 2  # two touching objects
    pred = np.zeros_like(truth)
    pred[2:8, 2:14] = 1  # predicted as one: no rim between them
    classes = (truth > 0).astype(np.int64)
    strip = panel(image, classes, classes, truth, pred)
    scale = -(-MIN_PANEL_HEIGHT_PX // 20)
    assert strip.shape[1] == 5 * 20 * scale + 4 * 2
    overlay = strip[::scale, 4 * (20 * scale + 2) :: scale]
    cyan, amber = OUTLINE_COLORS["truth"], OUTLINE_COLORS["prediction"]
    assert tuple(overlay[4, 7]) == cyan and tuple(overlay[4, 8]) == cyan  # the true rim between the two
    assert tuple(overlay[2, 5]) == amber  # the predicted outer rim is drawn over the true one
    assert tuple(overlay[5, 5]) == (0, 0, 0)  # inside: the (black) image
    assert tuple(overlay[15, 15]) == (0, 0, 0)
