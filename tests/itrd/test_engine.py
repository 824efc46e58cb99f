"""The training engine on the built-in digits: real training, checkpoints, exact resume, clear failures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from itrd.engine import (
    Callbacks,
    NonFiniteLoss,
    RunDirError,
    StopRequested,
    Trainer,
    WeightsError,
    load_checkpoint,
    train,
)
from itrd.models import create_model
from itrd.spec import JobSpec

# Small but real: the whole digits test split, a subset of the training split, a tiny ResNet.
QUICK = {"dataset": {"name": "digits", "subset": 256}, "device": "cpu"}


def spec(**over: Any) -> JobSpec:
    data: dict[str, Any] = {**QUICK, "optim": {"epochs": 2, "batch_size": 64, "lr_decay_epochs": [1]}, **over}
    return JobSpec.model_validate(data)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A resnet8 teacher trained briefly on a digits subset (its quality does not matter here)."""
    out = tmp_path_factory.mktemp("teacher")
    train(spec(kind="train", model="resnet8", optim={"epochs": 1, "lr_decay_epochs": []}), out)
    return out / "student.safetensors"


def distill_spec(teacher: Path, **over: Any) -> JobSpec:
    return spec(model="resnet8", teacher={"architecture": "resnet8", "path": str(teacher)}, **over)


class StopAt(Callbacks):
    """Asks the engine to stop once it reaches (epoch, step)."""

    def __init__(self, epoch: int, step: int) -> None:
        self.at = (epoch, step)
        self.now = (0, 0)

    def on_step(self, epoch: int, step: int, steps_per_epoch: int, live: dict[str, float] | None) -> None:
        self.now = (epoch, step)

    def should_stop(self) -> str | None:
        return "test interruption" if self.now == self.at else None


def strip_timing(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    drop = {"epoch_seconds", "images_per_second"}
    return [{k: v for k, v in m.items() if k not in drop} for m in lines]


def metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_distill_run_writes_every_output(teacher_file: Path, tmp_path: Path) -> None:
    seen: dict[str, Any] = {"steps": 0, "epochs": [], "ckpt": []}

    class Watch(Callbacks):
        def on_start(self, info: dict[str, Any]) -> None:
            seen["start"] = info

        def on_step(self, epoch: int, step: int, steps_per_epoch: int, live: dict[str, float] | None) -> None:
            seen["steps"] += 1
            assert live is not None and {"loss", "ce", "corr", "mi", "acc"} <= set(live)

        def on_epoch_end(self, m: dict[str, Any]) -> None:
            seen["epochs"].append(m["epoch"])

        def on_checkpoint(self, kind: str, path: Path, sha256: str) -> None:
            seen["ckpt"].append(kind)

    s = distill_spec(teacher_file)
    summary = train(s, tmp_path, callbacks=Watch())
    assert seen["start"]["teacher_top1"] is not None
    assert seen["epochs"] == [1, 2] and seen["steps"] == 2 * (256 // 64)
    assert seen["ckpt"].count("last") == 2 and "student" in seen["ckpt"] and "card" in seen["ckpt"]
    for name in ("spec.json", "metrics.jsonl", "last.pt", "last.pt.sha256", "best.pt", "student.safetensors",
                 "model_card.json", "summary.json"):
        assert (tmp_path / name).exists(), name
    m = metrics(tmp_path)
    assert [x["epoch"] for x in m] == [1, 2] and m[0]["lr"] == 0.05 and m[1]["lr"] == pytest.approx(0.005)
    for key in ("loss_ce", "loss_corr", "loss_mi", "test_top1", "test_top5", "teacher_top1", "images_per_second"):
        assert key in m[-1]
    assert summary["final_top1"] == m[-1]["test_top1"]
    assert summary["best_top1"] == max(x["test_top1"] for x in m)
    assert summary["teacher_top1"] == m[-1]["teacher_top1"] and summary["epochs"] == 2
    # The exported student is the trained one, and `itrd eval` reads it back with its model card.
    card = json.loads((tmp_path / "model_card.json").read_text())
    assert card["architecture"] == "resnet8" and card["num_classes"] == 10 and card["method"] == "itrd"
    from itrd.cli.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(tmp_path / "student.safetensors", device="cpu")
    assert result["images"] == 359 and 0.0 <= result["top1"] <= 100.0  # `itrd eval` reads the whole split
    ckpt = load_checkpoint(tmp_path / "last.pt")
    exported = load_file(str(tmp_path / "student.safetensors"))
    assert exported.keys() == ckpt["student"].keys()
    assert all(torch.equal(exported[k], ckpt["student"][k]) for k in exported)
    assert {"student", "method", "optimizer", "rng", "epoch", "spec"} <= set(ckpt)
    assert "embed.weight" in "".join(ckpt["method"])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_same_seed_is_bit_repeatable(teacher_file: Path, tmp_path: Path, precision: str) -> None:
    s = distill_spec(teacher_file, optim={"epochs": 1, "lr_decay_epochs": []}, precision=precision)
    train(s, tmp_path / "a")
    train(s, tmp_path / "b")
    a, b = load_file(str(tmp_path / "a/student.safetensors")), load_file(str(tmp_path / "b/student.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert strip_timing(metrics(tmp_path / "a")) == strip_timing(metrics(tmp_path / "b"))


@pytest.mark.parametrize(("stop", "precision"), [((1, 2), "fp32"), ((1, 4), "fp32"), ((2, 1), "fp32"),
                                                ((1, 2), "bf16")],
                         ids=["mid-epoch", "epoch-end", "second-epoch", "mid-epoch-bf16"])
def test_resume_gives_exactly_the_uninterrupted_run(teacher_file: Path, tmp_path: Path,
                                                    stop: tuple[int, int], precision: str) -> None:
    s = distill_spec(teacher_file, method={"name": "kd+itrd"}, precision=precision)
    train(s, tmp_path / "whole")
    with pytest.raises(StopRequested):
        train(s, tmp_path / "cut", callbacks=StopAt(*stop))
    state = load_checkpoint(tmp_path / "cut/last.pt")
    assert (state["epoch"] + 1, state["step"]) == stop
    train(s, tmp_path / "cut", resume=True)
    assert strip_timing(metrics(tmp_path / "whole")) == strip_timing(metrics(tmp_path / "cut"))
    a = load_file(str(tmp_path / "whole/student.safetensors"))
    b = load_file(str(tmp_path / "cut/student.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_training_reports_the_float32_accuracy_of_its_exported_weights(teacher_file: Path,
                                                                           tmp_path: Path) -> None:
    from itrd.data import make_loader
    from itrd.engine import evaluate

    trainer = Trainer(distill_spec(teacher_file, precision="bf16", optim={"epochs": 1, "lr_decay_epochs": []}),
                      tmp_path)
    summary = trainer.run()
    assert summary["precision"] == "bf16"
    weights = load_file(str(tmp_path / "student.safetensors"))
    assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())  # master weights
    model = create_model("resnet8", 10)
    model.load_state_dict(weights)
    loader = make_loader(trainer.data.test, trainer.data.info, batch_size=100, train=False,
                         device=torch.device("cpu"), seed=0, epoch=0)
    result = evaluate(model, loader, torch.device("cpu"))  # float32, default layout: how a user runs it
    assert result["top1"] == pytest.approx(summary["final_top1"], abs=1e-6)


def test_crd_memory_banks_resume_exactly(teacher_file: Path, tmp_path: Path) -> None:
    s = distill_spec(teacher_file, method={"name": "crd"}, optim={"epochs": 1, "lr_decay_epochs": []})
    train(s, tmp_path / "whole")
    with pytest.raises(StopRequested):
        train(s, tmp_path / "cut", callbacks=StopAt(1, 2))
    train(s, tmp_path / "cut", resume=True)
    a, b = load_checkpoint(tmp_path / "whole/last.pt"), load_checkpoint(tmp_path / "cut/last.pt")
    assert all(torch.equal(a["method"][k], b["method"][k]) for k in a["method"])


def test_non_finite_loss_names_epoch_step_and_term(tmp_path: Path) -> None:
    bad = create_model("resnet8", 10).state_dict()
    for v in bad.values():
        if v.is_floating_point():
            v.fill_(float("nan"))
    save_file({k: v.contiguous() for k, v in bad.items()}, str(tmp_path / "nan.safetensors"))
    s = distill_spec(tmp_path / "nan.safetensors")
    with pytest.raises(NonFiniteLoss, match=r"epoch 1, step 1: term '(total|corr|mi)'"):
        train(s, tmp_path / "run")


def test_teacher_weights_of_another_architecture_are_refused(teacher_file: Path, tmp_path: Path) -> None:
    s = spec(model="resnet8", teacher={"architecture": "resnet14", "path": str(teacher_file)})
    with pytest.raises(WeightsError, match=r"do not fit architecture 'resnet14'.*missing key"):
        Trainer(s, tmp_path)


def test_a_run_directory_is_never_overwritten(teacher_file: Path, tmp_path: Path) -> None:
    s = distill_spec(teacher_file, optim={"epochs": 1, "lr_decay_epochs": []})
    train(s, tmp_path)
    with pytest.raises(RunDirError, match="already holds a run"):
        train(s, tmp_path)
    other = distill_spec(teacher_file, optim={"epochs": 1, "lr_decay_epochs": [], "lr": 0.1})
    with pytest.raises(RunDirError, match=r"different spec.*optim"):
        train(other, tmp_path, resume=True)


@pytest.mark.slow
def test_compiled_run_resumes_an_eager_one_and_reports_true_accuracy(teacher_file: Path, tmp_path: Path) -> None:
    """`compile: true` (torch.compile, C++ kernels on the CPU) trains, and may be switched on at a resume."""
    eager = distill_spec(teacher_file, optim={"epochs": 1, "lr_decay_epochs": []}, precision="fp32")
    with pytest.raises(StopRequested):
        train(eager, tmp_path, callbacks=StopAt(1, 2))
    compiled = eager.model_copy(update={"compile": True})
    summary = train(compiled, tmp_path, resume=True)
    m = metrics(tmp_path)
    assert len(m) == 1 and all(m[0][k] == m[0][k] for k in ("loss", "loss_corr", "loss_mi"))  # finite
    from itrd.data import make_loader
    from itrd.engine import evaluate

    model = create_model("resnet8", 10)
    model.load_state_dict(load_file(str(tmp_path / "student.safetensors")))
    data = Trainer(eager, tmp_path / "probe").data
    loader = make_loader(data.test, data.info, batch_size=100, train=False, device=torch.device("cpu"),
                         seed=0, epoch=0)
    eager_top1 = evaluate(model, loader, torch.device("cpu"))["top1"]
    # Compiled kernels round differently from eager ones: allow one image of the 256 to flip.
    assert abs(eager_top1 - summary["final_top1"]) <= 100.0 / 256 + 1e-9
