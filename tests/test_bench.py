"""`python -m unetdist.bench`: runs end to end, prints its table and ends with one key=value line.

The figures themselves are not asserted (timing on a shared CI machine proves nothing); the
shape of the output is, because scripts parse its last line.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from unetdist.bench.__main__ import SubcommandMissing, load_subcommand

TINY = ["--preset", "padded", "--base-width", "4", "--depth", "2", "--tile", "32", "--batch", "2",
        "--steps", "2", "--warmup", "1", "--rounds", "1"]


def bench(*argv: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unetdist.bench", *argv], capture_output=True, text=True,
                          timeout=timeout)


def final_pairs(stdout: str) -> dict[str, str]:
    last = stdout.rstrip("\n").split("\n")[-1]
    pairs = dict(item.split("=", 1) for item in last.split(" "))
    assert all(key and value for key, value in pairs.items()), last
    return pairs


def test_bench_train_prints_a_table_and_ends_with_key_values():
    done = bench("train", *TINY)
    assert done.returncode == 0, done.stderr
    assert "bench train" in done.stdout and "machine" in done.stdout and "torch" in done.stdout
    table_keys = {line.split()[0] for line in done.stdout.split("\n")[:-2] if line.strip()}
    assert {"trainer_steps_per_s", "bare_steps_per_s", "trainer_vs_bare", "peak_mem_mb", "cpu"} <= table_keys
    pairs = final_pairs(done.stdout)
    for key in ("trainer_steps_per_s", "bare_steps_per_s", "trainer_vs_bare", "trainer_vs_bare_cpu",
                "trainer_samples_per_s", "peak_mem_mb", "model_gflops_per_sample", "device"):
        assert key in pairs, key
    assert float(pairs["trainer_vs_bare"]) > 0 and pairs["device"] == "cpu"


def test_bench_train_of_volumes_times_a_3d_model_in_voxels():
    done = bench("train", "--spatial-dims", "3", "--base-width", "4", "--depth", "2", "--tile", "16", "--batch", "2",
                 "--steps", "2", "--warmup", "1", "--rounds", "1", "--log-every", "2")  # fmt: skip
    assert done.returncode == 0, done.stderr
    pairs = final_pairs(done.stdout)
    assert float(pairs["trainer_voxels_per_s"]) > 0 and pairs["tile"] == "16x16x16", pairs


@pytest.mark.slow
def test_bench_train_nproc_runs_torchrun_and_reports_scaling():
    done = bench("train", *TINY, "--nproc", "2")
    assert done.returncode == 0, done.stderr
    pairs = final_pairs(done.stdout)
    for key in ("global_samples_per_s", "samples_per_s_1rank", "speedup_vs_1rank", "scaling_efficiency"):
        assert float(pairs[key]) > 0, key
    assert pairs["world_size"] == "2"


def test_bench_all_writes_json_and_markdown(tmp_path):
    out = tmp_path / "results" / "this-machine"
    done = bench("all", "--only", "train", "--out", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["machine"]["torch"] and "trainer_vs_bare" in report["results"]["train"]
    markdown = out.with_suffix(".md").read_text()
    assert "| cpu |" in markdown and "## train" in markdown and "trainer_steps_per_s" in markdown
    assert "train.trainer_vs_bare" in final_pairs(done.stdout)


def test_bad_settings_and_unknown_commands_exit_2():
    done = bench("train", *TINY[:-2], "--rounds", "0")
    assert done.returncode == 2 and "--rounds" in done.stderr
    done = bench("train", "--preset", "paper", "--tile", "100", "--steps", "1")
    assert done.returncode == 2 and "data.tile_size" in done.stderr  # the config's own message, no traceback
    assert "Traceback" not in done.stderr
    assert bench("nonsense").returncode == 2


def test_a_missing_subcommand_is_named():
    with pytest.raises(SubcommandMissing, match=r"unetdist/bench/not_written_yet\.py does not exist"):
        load_subcommand("not_written_yet")


def test_bench_data_from_s3_reports_remote_vs_local_gets_and_bytes(s3):
    """`bench data --source s3` against the test server (S3_FAULTS_FILE, S3_REQUESTS_LOG in the environment)."""
    done = bench("data", "--source", "s3", "--url", "s3://unetdist-bench-test/data", "--tiles", "64", "--tile", "32",
                 "--batch", "8", "--latency-ms", "5", "--repeats", "1", timeout=120)
    assert done.returncode == 0, done.stderr
    pairs = final_pairs(done.stdout)
    for key in ("remote_vs_local_cold_5ms", "remote_vs_local_warm_5ms", "local_samples_per_s_5ms"):
        assert float(pairs[key]) > 0, key
    assert pairs["counted_by"] == "request_log" and pairs["latency_ms"] == "5"
    assert float(pairs["gets_per_sample"]) > 0
    assert float(pairs["bytes_fetched_over_used"]) >= 1.0  # headers between a sample's members come along
    assert s3.faults().get("latency_ms", 0) == 0  # the injected latency is taken back
    assert any(row[2] != "-" for row in s3.requests("GET") if row[1].endswith(".tar")), "ranged GETs of shards"


def test_bench_data_local_times_the_peers_and_zarr_block_sizes():
    done = bench("data", "--format", "zarr", "--tiles", "256", "--tile", "32", "--batch", "8",
                 "--batches", "4", "--repeats", "1", "--block-sizes", "1,8")
    assert done.returncode == 0, done.stderr
    pairs = final_pairs(done.stdout)
    for key in ("samples_per_s", "ceiling_samples_per_s", "wds_npy_samples_per_s", "loader_vs_ceiling",
                "loader_vs_png_wds", "loader_vs_wds_npy", "zarr_block1_samples_per_s",
                "zarr_block8_samples_per_s"):
        assert float(pairs[key]) > 0, key
    if pairs["mds"] == "not_installed":  # mosaicml-streaming is optional
        assert "mds=not installed" in done.stderr and "loader_vs_mds" not in pairs
    else:
        assert float(pairs["mds_samples_per_s"]) > 0 and float(pairs["loader_vs_mds"]) > 0
    # 256 tiles of 32 px: 64-tile chunks, so a batch of 8 in blocks of 8 is one chunk, in blocks of 1 several
    assert pairs["zarr_chunk_tiles"] == "64" and pairs["zarr_block8_blocks_per_batch"] == "1"
    assert float(pairs["zarr_block1_blocks_per_batch"]) > 3
    done = bench("data", "--block-sizes", "1,2")  # the tar shards have no block size to time
    assert done.returncode == 2 and "--format zarr" in done.stderr


def test_bench_data_ome_zarr_beside_the_prepared_store_and_weight_maps():
    done = bench("data", "--format", "ome-zarr", "--images", "2", "--image-size", "256", "--tile", "64",
                 "--batch", "4", "--batches", "4", "--repeats", "1")
    assert done.returncode == 0, done.stderr
    pairs = final_pairs(done.stdout)
    for key in ("ngff_samples_per_s", "zarr_samples_per_s", "ngff_vs_zarr", "weight_map_ms_per_tile"):
        assert float(pairs[key]) > 0, key


def test_bench_predict_compares_instances_with_the_bare_whole_image_forward():
    done = bench("predict", "--height", "72", "--width", "104", "--images", "2", "--repeats", "1",
                 "--base-width", "4", "--depth", "2", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    pairs = final_pairs(done.stdout)
    for key in ("whole_forward_s", "predict_s", "forward_s", "cli_instances_s", "sliding_s",
                "predict_vs_forward", "instances_vs_forward", "cli_vs_forward", "sliding_vs_predict"):
        assert float(pairs[key]) > 0, key
    assert float(pairs["decode_s"]) >= 0
    assert (pairs["image_px"], pairs["tile"], pairs["tiles"]) == ("72x104", "72x104", "1")  # one pass
    done = bench("predict", "--size", "200", "--images", "1", "--repeats", "1", "--base-width", "4",
                 "--depth", "2", "--memory-gb", "0.0005", "--preset", "padded")
    assert done.returncode == 0, done.stderr
    assert int(final_pairs(done.stdout)["tiles"]) > 1  # a budget too small for one pass: tiles


def test_bench_quality_runs_the_newcomer_path_and_scores_the_test_images():
    """prepare -> plan -> train -> predict --instances -> evaluate, for real, on held-out images."""
    done = bench("quality", "--synthetic", "5", "--image-size", "128", "--steps", "4", "--variants", "boundary",
                 "--prepare-tile", "32", timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    pairs = final_pairs(done.stdout)
    assert pairs["train_images"] == "3" and pairs["test_images"] == "2" and pairs["steps"] == "4"
    assert 0.0 <= float(pairs["boundary_ap50"]) <= 1.0 and 0.0 < float(pairs["boundary_dice"]) <= 1.0
    assert bench("quality", "--variants", "nonsense", "--synthetic", "3").returncode == 2


def test_bench_data_of_volumes_reads_3d_windows_against_the_in_memory_ceiling():
    done = bench("data", "--spatial-dims", "3", "--volumes", "1", "--volume", "16x48x48", "--tile", "16",
                 "--batch", "2", "--batches", "2", "--repeats", "1", "--workers", "1")  # fmt: skip
    assert done.returncode == 0, done.stderr
    pairs = final_pairs(done.stdout)
    for key in ("samples_per_s", "voxels_per_s", "ceiling_voxels_per_s", "loader_vs_ceiling"):
        assert float(pairs[key]) > 0, key
    assert (pairs["spatial_dims"], pairs["tile"], pairs["zarr_chunk"]) == ("3", "16x16x16", "16x48x48")
    # a 16^3 window in chunks of the whole 16x48x48 volume meets exactly one chunk per array
    assert pairs["zarr_chunk_reads_per_window"] == "2" and pairs["zarr_image_chunks_per_window"] == "1"
    done = bench("data", "--spatial-dims", "3", "--format", "webdataset")
    assert done.returncode == 2 and "--format zarr" in done.stderr


def test_bench_predict_of_a_volume_times_zarr_to_zarr_and_the_3d_decoding():
    done = bench("predict", "--spatial-dims", "3", "--volume", "8x32x32", "--base-width", "2", "--depth", "1",
                 "--repeats", "1", "--device", "cpu", "--instances")  # fmt: skip
    assert done.returncode == 0, done.stderr
    pairs = final_pairs(done.stdout)
    for key in ("forward_s", "predict_s", "instances_s", "voxels_per_s", "forward_voxels_per_s",
                "predict_vs_forward", "instances_vs_forward", "decode_truth_voxels_per_s"):
        assert float(pairs[key]) > 0, key
    assert (pairs["volume"], pairs["forward_input"], pairs["forward_whole"]) == ("8x32x32", "8x32x32", "true")
    assert int(pairs["truth_instances"]) >= 1 and int(pairs["truth_cells"]) >= 1
