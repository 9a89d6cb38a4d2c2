"""Scoring predictions: foreground Dice/IoU, one-to-one instance matching, AP at IoU 0.5:0.95, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
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


def test_colour_truth_is_named_and_binary_255_truth_warned(tmp_path: Path, capsys, caplog) -> None:
    from PIL import Image

    pred, truth = tmp_path / "pred", tmp_path / "truth"
    pred.mkdir()
    truth.mkdir()
    cells = np.zeros((16, 16), np.uint8)
    cells[2:6, 2:6], cells[8:12, 8:12] = 1, 1  # two cells of one 0/1 prediction
    Image.fromarray(np.stack([cells * 255] * 3, axis=-1)).save(truth / "rgb.png")
    Image.fromarray(cells * 255).save(truth / "binary.png")
    for stem in ("rgb", "binary"):
        tifffile.imwrite(pred / f"{stem}_mask.tif", cells)
    with caplog.at_level("WARNING", logger="unetdist.evaluate"):
        assert main(["--pred", str(pred), "--truth", str(truth)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0].startswith(
        f"evaluate: failed: {pred / 'rgb_mask.tif'}: {truth / 'rgb.png'}: a colour image "
        "(shape (16, 16, 3)); label images are single-channel HxW integers"
    )
    assert "Traceback" not in err
    (warning,) = caplog.messages
    assert warning.startswith(f"{truth / 'binary.png'}: labels 0/255, a binary mask")
    assert "--truth-kind classes" in warning
    assert main(["--pred", str(pred), "--truth", str(truth), "--truth-kind", "classes"]) == 2
    result = json.loads((pred / "evaluation.json").read_text())
    assert result["images"]["binary"]["ap"] == 1.0  # two components, two cells


def test_ap_at_iou_050_to_095_per_image_and_overall(tmp_path: Path, capsys) -> None:
    pred, truth = tmp_path / "pred", tmp_path / "truth"
    pred.mkdir()
    truth.mkdir()
    cells = np.zeros((16, 16), np.uint16)
    cells[0:4, 0:4], cells[0:4, 8:12], cells[8:12, 0:4] = 1, 2, 3
    partial = np.zeros_like(cells)
    partial[0:4, 0:4] = 5  # IoU 1
    partial[0:3, 8:12] = 6  # 12 of 16 px: IoU 0.75; cell 3 missed
    for stem, prediction in (("a", partial), ("b", cells)):
        tifffile.imwrite(truth / f"{stem}.tif", cells)
        tifffile.imwrite(pred / f"{stem}_instances.tif", prediction)
    assert main(["--pred", str(pred), "--truth", str(truth)]) == 0
    result = json.loads((pred / "evaluation.json").read_text())
    a, b, overall = result["images"]["a"], result["images"]["b"], result["overall"]
    # up to IoU 0.75: tp 2, fp 0, fn 1; from 0.8: tp 1, fp 1 (the partial cell), fn 2
    assert [a[f"ap{p}"] for p in range(50, 100, 5)] == [2 / 3] * 6 + [1 / 4] * 4
    assert a["ap"] == a["ap50"] and a["ap_50_95"] == pytest.approx(0.5)
    assert b["ap_50_95"] == 1.0
    assert overall["ap75"] == 5 / 6 and overall["ap80"] == 4 / 7  # from the counts summed over images
    assert overall["ap_50_95"] == pytest.approx((6 * 5 / 6 + 4 * 4 / 7) / 10)
    assert overall["mean_image_ap_50_95"] == pytest.approx(0.75)
    assert overall["iou_thresholds"][0] == 0.5 and len(overall["iou_thresholds"]) == 10
    table = capsys.readouterr().out
    assert "ap_50_95" in table.splitlines()[0] and "AP at IoU 0.5:0.05:0.95 0.7286" in table
