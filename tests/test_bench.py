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
