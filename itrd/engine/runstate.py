"""What a run carries from one session to the next besides the weights: its position and every RNG."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class RunProgress:
    """Where a run stands; everything here goes into `last.pt`."""

    epoch: int = 0  # 0-based epoch in progress
    step: int = 0  # steps of that epoch already taken
    accum: torch.Tensor | None = None  # float64 running sums of [total, terms..., correct, samples]
    epoch_seconds: float = 0.0
    best_top1: float = -1.0
    teacher_top1: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def rng_state() -> dict[str, Any]:
    """Every random generator a run draws from (torch CPU, Python, each CUDA device)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back what `rng_state` took, so a resumed run draws exactly what the uninterrupted one would."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
