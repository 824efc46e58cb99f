"""Hooks through which whoever started a run (CLI, worker) watches it and can stop it."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class StopRequested(Exception):
    """Raised by the engine after it has checkpointed, when `Callbacks.should_stop` said so."""

    def __init__(self, reason: str, epoch: int, step: int) -> None:
        super().__init__(f"stopped at epoch {epoch} step {step}: {reason}")
        self.reason = reason
        self.epoch = epoch
        self.step = step


class NonFiniteLoss(RuntimeError):
    """A loss term became NaN or infinite; training on it would only spread the damage."""

    def __init__(self, epoch: int, step: int, term: str, value: float) -> None:
        super().__init__(
            f"non-finite loss at epoch {epoch}, step {step}: term {term!r} = {value}. "
            "Lower the learning rate or check the data and the teacher weights."
        )
        self.epoch = epoch
        self.step = step
        self.term = term


class Callbacks:
    """No-op base: override what you need. Every method is called in the training process."""

    def on_start(self, info: dict[str, Any]) -> None:
        """Once, before the first step: run facts (device, steps per epoch, teacher top-1, resumed epoch)."""

    def on_step(self, epoch: int, step: int, steps_per_epoch: int, live: dict[str, float] | None) -> None:
        """After every optimizer step; `live` holds recent loss terms when they are cheap to read."""

    def on_epoch_end(self, metrics: dict[str, Any]) -> None:
        """After each epoch with that epoch's metrics (also written to metrics.jsonl)."""

    def on_checkpoint(self, kind: str, path: Path, sha256: str) -> None:
        """After a checkpoint or export file is durably written ('last', 'best', 'student', 'card')."""

    def should_stop(self) -> str | None:
        """A reason to stop (cancelled, shutting down) or None; checked after every step."""
        return None


class CallbackList(Callbacks):
    """Fans every hook out to several callbacks; the first stop reason wins."""

    def __init__(self, *callbacks: Callbacks | None) -> None:
        self.callbacks = [c for c in callbacks if c is not None]

    def on_start(self, info: dict[str, Any]) -> None:
        for c in self.callbacks:
            c.on_start(info)

    def on_step(self, epoch: int, step: int, steps_per_epoch: int, live: dict[str, float] | None) -> None:
        for c in self.callbacks:
            c.on_step(epoch, step, steps_per_epoch, live)

    def on_epoch_end(self, metrics: dict[str, Any]) -> None:
        for c in self.callbacks:
            c.on_epoch_end(metrics)

    def on_checkpoint(self, kind: str, path: Path, sha256: str) -> None:
        for c in self.callbacks:
            c.on_checkpoint(kind, path, sha256)

    def should_stop(self) -> str | None:
        for c in self.callbacks:
            reason = c.should_stop()
            if reason:
                return reason
        return None
