"""Scoring predictions: foreground Dice/IoU, one-to-one instance matching, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tifffile

from unetdist.evaluate import Counts, main, match_instances, score_image


def test_match_instances_counts_tp_fp_fn() -> None:
    truth = np.zeros((10, 20), np.uint16)
    truth[1:5, 1:5] = 1  # matched (IoU 1)
    truth[1:5, 10:14] = 2  # half covered: IoU 0.5 -> matched at >= 0.5
    truth[6:9, 1:4] = 3  # missed
    pred = np.zeros_like(truth)
    pred[1:5, 1:5] = 7
    pred[1:5, 10:12] = 9
    pred[6:9, 15:18] = 4  # spurious
    assert match_instances(pred, truth) == (2, 1, 1)
    scores = score_image(pred, truth).scores()
    assert scores["ap"] == 2 / 4 and scores["precision"] == 2 / 3 and scores["recall"] == 2 / 3
    assert Counts().scores()["dice"] == 1.0  # nothing predicted, nothing there


def test_cli_writes_json_and_names_failures(tmp_path: Path) -> None:
    pred, truth = tmp_path / "pred", tmp_path / "truth"
    pred.mkdir()
    truth.mkdir()
    cells = np.zeros((16, 16), np.uint16)
    cells[2:6, 2:6], cells[8:12, 8:12] = 1, 2
    tifffile.imwrite(truth / "a.tif", cells)
    tifffile.imwrite(pred / "a_mask.tif", (cells > 0).astype(np.uint8))  # instances by components
    tifffile.imwrite(pred / "orphan_mask.tif", np.zeros((16, 16), np.uint8))  # no truth
    assert main(["--pred", str(pred), "--truth", str(truth)]) == 2
    result = json.loads((pred / "evaluation.json").read_text())
    assert result["images"]["a"]["dice"] == 1.0 and result["overall"]["ap"] == 1.0
    assert any("orphan_mask.tif" in name for name in result["failures"])
