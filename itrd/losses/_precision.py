"""Precision rules shared by the losses: they always run in at least float32."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

# Smallest positive normal float32: the floor for arguments of log2 and divisors that may reach zero.
TINY = torch.finfo(torch.float32).tiny


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """Float32, or float64 when any input is float64 (the mode gradcheck uses); never half precision."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@contextlib.contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """Switch autocast off for `device`, so matmuls inside stay in the dtype we cast to."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield
