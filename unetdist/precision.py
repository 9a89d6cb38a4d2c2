"""Mixed precision: the one table from a precision name to its autocast dtype.

Training (`train.precision`), the training benchmark and prediction (`--precision`) all take the
same names, so the table and the two torch objects built from it live here once.
"""

from __future__ import annotations

import contextlib

import torch

# fp32 runs without autocast; bf16 and fp16 run the forward pass under autocast.
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = tuple(AUTOCAST_DTYPES)


def check_precision(precision: str) -> None:
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")


def autocast(device_type: str, precision: str) -> contextlib.AbstractContextManager:
    """The forward pass's autocast context for `precision` (a no-op for fp32)."""
    dtype = AUTOCAST_DTYPES[precision]
    return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None)


def grad_scaler(device_type: str, precision: str) -> torch.amp.GradScaler:
    """A GradScaler that scales only for fp16: bf16 keeps fp32's exponent range and needs none."""
    return torch.amp.GradScaler(device_type, enabled=precision == "fp16")
