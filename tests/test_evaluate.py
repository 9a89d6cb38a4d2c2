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
