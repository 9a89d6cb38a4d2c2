"""Instance scores while training: val/ap50, ap75, ap90 from the validation tiles, and the decoding
tuned on the last validation, stored in the checkpoint and the logged model."""

from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import numpy as np
import torch
from conftest import REPO_ROOT, tiny_run_overrides

from unetdist import checkpoint as ckpt
from unetdist.data.synthetic import synthetic_cells
from unetdist.instance_targets import boundary_classes
from unetdist.instance_validation import InstanceValidation, ap_metrics, tune_decoding
from unetdist.instances import DecodeParams


def _exact_logits(instances: np.ndarray) -> torch.Tensor:
    """Logits whose softmax is (almost) the one-hot boundary classes of ``instances``."""
    classes = torch.from_numpy(boundary_classes(instances, 1).astype(np.int64))
    return torch.nn.functional.one_hot(classes, 3).permute(2, 0, 1).float()[None] * 20.0


def test_exact_predictions_score_ap_one_and_tuning_sums_over_ranks():
    rng = np.random.default_rng(0)
    tiles = [synthetic_cells(96, rng)[1].astype(np.int64) for _ in range(3)]
    scores = InstanceValidation(DecodeParams(target="boundary", min_size=4), keep_for_tuning=True)
    for truth in tiles:
        predicted = scores.add(_exact_logits(truth), torch.from_numpy(truth)[None])
        assert predicted.shape == (1, 96, 96) and predicted.max() > 5
    assert ap_metrics(scores.counts)["val/ap50"] == 1.0
    assert set(ap_metrics(scores.counts)) == {"val/ap50", "val/ap75", "val/ap90"}

    ranks_summed = []  # as two ranks would: the counts of the grid are summed, then the best is chosen

    def twice(counts: torch.Tensor) -> torch.Tensor:
        ranks_summed.append(counts.clone())
        return counts * 2

    params, ap = tune_decoding(scores, "boundary", twice)
    assert ap == 1.0 and params.target == "boundary"
    assert ranks_summed and ranks_summed[0].ndim == 2 and ranks_summed[0].shape[1] == 3


def test_a_boundary_run_logs_instance_ap_and_stores_the_tuned_decoding(tmp_path, cell_shards, local_mlflow_store):
    output_dir = tmp_path / "run"
    overrides = tiny_run_overrides(cell_shards, output_dir, local_mlflow_store) + [
        "loss.target=boundary", "model.num_classes=3", "loss.use_weight_map=false",
        "train.max_steps=20", "train.val_every=10", "tracking.image_every=10", "tracking.num_images=1",
    ]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "unetdist.train", *overrides], capture_output=True, text=True,
                          timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-4000:]

    client = mlflow.MlflowClient(local_mlflow_store)
    run = client.search_runs([client.get_experiment_by_name("tests").experiment_id])[0]
    for key in ("val/ap50", "val/ap75", "val/ap90"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert [step for step, _ in history] == [10, 20]
        assert all(0.0 <= value <= 1.0 for _, value in history)
    tuned = client.get_metric_history(run.info.run_id, "val/tuned_ap50")
    assert [m.step for m in tuned] == [20]  # tuned once, on the last validation
    assert tuned[0].value >= run.data.metrics["val/ap50"]  # the defaults are one point of the grid

    state = ckpt.load_checkpoint(ckpt.latest_good_checkpoint(output_dir / "checkpoints"))
    decoding = DecodeParams.from_dict(state["decoding"])
    assert decoding.target == "boundary"
    unet_json = json.loads(next((output_dir / "mlflow-model" / "final").glob("unet.json")).read_text())
    assert unet_json["decoding"] == state["decoding"]
    # the panels outline the instances: a fifth part beside image | truth | prediction | errors
    panels = sorted((output_dir / "val_panels").glob("step-*/tile-0.png"))
    assert len(panels) == 2
