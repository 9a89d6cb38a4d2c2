"""DDP correctness on real gloo process groups: N ranks x accumulation == 1 process on the same global batch."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unetdist.model import build_unet

SCRIPT = Path(__file__).parent / "scripts" / "ddp_step.py"


def run_step(out: Path, nproc: int, micro_batch_size: int) -> dict[str, torch.Tensor]:
    if nproc == 1:
        command = [sys.executable, str(SCRIPT)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(SCRIPT)]
    result = subprocess.run([*command, str(out), str(micro_batch_size)], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.slow
def test_two_ranks_and_accumulation_equal_one_process(tmp_path):
    reference = run_step(tmp_path / "one_process.pt", nproc=1, micro_batch_size=4)
    layouts = {
        "1 process, 2x2 accumulation": run_step(tmp_path / "accum.pt", nproc=1, micro_batch_size=2),
        "2 ranks x 2": run_step(tmp_path / "ddp.pt", nproc=2, micro_batch_size=2),
        "2 ranks x 2x1 accumulation": run_step(tmp_path / "ddp_accum.pt", nproc=2, micro_batch_size=1),
    }
    torch.manual_seed(0)
    initial = build_unet("paper", 1, 2, base_width=4, depth=2).state_dict()
    assert any(not torch.equal(initial[k], reference[k]) for k in reference), "the step did not move the weights"
    for name, params in layouts.items():
        for key, value in reference.items():
            torch.testing.assert_close(params[key], value, rtol=0, atol=1e-5, msg=lambda m, k=key, n=name: f"{n}: {k}: {m}")
