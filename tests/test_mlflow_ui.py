"""The MLflow UI shows a unetdist run: headless Chromium screenshots of the run page and its charts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from services.browser import BrowserError, find_chromium, screenshot

from unetdist.config import Config, DataConfig, TrackingConfig, TrainConfig
from unetdist.distributed import DistributedContext
from unetdist.tracking.run_outputs import RunOutputs

pytestmark = pytest.mark.slow

RUN_NAME = "ui-check-run"


@pytest.fixture
def logged_run(mlflow_server, tmp_path) -> tuple[str, str]:
    config = Config(
        data=DataConfig(root=str(tmp_path / "data"), tile_size=32),
        train=TrainConfig(output_dir=str(tmp_path / "run"), progress=False),
        tracking=TrackingConfig(
            tracking_uri=mlflow_server, experiment="ui", run_name=RUN_NAME, image_every=10
        ),
    )
    ctx = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
    outputs = RunOutputs.open(config, ctx, 0, None)
    rng = np.random.default_rng(0)
    for step in range(1, 41):
        outputs.tracker.log_metrics({"train/loss": 1.0 / step, "train/lr": 1e-3}, step=step)
        if step % 10 == 0:
            outputs.tracker.log_metrics({"val/dice_class1": step / 40, "val/fg_dice": step / 45}, step=step)
            image = rng.standard_normal((2, 1, 32, 32)).astype(np.float32)
            truth = (image[:, 0] > 0).astype(np.int64)
            outputs.log_val_panels(step, image, truth, (image[:, 0] > 0.3).astype(np.int64))
    outputs.close("FINISHED")
    return outputs.tracker.experiment_id, outputs.tracker.run_id


def test_run_page_and_charts_render(mlflow_server, logged_run, tmp_path):
    try:
        find_chromium()
    except BrowserError as error:
        pytest.skip(str(error))
    experiment_id, run_id = logged_run
    base = f"{mlflow_server}/#/experiments/{experiment_id}/runs/{run_id}"
    query = "?workflowType=machine_learning"  # a fresh profile would open the GenAI view

    overview = screenshot(f"{base}{query}", tmp_path / "run.png", size=(1280, 1300))
    assert RUN_NAME in overview.dom
    assert "train/loss" in overview.dom and "val/dice_class1" in overview.dom
    assert not overview.is_blank()

    charts = screenshot(f"{base}/model-metrics{query}", tmp_path / "metrics.png", size=(1400, 1400))
    for name in ("train/loss", "val/dice_class1", "val/fg_dice"):
        assert name in charts.dom, name
    assert "val/panel_0" in charts.dom, "the image series of the overlay panels"
    assert not charts.is_blank()
    print(f"screenshots: {overview.png} {charts.png}")
