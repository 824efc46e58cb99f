"""The trainer process: runs one job's spec with the engine, in a process of its own.

It never touches the database: progress goes to `progress.json`, metrics to `metrics.jsonl` (the
engine writes it), uploaded checkpoints to `events.jsonl`, and the end to `outcome.json`. The worker
that spawned it turns those files into database rows, so a database outage never stops training and
a trainer crash never leaves a half-written row. A stop request arrives as the file `STOP`.
"""

from __future__ import annotations

import json
import os
import signal
import time
import traceback
from pathlib import Path
from typing import Any

from itrd.engine import Callbacks, StopRequested, train
from itrd.engine.checkpoint import write_atomic
from itrd.spec import JobSpec
from service.config import get_settings
from service.storage import store_from_settings

PROGRESS = "progress.json"
EVENTS = "events.jsonl"
OUTCOME = "outcome.json"
STOP = "STOP"
# Files the store keeps for every job; sidecars make a downloaded checkpoint verifiable on resume.
# The previous `last` goes too, so a resume on another machine can fall back to it if the newest is corrupt.
UPLOADED = {"last": ("last.pt", "last.pt.sha256", "last.prev.pt", "last.prev.pt.sha256"),
            "best": ("best.pt", "best.pt.sha256"),
            "student": ("student.safetensors",), "card": ("model_card.json",)}


class JobFiles(Callbacks):
    """Engine callbacks that report through files in the run directory and upload checkpoints."""

    def __init__(self, job_id: str, run_dir: Path, min_interval: float = 1.0) -> None:
        self.job_id = job_id
        self.dir = run_dir
        self.store = store_from_settings(get_settings())
        self.min_interval = min_interval
        self.last_write = 0.0
        self.state: dict[str, Any] = {}
        self.terminated = False
        # SIGTERM reaches the trainer too when the whole process group is stopped (systemd, a shell,
        # some orchestrators): treat it as the worker's shutdown, so the run checkpoints first.
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.terminated = True

    def _write_progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last_write >= self.min_interval:
            write_atomic(self.dir / PROGRESS, json.dumps(self.state).encode())
            self.last_write = now

    def on_start(self, info: dict[str, Any]) -> None:
        self.state.update(epochs=info["epochs"], steps_per_epoch=info["steps_per_epoch"],
                          teacher_top1=info.get("teacher_top1"), epoch=info["start_epoch"] - 1, step=0)
        self._write_progress(force=True)

    def on_step(self, epoch: int, step: int, steps_per_epoch: int, live: dict[str, float] | None) -> None:
        epochs = max(int(self.state.get("epochs", 1)), 1)
        self.state.update(epoch=epoch, step=step, steps_per_epoch=steps_per_epoch,
                          fraction=((epoch - 1) + step / max(steps_per_epoch, 1)) / epochs)
        if live:
            self.state["live"] = live
        self._write_progress()

    def on_epoch_end(self, metrics: dict[str, Any]) -> None:
        self._write_progress(force=True)

    def on_checkpoint(self, kind: str, path: Path, sha256: str) -> None:
        for name in UPLOADED.get(kind, ()):
            if not (path.parent / name).exists():
                continue  # no previous checkpoint yet
            size, digest = self.store.put_file(self.job_id, name, path.parent / name)
            with open(self.dir / EVENTS, "a") as f:
                f.write(json.dumps({"name": name, "size": size, "sha256": digest}) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def should_stop(self) -> str | None:
        if self.terminated:
            return "worker shutting down"
        stop = self.dir / STOP
        if not stop.exists():
            return None
        return stop.read_text().strip() or "stop requested"


def run(job_id: str, spec_json: str, run_dir: str, teacher_path: str | None, resume: bool) -> None:
    """Entry point of the spawned trainer process; always leaves `outcome.json` unless killed."""
    directory = Path(run_dir)
    outcome: dict[str, Any]
    try:
        spec = JobSpec.model_validate_json(spec_json)
        summary = train(spec, directory, callbacks=JobFiles(job_id, directory), resume=resume,
                        teacher_weights=Path(teacher_path) if teacher_path else None)
        outcome = {"status": "succeeded", "summary": summary}
    except StopRequested as exc:
        outcome = {"status": "stopped", "reason": exc.reason, "epoch": exc.epoch, "step": exc.step}
    except Exception as exc:
        outcome = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc(limit=20)}
    write_atomic(directory / OUTCOME, json.dumps(outcome).encode())
