"""What the spec's `auto` settings become on the machine at hand.

`precision: auto` is bf16 autocast where the hardware multiplies bf16 natively (CUDA devices that
support it; CPUs with AMX or AVX512-BF16 instructions), float32 elsewhere: emulated bf16 is slower
than float32, so it is never chosen automatically. `channels_last: auto` is on wherever oneDNN or
cuDNN runs the convolutions, which is everywhere PyTorch ships them. The choice depends only on the
hardware, never on a timing, so one spec on one machine always trains the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

# CPU instruction-set flags (as Linux names them in /proc/cpuinfo) that multiply bf16 in hardware.
_BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo; empty where that file does not exist."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 in hardware (so bf16 autocast is faster than float32)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    if device.type == "cpu":
        return bool(cpu_flags() & _BF16_CPU_FLAGS) and torch.backends.mkldnn.is_available()
    return False


@dataclass(frozen=True)
class Execution:
    """How a run executes: the resolved form of the spec's precision and memory-format fields."""

    precision: str  # "bf16" or "fp32"
    channels_last: bool

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.precision == "bf16" else None


def resolve_execution(precision: str, channels_last: bool | None, device: torch.device) -> Execution:
    """Turn the spec's `precision` ('auto', 'fp32', 'bf16') and `channels_last` (None = auto) into settings."""
    if precision == "auto":
        precision = "bf16" if native_bf16(device) else "fp32"
    if channels_last is None:
        channels_last = device.type == "cuda" or (device.type == "cpu" and torch.backends.mkldnn.is_available())
    return Execution(precision=precision, channels_last=channels_last)


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; asking for CUDA without one is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for but CUDA is not available here; use 'cpu' or 'auto'")
    return torch.device(name)
