"""unetdist.redaction: no credential in a URL is ever written or logged, the live process still uses it.

The pure rules first (userinfo, secret query parameters, text without URLs left alone),
then the config and logging hooks, then a real training job (a real MLflow server, real
shards, a checkpoint and a resume) whose every written byte is searched for the secrets.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import tiny_run_overrides

from unetdist.config import Config, ConfigError, DataConfig, TrackingConfig, save_config
from unetdist.redaction import (
    REDACTED,
    credentials_warning,
    keys_with_credentials,
    redact,
    redact_log_records,
    redact_params,
    redact_values,
)

# --- the rules ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://alice:s3cr3t@127.0.0.1:5000", "http://***@127.0.0.1:5000"),
        ("https://alice:s3cr3t@mlflow.example.org/base?x=1", "https://***@mlflow.example.org/base?x=1"),
        ("https://ghp_t0ken@github.com/org/repo.git", "https://***@github.com/org/repo.git"),  # token as user
        ("http://alice:p@ss@127.0.0.1:5/api", "http://***@127.0.0.1:5/api"),  # split at the last @, as urllib
        # Azure's user part is the container: kept, unless a password follows it
        ("abfss://container@acct.dfs.core.windows.net/x", "abfss://container@acct.dfs.core.windows.net/x"),
        ("abfss://container:k3y@acct.dfs.core.windows.net/x", "abfss://***@acct.dfs.core.windows.net/x"),
    ],
)
def test_userinfo_is_redacted(url, expected):
    assert redact(url) == expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "s3://bucket/train-{000..009}.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F2025"
            "&X-Amz-Date=20250101T000000Z&X-Amz-Security-Token=IQo%2Bb3==&X-Amz-Signature=9f8e7d",
            "s3://bucket/train-{000..009}.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***"
            "&X-Amz-Date=20250101T000000Z&X-Amz-Security-Token=***&X-Amz-Signature=***",
        ),
        (
            "https://acct.blob.core.windows.net/c/data.zarr?sv=2024-05-04&se=2025-01-01&sp=rl&sig=AbC%2Fd%3D",
            "https://acct.blob.core.windows.net/c/data.zarr?sv=2024-05-04&se=2025-01-01&sp=rl&sig=***",
        ),
        (
            "gs://b/x.tar?X-Goog-Credential=sa%40p&X-Goog-Signature=abc&generation=7",
            "gs://b/x.tar?X-Goog-Credential=***&X-Goog-Signature=***&generation=7",
        ),
        ("https://h/api?token=t0k&page=2&api_key=k3y", "https://h/api?token=***&page=2&api_key=***"),
        ("https://h/cb#access_token=t0k&state=1", "https://h/cb#access_token=***&state=1"),
        ("https://h/x?password=", "https://h/x?password="),  # nothing to hide
    ],
)
def test_secret_query_values_are_redacted(url, expected):
    assert redact(url) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "runs/default",
        "/data/cells/train-{000000..000003}.tar",
        "/data/odd?token=not-a-url",  # a local path, however odd
        "sqlite:////tmp/mlflow.db",
        "http://127.0.0.1:5000",
        "s3://bucket/prefix/data.zarr?versionId=3",
        "alice@example.org wrote this",
        "pipe:cat /data/x.tar",
    ],
)
def test_text_without_credentials_is_untouched(text):
    assert redact(text) == text


def test_each_url_of_a_list_or_message_is_redacted():
    shards = "file://bob:pw1@/d/a.tar?sig=s1::https://u:pw2@h/b.tar?token=s2"
    assert redact(shards) == "file://***@/d/a.tar?sig=***::https://***@h/b.tar?token=***"
    message = "request to http://alice:pw3@127.0.0.1:9/api/2.0/x failed; see https://h/?next=https://u:pw4@b/"
    assert redact(message) == (
        "request to http://***@127.0.0.1:9/api/2.0/x failed; see https://h/?next=https://***@b/"
    )
    assert redact(redact(shards)) == redact(shards), "redacting twice changes nothing"


def test_nested_values_params_and_the_warning():
    nested = {"a": ["http://u:p@h", 3, ("s3://b/k?sig=x",)], "b": {"c": None, "d": "plain"}}
    expected = {"a": ["http://***@h", 3, ("s3://b/k?sig=***",)], "b": {"c": None, "d": "plain"}}
    assert redact_values(nested) == expected
    assert redact_params({"db.password": "hunter2", "data.root": "http://u:p@h/x", "n": "1"}) == {
        "db.password": REDACTED, "data.root": "http://***@h/x", "n": "1",
    }  # fmt: skip
    flat = {"tracking.tracking_uri": "http://u:p@h", "data.root": "/d", "train.max_steps": 3}
    assert keys_with_credentials(flat) == ["tracking.tracking_uri"]
    line = credentials_warning(["tracking.tracking_uri"])
    assert "\n" not in line and line.startswith("tracking.tracking_uri: ")
    assert "MLFLOW_TRACKING_USERNAME" in line and "MLFLOW_TRACKING_TOKEN" in line and "AWS_" in line


# --- config and logging ---------------------------------------------------------


def test_config_is_written_redacted_and_used_live(tmp_path):
    def config(signature: str) -> Config:
        return Config(
            data=DataConfig(root=str(tmp_path), val_shards=f"s3://b/val.tar?X-Amz-Signature={signature}"),
            tracking=TrackingConfig(tracking_uri="http://alice:s3cr3t@127.0.0.1:5000"),
        )

    first = config("sig-one")
    assert first.tracking.tracking_uri == "http://alice:s3cr3t@127.0.0.1:5000", "the live value is untouched"
    assert first.to_dict()["tracking"]["tracking_uri"] == "http://***@127.0.0.1:5000"
    assert first.to_dict()["data"]["val_shards"] == "s3://b/val.tar?X-Amz-Signature=***"
    save_config(first, tmp_path / "config.yaml")
    written = (tmp_path / "config.yaml").read_text()
    assert "s3cr3t" not in written and "sig-one" not in written and "127.0.0.1:5000" in written
    # a re-signed URL (new signature every job) is the same config: resume compares digests
    assert config("sig-two").digest() == first.digest()
    assert Config(data=DataConfig(root=str(tmp_path))).digest() != first.digest()


def test_config_error_messages_are_redacted():
    error = ConfigError("data.zarr_store='https://u:s3cr3t@h/x.zarr?sig=s1gn': expected a Zarr store")
    assert str(error) == "data.zarr_store='https://***@h/x.zarr?sig=***': expected a Zarr store"


def test_log_records_and_uncaught_errors_are_redacted(capsys):
    previous, previous_hook = logging.getLogRecordFactory(), sys.excepthook
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("test_redaction.third_party")
    logger.addHandler(handler)
    try:
        redact_log_records()
        redact_log_records()  # idempotent: one layer of redaction
        logger.warning("connecting to %s", "http://alice:s3cr3t@127.0.0.1:9")
        try:
            raise ConnectionError("API request to http://alice:s3cr3t@127.0.0.1:9/api failed")
        except ConnectionError:
            logger.exception("request failed")
        logger.warning("%d%% done, no URL here", 50)
        try:
            raise OSError("cannot open s3://b/x.zarr?X-Amz-Signature=s1gn3d")
        except OSError as error:
            sys.excepthook(type(error), error, error.__traceback__)  # what Python does with an uncaught one
    finally:
        logger.removeHandler(handler)
        logging.setLogRecordFactory(previous)
        sys.excepthook = previous_hook
    text = stream.getvalue()
    assert "s3cr3t" not in text
    assert "connecting to http://***@127.0.0.1:9" in text
    assert "ConnectionError: API request to http://***@127.0.0.1:9/api failed" in text
    assert "50% done, no URL here" in text
    uncaught = capsys.readouterr().err
    assert "Traceback" in uncaught and "OSError: cannot open s3://b/x.zarr?X-Amz-Signature=***" in uncaught


# --- a real job -------------------------------------------------------------------

SECRETS = ("s3cr3t-PW", "sh4rd-PW", "sig-s3cr3t-0123", "sig-s3cr3t-4567", "AKIAS3CR3T")


def _written_bytes(root: Path):
    """(path, bytes) of every file under ``root``, and of every member of the zip files (torch.save's)."""
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        yield path, data
        if zipfile.is_zipfile(io.BytesIO(data)):
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                for name in archive.namelist():
                    yield Path(f"{path}!{name}"), archive.read(name)


@pytest.mark.slow
def test_no_secret_is_written_by_a_real_job_and_resume_works(
    cell_shards, tmp_path, mlflow_server, mlflow_server_process
):
    """A password in the tracking URI and a presigned-style val shard URL (``file://`` with userinfo
    and X-Amz-* query parameters, which the tar source opens as the local file): the job trains,
    validates, checkpoints, lands in MLflow and resumes with a re-signed URL, and no file, no log
    line and nothing on the server holds a secret."""
    from mlflow import MlflowClient

    # basic auth in the URI: MLflow sends it, a server without auth ignores it
    secret_uri = mlflow_server.replace("http://", "http://alice:s3cr3t-PW@")
    val_shard = cell_shards / json.loads((cell_shards / "dataset.json").read_text())["val_shards"][0]

    def val_url(signature: str) -> str:
        query = f"X-Amz-Credential=AKIAS3CR3T%2F2025&X-Amz-Signature={signature}"
        return f"file://bob:sh4rd-PW@{val_shard}?{query}"

    output_dir, cwd = tmp_path / "run", tmp_path / "cwd"
    cwd.mkdir()
    common = tiny_run_overrides(cell_shards, output_dir, secret_uri) + [
        "train.val_every=2", "train.val_max_batches=1", "checkpoint.every=2", "tracking.image_every=2",
        "tracking.num_images=1", "tracking.log_checkpoints=all", "tracking.experiment=no-secrets",
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_TRACKING_URI": ""}
    streams = []
    for args in (
        # the first job logs no model (quicker); the resumed one does, so MLmodel files are searched too
        [*common, f"data.val_shards={val_url('sig-s3cr3t-0123')}", "train.max_steps=4",
         "tracking.log_model=false"],
        [*common, f"data.val_shards={val_url('sig-s3cr3t-4567')}", "train.max_steps=6", "--resume", "auto"],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "unetdist.train", *args],
            capture_output=True, text=True, timeout=300, cwd=cwd, env=env,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-4000:]
        streams.append(result.stdout + result.stderr)
    assert "resuming from" in streams[1], "a re-signed URL with the same password resumes"
    assert "already logged" not in streams[1], streams[1][-3000:]
    assert "pass them by environment variables instead" in streams[0]
    assert "data.val_shards, tracking.tracking_uri: credentials in a URL" in streams[0]

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("no-secrets").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.params["tracking.tracking_uri"] == mlflow_server.replace("http://", "http://***@")
    assert run.data.params["data.val_shards"] == (
        f"file://***@{val_shard}?X-Amz-Credential=***&X-Amz-Signature=***"
    )
    assert run.data.params["checkpoint.resume"] == "never"
    assert run.data.tags["attempt.checkpoint.resume"] == "auto", "a setting a resumed job changed: a tag"
    assert sorted({m.step for m in client.get_metric_history(run.info.run_id, "val/loss")}) == [2, 4, 6]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert "checkpoints/step-00000006" in artifacts

    searched = 0
    for root in (output_dir, cwd, mlflow_server_process.state_dir):
        for path, data in _written_bytes(root):
            searched += 1
            for secret in SECRETS:
                assert secret.encode() not in data, f"{secret} written to {path}"
    for secret in SECRETS:
        assert all(secret not in text for text in streams), f"{secret} in the job's output"
    assert searched > 20
    assert any((output_dir / "checkpoints").rglob("trainer.pt"))
