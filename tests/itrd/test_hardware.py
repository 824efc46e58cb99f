"""What `precision: auto` and `channels_last: auto` become, and that it depends on the hardware only."""

from __future__ import annotations

import platform

import pytest
import torch

from itrd.engine import hardware
from itrd.engine.hardware import Execution, resolve_execution

CPU = torch.device("cpu")


def with_flags(monkeypatch: pytest.MonkeyPatch, flags: set[str]) -> None:
    # The one thing a test cannot change is the CPU it runs on: stand in for /proc/cpuinfo.
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64", reason="x86-64 Linux flags")
def test_cpu_flags_are_read_from_this_machine() -> None:
    flags = hardware.cpu_flags()
    assert {"sse2", "fpu"} <= flags  # every x86-64 CPU has them: the parser found the flags line


@pytest.mark.parametrize(("flags", "expected"), [
    ({"avx2", "fma"}, "fp32"),  # no bf16 arithmetic: emulated bf16 would be slower than float32
    ({"avx512f", "avx512_bf16"}, "bf16"),
    ({"avx512f", "amx_tile", "amx_bf16"}, "bf16"),
    (set(), "fp32"),  # flags unknown (not Linux): the safe choice
])
def test_auto_precision_on_cpu_follows_bf16_instructions(monkeypatch: pytest.MonkeyPatch, flags: set[str],
                                                         expected: str) -> None:
    with_flags(monkeypatch, flags)
    assert resolve_execution("auto", None, CPU).precision == expected


def test_explicit_settings_are_kept_whatever_the_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    with_flags(monkeypatch, {"amx_bf16"})
    assert resolve_execution("fp32", False, CPU) == Execution("fp32", False)
    with_flags(monkeypatch, set())
    assert resolve_execution("bf16", True, CPU) == Execution("bf16", True)
    assert Execution("bf16", True).amp_dtype is torch.bfloat16 and Execution("fp32", True).amp_dtype is None


def test_auto_channels_last_where_onednn_runs_the_convolutions() -> None:
    assert resolve_execution("fp32", None, CPU).channels_last is torch.backends.mkldnn.is_available()


def test_auto_is_stable_on_one_machine() -> None:
    # Decided from instruction sets, never from a timing: two resolutions always agree.
    assert resolve_execution("auto", None, CPU) == resolve_execution("auto", None, CPU)
