"""Every fast-path switch that runs on CPU gives the plain path's loss (within its precision).

channels_last, activation checkpointing, torch.compile, bf16/fp16 autocast and the
foreach/fused optimizer kernels change how the same math is computed, never the math.
Each test trains a tiny U-Net (BatchNorm, so running statistics are exercised too) for a
few steps both ways through the real ``Trainer`` and compares losses and parameters.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from unetdist import distributed
from unetdist.batch_layout import batch_layout
from unetdist.config import load_config
from unetdist.model import build_unet
from unetdist.optim import build_optimizer
from unetdist.tracking.run_outputs import RunOutputs
from unetdist.trainer import Trainer, wrap_model

TILE, BATCH, STEPS = 32, 4, 3

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def train(
    tmp_path: Path,
    *overrides: str,
    checkpointing: bool = False,
    optimizer_factory: OptimizerFactory | None = None,
    norm: str = "batch",
    device: str = "cpu",
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses of STEPS real trainer steps and the final state (parameters and BN buffers)."""
    config = load_config([], ["data.root=x", f"data.tile_size={TILE}", "model.base_width=4", "model.depth=2",
                              f"model.norm={norm}", f"train.global_batch_size={BATCH}", f"train.device={device}",
                              "optim.lr=0.01", "optim.schedule=constant", *overrides])
    ctx = distributed.init_distributed(device, "auto")
    torch.manual_seed(0)
    model = build_unet("padded", 1, 2, base_width=4, depth=2, norm=norm, activation_checkpointing=checkpointing)
    raw, wrapped = wrap_model(model, config, ctx)
    if optimizer_factory is None:
        optimizer = build_optimizer(raw.parameters(), config.optim, "padded", device)
    else:
        optimizer = optimizer_factory(list(raw.parameters()))
    trainer = Trainer(config, ctx, batch_layout(config.train, 1), raw, wrapped, optimizer, RunOutputs.null(tmp_path))
    losses = [trainer.train_step([batch(step)]).item() for step in range(STEPS)]
    return losses, {name: value.detach().clone() for name, value in raw.state_dict().items()}


def batch(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(BATCH, 1, TILE, TILE, generator=generator)
    weight = 1 + 4 * torch.rand(BATCH, TILE, TILE, generator=generator)
    return {"image": image, "mask": (image[:, 0] > 0.3).long(), "weight": weight}


def assert_same_training(reference, candidate, rtol: float, atol: float) -> None:
    (ref_losses, ref_state), (losses, state) = reference, candidate
    assert losses == pytest.approx(ref_losses, rel=rtol, abs=atol)
    assert state.keys() == ref_state.keys()
    for name, value in state.items():
        torch.testing.assert_close(value, ref_state[name], rtol=rtol, atol=atol, msg=f"{name} differs")


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return train(tmp_path_factory.mktemp("plain"))


def test_channels_last_matches_the_plain_path(tmp_path, plain):
    assert_same_training(plain, train(tmp_path, "train.channels_last=true"), rtol=1e-4, atol=1e-5)


def test_activation_checkpointing_matches_the_plain_path(tmp_path, plain):
    # BatchNorm running statistics included: the recomputation must not update them again
    assert_same_training(plain, train(tmp_path, checkpointing=True), rtol=1e-5, atol=1e-6)


def test_foreach_optimizer_matches_the_plain_path(tmp_path, plain):
    def foreach_adamw(params):
        return torch.optim.AdamW(params, lr=0.01, weight_decay=0.0, foreach=True)

    assert_same_training(plain, train(tmp_path, optimizer_factory=foreach_adamw), rtol=1e-5, atol=1e-6)


def test_fused_optimizer_matches_the_plain_path_on_cpu(tmp_path, plain):
    def fused_adamw(params):
        return torch.optim.AdamW(params, lr=0.01, weight_decay=0.0, fused=True)

    try:
        fused_adamw([nn.Parameter(torch.zeros(1))])
    except (RuntimeError, TypeError) as err:
        pytest.skip(f"fused AdamW does not run on CPU in torch {torch.__version__}: {err}")
    assert_same_training(plain, train(tmp_path, optimizer_factory=fused_adamw), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_tracks_fp32(tmp_path, plain, precision):
    losses, state = train(tmp_path, f"train.precision={precision}")
    # bf16 keeps 8 bits of mantissa: the same descent, not the same digits
    assert losses == pytest.approx(plain[0], rel=0.05)
    assert all(torch.isfinite(value).all() for value in state.values() if value.is_floating_point())


def test_all_cpu_switches_together_match_the_plain_path(tmp_path, plain):
    def foreach_adamw(params):
        return torch.optim.AdamW(params, lr=0.01, weight_decay=0.0, foreach=True)

    candidate = train(tmp_path, "train.channels_last=true", checkpointing=True, optimizer_factory=foreach_adamw)
    assert_same_training(plain, candidate, rtol=1e-4, atol=1e-5)


# --- activation checkpointing on the model itself --------------------------------------


@pytest.mark.parametrize(("preset", "tile", "norm"), [("padded", 32, "batch"), ("padded", 32, "group"),
                                                      ("paper", 60, "none"), ("article", 60, "batch")])
def test_activation_checkpointing_gives_the_same_gradients(preset, tile, norm):
    def loss_and_grads(checkpointing: bool):
        torch.manual_seed(0)
        model = build_unet(preset, 1, 2, base_width=4, depth=2, norm=norm, activation_checkpointing=checkpointing)
        image = torch.randn(2, 1, tile, tile, generator=torch.Generator().manual_seed(3))
        loss = model(image).square().mean()
        loss.backward()
        return loss.item(), {n: p.grad for n, p in model.named_parameters()}, model.state_dict()

    loss, grads, buffers = loss_and_grads(False)
    checkpointed_loss, checkpointed_grads, checkpointed_buffers = loss_and_grads(True)
    assert checkpointed_loss == pytest.approx(loss, rel=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    for name, value in buffers.items():  # running mean/var and num_batches_tracked moved once, not twice
        torch.testing.assert_close(checkpointed_buffers[name], value, msg=name)


def saved_activation_bytes(model: nn.Module, image: torch.Tensor) -> int:
    saved = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(image).sum().backward()
    return sum(saved)


def test_activation_checkpointing_keeps_fewer_activations():
    torch.manual_seed(0)
    model = build_unet("padded", 1, 2, base_width=8, depth=3)
    image = torch.randn(2, 1, 64, 64)
    plain_bytes = saved_activation_bytes(model, image)
    model.activation_checkpointing = True
    assert saved_activation_bytes(model, image) < plain_bytes / 3


def test_activation_checkpointing_is_off_outside_training():
    model = build_unet("padded", 1, 2, base_width=4, depth=2, activation_checkpointing=True).eval()
    image = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        expected = model(image)
    model.activation_checkpointing = False
    with torch.no_grad():
        torch.testing.assert_close(model(image), expected, rtol=0, atol=0)


# --- torch.compile ---------------------------------------------------------------------


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_graph_matches_eager(checkpointing):
    """Dynamo capture + AOTAutograd (the part of torch.compile that can change the math), without
    inductor's C++ code generation, which takes minutes on a small CPU (the next test)."""
    torch._dynamo.reset()

    def loss_and_grads(compiled: bool):
        torch.manual_seed(0)
        model = build_unet("padded", 1, 2, base_width=4, depth=2, activation_checkpointing=checkpointing)
        run = torch.compile(model, backend="aot_eager") if compiled else model
        loss = run(torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(5))).square().mean()
        loss.backward()
        return loss.item(), [p.grad for p in model.parameters()], model.state_dict()

    loss, grads, state = loss_and_grads(False)
    compiled_loss, compiled_grads, compiled_state = loss_and_grads(True)
    assert compiled_loss == pytest.approx(loss, rel=1e-5)
    for grad, compiled_grad in zip(grads, compiled_grads, strict=True):
        torch.testing.assert_close(compiled_grad, grad, rtol=1e-4, atol=1e-6)
    for name, value in state.items():
        torch.testing.assert_close(compiled_state[name], value, msg=name)


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("UNETDIST_CPU_COMPILE_TESTS") != "1",
    reason="inductor on CPU generates and compiles C++: ~75 s cold on 2 cores (seconds once cached); "
    "set UNETDIST_CPU_COMPILE_TESTS=1 to run; CUDA compile is covered by tests/test_gpu.py",
)
def test_compile_switch_matches_the_plain_path(tmp_path, plain):
    assert_same_training(plain, train(tmp_path, "train.compile=true"), rtol=1e-4, atol=1e-5)


# --- the same switches on CUDA (skipped without it) ------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("overrides", "checkpointing"),
    [
        (["train.channels_last=true"], False),
        ([], True),
        (["optim.fused=true"], False),
        (["train.precision=bf16"], False),
        (["train.precision=fp16", "optim.fused=true"], False),
        (["train.precision=bf16", "train.channels_last=true", "train.compile=true"], True),
    ],
)
def test_cuda_fast_paths_track_the_plain_path(tmp_path, overrides, checkpointing):
    # TF32 convolutions and autotuned kernels differ in the last digits: compare the losses only
    reference, _ = train(tmp_path, device="cuda")
    losses, _ = train(tmp_path, *overrides, checkpointing=checkpointing, device="cuda")
    low_precision = any("precision=" in item for item in overrides)
    assert losses == pytest.approx(reference, rel=0.05 if low_precision else 0.01)
