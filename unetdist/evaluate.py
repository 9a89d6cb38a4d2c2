"""Score predictions against ground truth: foreground Dice/IoU and instance matching.

    python -m unetdist.evaluate --pred out/ --truth data/cells/raw/masks [--json scores.json]

Predictions are matched to truth files by stem: ``<stem>_mask.tif`` (class labels, from
``unetdist.predict``) and, when present, ``<stem>_instances.tif``; without an instances
file the instances are the connected components of the predicted foreground. Truth files
``<stem>.tif/.tiff/.png`` hold instance labels (0 background), as ``unetdist.prepare``
takes them (``--truth-kind classes`` for class masks: instances then by components).

Per image and overall: foreground Dice and IoU (overall: from the summed pixel counts), and
instances matched one-to-one at IoU >= 0.5 (:mod:`unetdist.instance_metrics`, StarDist's
matching): precision TP/(TP+FP), recall TP/(TP+FN), F1, and the DSB2018-style
AP = TP/(TP+FP+FN) (overall: from the summed counts, plus the mean of the per-image APs).
The same AP at each IoU threshold 0.5:0.05:0.95 (``ap50``, ``ap55``, ... ``ap95``) and their
mean ``ap_50_95`` (COCO's summary; overall: from the counts summed per threshold, plus
``mean_image_ap_50_95``). Prints a table and writes JSON (default ``<pred>/evaluation.json``).
Exit codes: 0 done; 2 bad input (each failing file is named; the rest are still scored).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from unetdist.instance_metrics import COCO_IOU_THRESHOLDS, ap_names, average_precision, match_counts

log = logging.getLogger(__name__)

MATCH_IOU = 0.5
SUFFIXES = (".tif", ".tiff", ".png")
MASK_SUFFIX = "_mask"
INSTANCES_SUFFIX = "_instances"


class EvaluationError(ValueError):
    """A prediction or truth file that cannot be scored; the message names it."""


# ---------------------------------------------------------------- pure scoring


@dataclass(frozen=True)
class Counts:
    """Pixel and instance counts of one image; they add up over images."""

    intersection: int = 0
    pred_pixels: int = 0
    truth_pixels: int = 0
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(*(a + b for a, b in zip(astuple_counts(self), astuple_counts(other), strict=True)))

    def scores(self) -> dict[str, float | int]:
        union = self.pred_pixels + self.truth_pixels - self.intersection
        return {
            "dice": _ratio(2 * self.intersection, self.pred_pixels + self.truth_pixels),
            "iou": _ratio(self.intersection, union),
            "precision": _ratio(self.tp, self.tp + self.fp),
            "recall": _ratio(self.tp, self.tp + self.fn),
            "f1": _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn),
            "ap": _ratio(self.tp, self.tp + self.fp + self.fn),
            **asdict(self),
        }


def astuple_counts(counts: Counts) -> tuple[int, ...]:
    return (counts.intersection, counts.pred_pixels, counts.truth_pixels, counts.tp, counts.fp, counts.fn)


def _ratio(numerator: int, denominator: int) -> float:
    # Both empty (no foreground / no instances anywhere): a perfect agreement, not 0/0.
    return 1.0 if denominator == 0 else numerator / denominator


def match_instances(
    pred: np.ndarray, truth: np.ndarray, threshold: float = MATCH_IOU
) -> tuple[int, int, int]:
    """(TP, FP, FN) of a one-to-one matching of instance ids at IoU >= ``threshold``
    (:func:`unetdist.instance_metrics.match_counts`: the most matches, as StarDist counts them)."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} != truth shape {truth.shape}")
    tp, fp, fn = match_counts(truth, pred, (threshold,))[0]
    return int(tp), int(fp), int(fn)


def score_image(pred_instances: np.ndarray, truth_instances: np.ndarray) -> Counts:
    """Counts of one image from instance labels (foreground = id > 0)."""
    return _counts(pred_instances, truth_instances, match_instances(pred_instances, truth_instances))


def _counts(pred_instances: np.ndarray, truth_instances: np.ndarray, matches: tuple[int, int, int]) -> Counts:
    pred_fg, truth_fg = pred_instances > 0, truth_instances > 0
    tp, fp, fn = matches
    return Counts(
        intersection=int((pred_fg & truth_fg).sum()),
        pred_pixels=int(pred_fg.sum()),
        truth_pixels=int(truth_fg.sum()),
        tp=tp,
        fp=fp,
        fn=fn,
    )


def coco_scores(counts: np.ndarray) -> dict[str, float]:
    """``{"ap50": ..., "ap55": ..., "ap95": ..., "ap_50_95": mean}`` of [10, 3] (tp, fp, fn) counts
    at ``COCO_IOU_THRESHOLDS``."""
    values = average_precision(counts)
    per_threshold = dict(zip(ap_names(COCO_IOU_THRESHOLDS), values.tolist(), strict=True))
    return {**per_threshold, "ap_50_95": float(values.mean())}


# ---------------------------------------------------------------- files


def _read(path: Path) -> np.ndarray:
    from unetdist.data.imageio import is_channels_last, read_array

    try:
        array = read_array(path)
    except ValueError as err:
        raise EvaluationError(str(err)) from err
    if is_channels_last(array.shape):  # what predict and prepare take for a colour picture
        raise EvaluationError(
            f"{path}: a colour image (shape {array.shape}); label images are single-channel HxW "
            "integers (save the labels as a grey image)"
        )
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise EvaluationError(
            f"{path}: expected an HxW integer label image, got shape {array.shape} {array.dtype}"
        )
    return array


def _components(labels: np.ndarray) -> np.ndarray:
    return ndimage.label(labels > 0, structure=np.ones((3, 3), dtype=bool))[0]


def _by_stem(folder: Path, suffix: str = "") -> dict[str, Path]:
    found = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in SUFFIXES and path.stem.endswith(suffix):
            found[path.stem[: len(path.stem) - len(suffix)] if suffix else path.stem] = path
    return found


def evaluate_folders(pred_dir: Path, truth_dir: Path, truth_kind: str = "instances") -> dict:
    """Scores of every prediction in ``pred_dir`` against ``truth_dir``; see the module docstring.

    Returns ``{"images": {stem: scores}, "overall": scores, "failures": {file: message}}``.
    """
    for folder in (pred_dir, truth_dir):
        if not folder.is_dir():
            raise EvaluationError(f"{folder}: not a folder")
    masks = _by_stem(pred_dir, MASK_SUFFIX)
    instance_files = _by_stem(pred_dir, INSTANCES_SUFFIX)
    truths = _by_stem(truth_dir)
    stems = sorted(set(masks) | set(instance_files))
    if not stems:
        raise EvaluationError(
            f"{pred_dir}: no <stem>{MASK_SUFFIX}.tif or <stem>{INSTANCES_SUFFIX}.tif predictions"
        )
    images: dict[str, dict] = {}
    failures: dict[str, str] = {}
    total = Counts()
    total_coco = np.zeros((len(COCO_IOU_THRESHOLDS), 3), dtype=np.int64)
    for stem in stems:
        source = instance_files.get(stem, masks.get(stem))
        try:
            if stem not in truths:
                raise EvaluationError(
                    f"{source}: no truth file {stem}{{{','.join(SUFFIXES)}}} in {truth_dir}"
                )
            truth = _read(truths[stem])
            pred = _read(source)
            if stem not in instance_files:
                pred = _components(pred)
            if truth_kind == "classes":
                truth = _components(truth)
            elif truth.size and truth.max() == 255 and set(np.unique(truth).tolist()) <= {0, 255}:
                log.warning(
                    "%s: labels 0/255, a binary mask: its foreground is scored as one instance; "
                    "use --truth-kind classes to split it into connected components",
                    truths[stem],
                )
            if pred.shape != truth.shape:
                raise EvaluationError(
                    f"{source}: shape {pred.shape} != truth {truths[stem]} shape {truth.shape}"
                )
            try:
                coco = match_counts(truth, pred, COCO_IOU_THRESHOLDS)
            except ValueError as err:  # negative ids
                raise EvaluationError(f"{source} against {truths[stem]}: {err}") from err
            tp, fp, fn = coco[COCO_IOU_THRESHOLDS.index(MATCH_IOU)].tolist()
            counts = _counts(pred, truth, (tp, fp, fn))
        except EvaluationError as err:
            failures[str(source)] = str(err)
            continue
        images[stem] = {
            **counts.scores(),
            **coco_scores(coco),
            "instances_from": "instances file" if stem in instance_files else "connected components",
        }
        total = total + counts
        total_coco += coco
    per_image_ap = [scores["ap"] for scores in images.values()]
    overall = {
        **total.scores(),
        **coco_scores(total_coco),
        "images": len(images),
        "mean_image_ap": float(np.mean(per_image_ap)) if per_image_ap else math.nan,
        "mean_image_ap_50_95": (
            float(np.mean([s["ap_50_95"] for s in images.values()])) if images else math.nan
        ),
        "mean_image_dice": float(np.mean([s["dice"] for s in images.values()])) if images else math.nan,
        "match_iou": MATCH_IOU,
        "iou_thresholds": list(COCO_IOU_THRESHOLDS),
    }
    return {"images": images, "overall": overall, "failures": failures}


def format_table(result: dict) -> str:
    columns = ("dice", "iou", "precision", "recall", "f1", "ap", "ap75", "ap_50_95")
    header = f"{'image':<28}" + "".join(f"{name:>10}" for name in columns) + f"{'tp/fp/fn':>16}"
    lines = [header]
    rows = [*result["images"].items(), ("OVERALL", result["overall"])]
    for stem, scores in rows:
        counts = f"{scores['tp']}/{scores['fp']}/{scores['fn']}"
        lines.append(f"{stem:<28}" + "".join(f"{scores[name]:>10.4f}" for name in columns) + f"{counts:>16}")
    lines.append(
        f"mean per-image AP {result['overall']['mean_image_ap']:.4f} "
        f"(instances matched at IoU >= {MATCH_IOU}); "
        f"AP at IoU 0.5:0.05:0.95 {result['overall']['ap_50_95']:.4f} (mean per image "
        f"{result['overall']['mean_image_ap_50_95']:.4f})"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unetdist.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--pred", type=Path, required=True, help="folder written by unetdist.predict")
    parser.add_argument("--truth", type=Path, required=True, help="folder of truth label images, same stems")
    parser.add_argument("--truth-kind", choices=("instances", "classes"), default="instances")
    parser.add_argument(
        "--json", type=Path, help="where to write the scores (default <pred>/evaluation.json)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = evaluate_folders(args.pred, args.truth, args.truth_kind)
    except EvaluationError as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 2
    out = args.json or args.pred / "evaluation.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    print(f"scores written to {out}")
    for source, message in result["failures"].items():
        print(f"evaluate: failed: {source}: {message}", file=sys.stderr)
    return 2 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
