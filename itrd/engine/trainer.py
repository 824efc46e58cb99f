"""The training loop: teacher training (cross-entropy) and distillation, from one spec, resumable.

Reads top to bottom: set up (data, models, method, optimizer, maybe resume), then epochs of steps,
each epoch ending with evaluation, metrics and checkpoints. It knows nothing of who started it;
`Callbacks` carry progress out and a stop request in.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Iterator
from contextlib import nullcontext
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import nn

from itrd.data import ImageSet, LoadedDataset, load_dataset, make_loader
from itrd.engine.callbacks import Callbacks, NonFiniteLoss, StopRequested
from itrd.engine.checkpoint import latest_valid_checkpoint, save_checkpoint, sha256_file
from itrd.engine.evaluate import evaluate
from itrd.engine.hardware import resolve_device, resolve_execution
from itrd.engine.runstate import RunProgress, rng_state, set_rng_state
from itrd.engine.weights import export_student, freeze_teacher, load_weights_strict, read_state_dict
from itrd.losses import Batch, build_method
from itrd.models import create_model
from itrd.spec import JobSpec

CHECKPOINT_FORMAT = 1
# Spec fields that may change between an interrupted run and its resumption without changing results.
_RESUME_FREE_FIELDS = {"device", "num_workers", "compile", "callback_url"}


class RunDirError(RuntimeError):
    """The output directory holds a different run, or a run that must be resumed explicitly."""


def lr_at(spec: JobSpec, epoch: int) -> float:
    """The learning rate of 0-based `epoch`: the base rate decayed once per milestone already passed."""
    passed = sum(1 for m in spec.optim.lr_decay_epochs if epoch + 1 > m)
    assert spec.optim.lr is not None  # resolved by the spec validator
    return spec.optim.lr * spec.optim.lr_decay_rate**passed


def _subset(data: LoadedDataset, n: int) -> LoadedDataset:
    """At most `n` images of each split, drawn by a fixed permutation (the same for every seed)."""
    g = torch.Generator().manual_seed(0)

    def pick(images: ImageSet) -> ImageSet:
        if len(images) <= n:
            return images
        return images.subset(torch.randperm(len(images), generator=g)[:n].sort().values)

    return LoadedDataset(info=data.info, train=pick(data.train), test=pick(data.test))


def _comparable(spec_dict: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec_dict.items() if k not in _RESUME_FREE_FIELDS}


class Trainer:
    """One run of one spec in one output directory."""

    def __init__(
        self,
        spec: JobSpec,
        out_dir: Path,
        *,
        callbacks: Callbacks | None = None,
        teacher_weights: Path | None = None,
        data: LoadedDataset | None = None,
    ) -> None:
        self.spec = spec
        self.out = Path(out_dir)
        self.cb = callbacks or Callbacks()
        self.device = resolve_device(spec.device)
        cuda = self.device.type == "cuda"
        self.execution = resolve_execution(spec.precision, spec.channels_last, self.device)
        self.amp_dtype = self.execution.amp_dtype
        self.channels_last = self.execution.channels_last
        # Host syncs cost a GPU its pipelining; check finiteness every step on the CPU only.
        self.check_every = 50 if cuda else 1
        self.teacher_weights = teacher_weights

        torch.manual_seed(spec.seed)
        random.seed(spec.seed)
        # `data` lets a notebook or a benchmark train on tensors it already holds.
        self.data = data or load_dataset(spec.dataset.name, Path(spec.dataset.root) if spec.dataset.root else None,
                                         download=spec.dataset.download)
        if spec.dataset.subset is not None:
            self.data = _subset(self.data, spec.dataset.subset)
        info = self.data.info
        self.student = create_model(spec.model, info.num_classes).to(self.device)
        if self.channels_last:
            self.student = self.student.to(memory_format=torch.channels_last)
        self.teacher: nn.Module | None = None
        teacher_dim = None
        if spec.teacher is not None:
            teacher = create_model(spec.teacher.architecture, info.num_classes)
            source = teacher_weights or (Path(spec.teacher.path) if spec.teacher.path else None)
            if source is None:
                raise ValueError("the teacher's weights were not resolved to a file before training")
            load_weights_strict(teacher, read_state_dict(source), spec.teacher.architecture, Path(source).name)
            teacher_dim = int(teacher.feature_dim)  # type: ignore[arg-type]
            self.teacher = freeze_teacher(teacher.to(self.device), channels_last=self.channels_last)
        self.method = build_method(
            spec.method.name,
            student_dim=int(self.student.feature_dim),  # type: ignore[arg-type]
            teacher_dim=teacher_dim,
            num_classes=info.num_classes,
            num_samples=len(self.data.train),
            train_targets=self.data.train.targets,
            params=spec.method.params,
        ).to(self.device)
        if self.method.needs_teacher and self.teacher is None:
            raise ValueError(f"method {spec.method.name!r} needs a teacher")
        params = [*self.student.parameters(), *self.method.parameters()]
        assert spec.optim.lr is not None
        self.optimizer = torch.optim.SGD(params, lr=spec.optim.lr, momentum=spec.optim.momentum,
                                         weight_decay=spec.optim.weight_decay)
        self.student_fn: nn.Module = self.student
        self.teacher_fn: nn.Module | None = self.teacher
        if spec.compile:
            self.student_fn = torch.compile(self.student)  # type: ignore[assignment]
            if self.teacher is not None:
                self.teacher_fn = torch.compile(self.teacher)  # type: ignore[assignment]
        self.progress = RunProgress()
        self.term_names: list[str] | None = None
        self.started_at_epoch = 1

    # ----------------------------------------------------------------------------------------- state
    def _state(self) -> dict[str, Any]:
        p = self.progress
        return {
            "format": CHECKPOINT_FORMAT,
            "spec": json.loads(self.spec.model_dump_json()),
            "epoch": p.epoch,
            "step": p.step,
            "accum": p.accum,
            "term_names": self.term_names,
            "epoch_seconds": p.epoch_seconds,
            "best_top1": p.best_top1,
            "teacher_top1": p.teacher_top1,
            "history": p.history,
            "student": self.student.state_dict(),
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(),
        }

    def _restore(self, state: dict[str, Any], source: Path) -> None:
        mine = _comparable(json.loads(self.spec.model_dump_json()))
        theirs = _comparable(state["spec"])
        if mine != theirs:
            changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise RunDirError(f"{source} belongs to a run with a different spec (fields {changed}); "
                              "resume with the same spec or use another output directory")
        self.student.load_state_dict(state["student"])
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        p = self.progress
        p.epoch, p.step = int(state["epoch"]), int(state["step"])
        p.accum = state["accum"].to(self.device) if state["accum"] is not None else None
        p.epoch_seconds = float(state["epoch_seconds"])
        p.best_top1 = float(state["best_top1"])
        p.teacher_top1 = state["teacher_top1"]
        p.history = list(state["history"])
        self.term_names = state["term_names"]

    def _checkpoint(self, name: str, kind: str) -> None:
        path = self.out / name
        digest = save_checkpoint(self._state(), path)
        self.cb.on_checkpoint(kind, path, digest)

    # ----------------------------------------------------------------------------------------- steps
    def _autocast(self) -> Any:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _batches(self, epoch: int, skip: int) -> tuple[Iterator[Any], int]:
        loader = make_loader(self.data.train, self.data.info, batch_size=self.spec.optim.batch_size,
                             train=True, device=self.device, seed=self.spec.seed, epoch=epoch,
                             fast=self.spec.fast_data, num_workers=self.spec.num_workers)
        steps = len(loader)
        return islice(iter(loader), skip, None), steps

    def _step(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """One optimizer step; returns the row [total, terms..., correct, n] without a host sync."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            feats, logits = self.student_fn(x)
            t_feats = t_logits = None
            if self.teacher_fn is not None:
                with torch.no_grad():
                    t_feats, t_logits = self.teacher_fn(x)
        out = self.method(Batch(student_features=feats, student_logits=logits, targets=y, indices=idx,
                                teacher_features=t_feats, teacher_logits=t_logits))
        self.optimizer.zero_grad(set_to_none=True)
        out.total.backward()
        self.optimizer.step()
        if self.term_names is None:
            self.term_names = list(out.terms)
        correct = (logits.detach().argmax(1) == y).sum()
        return torch.stack([
            out.total.detach().double(),
            *(out.terms[k].detach().double() for k in self.term_names),
            correct.double(),
            # A fill kernel, not a host-to-device copy: nothing in the step waits for the host.
            torch.full((), float(y.numel()), dtype=torch.float64, device=y.device),
        ])

    def _check_finite(self, rows: list[torch.Tensor], first_step: int) -> None:
        stacked = torch.stack(rows)
        bad = ~torch.isfinite(stacked)
        if bool(bad.any()):
            r, c = (int(i) for i in bad.nonzero()[0])
            names = ["total", *(self.term_names or [])]
            raise NonFiniteLoss(self.progress.epoch + 1, first_step + r + 1, names[c], float(stacked[r, c]))

    # ----------------------------------------------------------------------------------------- run
    def run(self, resume: bool = False) -> dict[str, Any]:
        """Train to the last epoch (resuming from `last.pt` when asked) and write every output."""
        self.out.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        resumed_from = None
        if resume:
            found = latest_valid_checkpoint(self.out)
            if found is not None:
                resumed_from, state = found
                self._restore(state, resumed_from)
        elif (self.out / "last.pt").exists():
            raise RunDirError(f"{self.out} already holds a run: resume it or choose another directory")
        (self.out / "spec.json").write_text(self.spec.to_json() + "\n")
        self._rewrite_metrics()
        p = self.progress
        if self.teacher is not None and p.teacher_top1 is None:
            p.teacher_top1 = self._evaluate(self.teacher)["top1"]
        steps_hint = len(self.data.train) // self.spec.optim.batch_size
        self.cb.on_start({"device": str(self.device), "precision": self.execution.precision,
                          "channels_last": self.channels_last, "compile": self.spec.compile,
                          "epochs": self.spec.optim.epochs,
                          "steps_per_epoch": steps_hint, "teacher_top1": p.teacher_top1,
                          "resumed_from": str(resumed_from) if resumed_from else None,
                          "start_epoch": p.epoch + 1})
        epochs = self.spec.optim.epochs
        self.started_at_epoch = p.epoch + 1
        while p.epoch < epochs:
            self._run_epoch()
        summary = self._finish(time.perf_counter() - started)
        return summary

    def _run_epoch(self) -> None:
        p, spec = self.progress, self.spec
        lr = lr_at(spec, p.epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.student.train()
        self.method.train()
        batches, steps = self._batches(p.epoch, p.step)
        t0 = time.perf_counter()
        rows: list[torch.Tensor] = []
        first = p.step
        for x, y, idx in batches:
            row = self._step(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True),
                             idx.to(self.device, non_blocking=True))
            # Sequential float64 sums make the epoch's means identical whether or not it was interrupted.
            p.accum = row if p.accum is None else p.accum + row
            rows.append(row)
            p.step += 1
            live = None
            if len(rows) >= self.check_every or p.step == steps:
                self._check_finite(rows, first)
                first, rows = p.step, []
                live = self._live(row)
            self.cb.on_step(p.epoch + 1, p.step, steps, live)
            reason = self.cb.should_stop()
            if reason:
                if rows:
                    self._check_finite(rows, first)
                p.epoch_seconds += time.perf_counter() - t0
                self._checkpoint("last.pt", "last")
                raise StopRequested(reason, p.epoch + 1, p.step)
        p.epoch_seconds += time.perf_counter() - t0
        self._end_epoch(steps)

    def _live(self, row: torch.Tensor) -> dict[str, float]:
        values = row.tolist()
        names = ["loss", *(self.term_names or [])]
        live = dict(zip(names, values[: len(names)], strict=True))
        live["acc"] = 100.0 * values[-2] / max(values[-1], 1.0)
        return live

    def _end_epoch(self, steps: int) -> None:
        p, spec = self.progress, self.spec
        epoch = p.epoch + 1
        metrics: dict[str, Any] = {"epoch": epoch, "lr": lr_at(spec, p.epoch), "steps": steps}
        if p.accum is not None:
            sums = p.accum.tolist()
            n_steps = max(steps, 1)
            metrics["loss"] = sums[0] / n_steps
            for name, value in zip(self.term_names or [], sums[1:-2], strict=True):
                metrics[f"loss_{name}"] = value / n_steps
            metrics["train_top1"] = 100.0 * sums[-2] / max(sums[-1], 1.0)
            metrics["images_per_second"] = sums[-1] / max(p.epoch_seconds, 1e-9)
        metrics["epoch_seconds"] = p.epoch_seconds
        if epoch % spec.eval_every == 0 or epoch == spec.optim.epochs:
            ev = self._evaluate(self.student_fn)
            metrics.update({"test_top1": ev["top1"], "test_top5": ev["top5"], "test_loss": ev["loss"]})
        if p.teacher_top1 is not None:
            metrics["teacher_top1"] = p.teacher_top1
        p.history.append(metrics)
        self._append_metrics(metrics)
        is_best = "test_top1" in metrics and metrics["test_top1"] > p.best_top1
        if is_best:
            p.best_top1 = metrics["test_top1"]
        p.epoch, p.step, p.accum, p.epoch_seconds = p.epoch + 1, 0, None, 0.0
        if epoch % spec.checkpoint_every == 0 or epoch == spec.optim.epochs:
            self._checkpoint("last.pt", "last")
        if is_best:
            self._checkpoint("best.pt", "best")
        self.cb.on_epoch_end(metrics)

    def _evaluate(self, model: nn.Module) -> dict[str, float]:
        loader = make_loader(self.data.test, self.data.info, batch_size=max(self.spec.optim.batch_size, 256),
                             train=False, device=self.device, seed=self.spec.seed, epoch=0,
                             fast=self.spec.fast_data, num_workers=self.spec.num_workers)
        # Always float32: the reported accuracy is that of the exported weights, whatever trained them.
        return evaluate(model, loader, self.device, channels_last=self.channels_last)

    # ----------------------------------------------------------------------------------------- outputs
    def _append_metrics(self, metrics: dict[str, Any]) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _rewrite_metrics(self) -> None:
        # After a resume the file may hold epochs newer than the checkpoint; the history is the truth.
        lines = "".join(json.dumps(m) + "\n" for m in self.progress.history)
        (self.out / "metrics.jsonl").write_text(lines)

    def _finish(self, wall: float) -> dict[str, Any]:
        p, spec = self.progress, self.spec
        last = p.history[-1] if p.history else {}
        info = self.data.info
        total_images = sum(m.get("images_per_second", 0.0) * m.get("epoch_seconds", 0.0) for m in p.history)
        total_seconds = sum(m.get("epoch_seconds", 0.0) for m in p.history)
        summary: dict[str, Any] = {
            "kind": spec.kind,
            "model": spec.model,
            "method": spec.method.name,
            "final_top1": last.get("test_top1"),
            "final_top5": last.get("test_top5"),
            "best_top1": p.best_top1 if p.best_top1 >= 0 else None,
            "teacher_top1": p.teacher_top1,
            "epochs": len(p.history),
            "started_at_epoch": self.started_at_epoch,  # > 1 when this session resumed a run
            "wall_seconds": wall,
            "precision": self.execution.precision,  # what `precision: auto` became on this machine
            "images_per_second": total_images / total_seconds if total_seconds > 0 else None,
        }
        card = {
            "architecture": spec.model,
            "num_classes": info.num_classes,
            "classes": list(info.classes),
            "input_size": [3, info.image_size, info.image_size],
            "normalization": {"mean": list(info.mean), "std": list(info.std)},
            "dataset": spec.dataset.name,
            "top1": summary["final_top1"],
            "best_top1": summary["best_top1"],
            "teacher": ({"architecture": spec.teacher.architecture, "top1": p.teacher_top1}
                        if spec.teacher else None),
            "method": spec.method.name,
            "spec": json.loads(spec.model_dump_json()),
            "weights": "student.safetensors",
            "output": "forward(x) -> (features, logits)",
        }
        weights, card_path = export_student(self.student, self.out, card)
        self.cb.on_checkpoint("student", weights, sha256_file(weights))
        self.cb.on_checkpoint("card", card_path, sha256_file(card_path))
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def train(
    spec: JobSpec,
    out_dir: Path,
    *,
    callbacks: Callbacks | None = None,
    resume: bool = False,
    teacher_weights: Path | None = None,
) -> dict[str, Any]:
    """Run `spec` into `out_dir` and return its summary (also written to `summary.json`)."""
    return Trainer(spec, out_dir, callbacks=callbacks, teacher_weights=teacher_weights).run(resume=resume)
