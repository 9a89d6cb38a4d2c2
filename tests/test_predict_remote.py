"""``predict`` with Zarr inputs and outputs at ``s3://`` URLs, against a real S3 server on 127.0.0.1
(tests/services/s3_server.py): the outputs equal a local run's bitwise, from one process and from
two torchrun ranks writing their own blocks; missing inputs, buckets and credentials are one line
and exit 2."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from unetdist.data import remote
from unetdist.inference.cli import main
from unetdist.model import build_unet

BUCKET = "unetdist-predict"
OPTIONS = ["--tile", "64", "--block", "96", "--probabilities", "--device", "cpu"]
OUTPUTS = ("big_mask.zarr", "big_prob.zarr")


@pytest.fixture(scope="module")
def local_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny padded U-Net checkpoint, a 200x260 Zarr image (several output blocks) and a TIFF."""
    import zarr

    folder = tmp_path_factory.mktemp("predict-remote")
    torch.manual_seed(0)
    model = build_unet("padded", 1, 2, base_width=4, depth=2)
    config = {
        "preset": "padded", "in_channels": 1, "num_classes": 2, "base_width": 4, "depth": 2, "norm": "batch"
    }  # fmt: skip
    state = {"model": model.state_dict(), "config": {"model": config, "data": {"tile_size": 64}}, "step": 5}
    torch.save(state, folder / "model.pt")
    rng = np.random.default_rng(4)
    image = rng.integers(0, 255, (200, 260)).astype(np.uint8)
    zarr.create_array(store=str(folder / "big.zarr"), data=image, chunks=(64, 64))
    tifffile.imwrite(folder / "small.tif", rng.integers(0, 255, (50, 70)).astype(np.uint8))
    return folder


@pytest.fixture
def input_url(s3, local_inputs: Path) -> str:
    """``big.zarr`` copied object by object into the bucket (once per session)."""
    url = f"s3://{BUCKET}/in/big.zarr"
    if not remote.exists(f"{url}/zarr.json"):
        s3.create_bucket(BUCKET)
        store = local_inputs / "big.zarr"
        for path in sorted(p for p in store.rglob("*") if p.is_file()):
            remote.upload_file(path, f"{url}/{path.relative_to(store).as_posix()}")
    s3.clear_requests()
    return url


def _predict(local_inputs: Path, inputs: list[str], output: str) -> int:
    return main(["--model", str(local_inputs / "model.pt"), "--input", *inputs, "--output", output, *OPTIONS])


def _read_zarr(location: str) -> np.ndarray:
    import zarr

    return zarr.open_array(store=remote.zarr_store(location), mode="r")[:]


def _blocks(location: str) -> int:
    import zarr

    return zarr.open_array(store=remote.zarr_store(location), mode="r").nchunks


def _assert_same_zarr_outputs(expected: str, actual: str) -> None:
    for name in OUTPUTS:
        reference, result = _read_zarr(remote.join(expected, name)), _read_zarr(remote.join(actual, name))
        assert result.dtype == reference.dtype and result.shape == reference.shape, name
        np.testing.assert_array_equal(result, reference, err_msg=name)


def _chunk_puts(s3, store_key: str) -> list[str]:
    return [row[1] for row in s3.requests("PUT") if row[1].startswith(f"/{BUCKET}/{store_key}/c/")]


def test_s3_input_and_output_equal_local_bitwise(
    s3, local_inputs: Path, input_url: str, tmp_path: Path
) -> None:
    local_files = [str(local_inputs / "big.zarr"), str(local_inputs / "small.tif")]
    local_out = str(tmp_path / "local")
    assert _predict(local_inputs, local_files, local_out) == 0

    remote_out = f"s3://{BUCKET}/preds/"
    assert _predict(local_inputs, [input_url], remote_out) == 0
    _assert_same_zarr_outputs(local_out, remote_out)
    read_keys = [row[1] for row in s3.requests("GET")]
    assert any(key.startswith(f"/{BUCKET}/in/big.zarr/c/") for key in read_keys), "input chunks read from s3"
    written = _chunk_puts(s3, "preds/big_prob.zarr")
    assert len(written) == _blocks(f"{remote_out}big_prob.zarr") > 1, "one PUT per output block"

    s3.clear_requests()
    mixed_out = f"s3://{BUCKET}/mixed"
    assert _predict(local_inputs, local_files, mixed_out) == 0
    _assert_same_zarr_outputs(local_out, mixed_out)
    assert not any(row[1].startswith(f"/{BUCKET}/in/") for row in s3.requests(None)), "read locally"
    for name in ("small_mask.tif", "small_prob.tif"):
        uploaded = tifffile.imread(io.BytesIO(remote.read_bytes(f"{mixed_out}/{name}")))
        np.testing.assert_array_equal(uploaded, tifffile.imread(tmp_path / "local" / name), err_msg=name)

    back_home = str(tmp_path / "from-s3")
    assert _predict(local_inputs, [input_url], back_home) == 0
    _assert_same_zarr_outputs(local_out, back_home)


@pytest.mark.slow
def test_two_ranks_write_their_blocks_to_s3_equal_to_one_local(
    s3, local_inputs: Path, input_url: str, tmp_path: Path
) -> None:
    local_out = str(tmp_path / "local")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank (OMP_NUM_THREADS=1): float16 probabilities equal to the bit
    try:
        assert _predict(local_inputs, [str(local_inputs / "big.zarr")], local_out) == 0
    finally:
        torch.set_num_threads(threads)
    remote_out = f"s3://{BUCKET}/two-ranks"
    remote.write_bytes(f"{remote_out}/big_mask.zarr/c/9/9", b"stale")  # replaced: rank 0 overwrites the store
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = [*torchrun, "-m", "unetdist.predict", "--model", str(local_inputs / "model.pt"),
               "--input", input_url, "--output", remote_out, *OPTIONS]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the fixture's AWS_* variables included
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_zarr_outputs(local_out, remote_out)
    assert not remote.exists(f"{remote_out}/big_mask.zarr/c/9/9")
    chunk_puts = _chunk_puts(s3, "two-ranks/big_prob.zarr")
    assert len(chunk_puts) == _blocks(f"{remote_out}/big_prob.zarr") > 1, "each block once, by one rank"


def _error_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("predict:")]


def test_missing_input_bucket_and_credentials_are_one_line_exit_2(
    s3, local_inputs: Path, input_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    missing = f"s3://{BUCKET}/nope/missing.zarr"
    capsys.readouterr()
    assert _predict(local_inputs, [missing], str(tmp_path / "out")) == 2
    assert _error_lines(capsys) == [
        f"predict: error: {missing}: no such Zarr store (no zarr.json or .zarray or .zgroup there)"
    ]
    picture = f"s3://{BUCKET}/in/cells.tif"
    assert _predict(local_inputs, [picture], str(tmp_path / "out")) == 2
    assert _error_lines(capsys) == [
        f"predict: error: {picture}: image files at URLs are not read yet: copy it here first, "
        "or convert it to Zarr"
    ]
    no_bucket = "s3://unetdist-no-such-bucket/preds"
    assert _predict(local_inputs, [input_url], no_bucket) == 2
    lines = _error_lines(capsys)
    assert lines[0].startswith(f"predict: failed: {input_url}: {no_bucket}/big_mask.zarr: cannot create: ")
    assert lines[0].endswith("404 Not Found: NoSuchBucket"), lines
    assert lines[1:] == ["predict: 1 of 1 input(s) failed (listed above)"]

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    for inputs, output in ([input_url], str(tmp_path / "out")), ([str(local_inputs / "big.zarr")], no_bucket):
        assert _predict(local_inputs, inputs, output) == 2
        (line,) = _error_lines(capsys)
        assert line.startswith("predict: error: s3://") and "no S3 credentials: set AWS_ACCESS_KEY_ID" in line
