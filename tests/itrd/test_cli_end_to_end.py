"""The CLI end to end on the built-in digits: a good teacher, then a student distilled from it with ITRD."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from itrd.cli import cli

pytestmark = pytest.mark.slow


def itrd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "itrd", *args], capture_output=True, text=True, timeout=900)


def test_teacher_then_itrd_student_through_the_cli(tmp_path: Path) -> None:
    optim = {"epochs": 5, "batch_size": 64, "lr": 0.1, "lr_decay_epochs": [4]}
    teacher_spec = {"kind": "train", "model": "resnet20", "dataset": {"name": "digits"}, "optim": optim,
                    "device": "cpu"}
    (tmp_path / "teacher.yaml").write_text(yaml.safe_dump(teacher_spec))
    run = itrd("train", str(tmp_path / "teacher.yaml"), "--out", str(tmp_path / "teacher"))
    assert run.returncode == 0, run.stderr[-3000:]
    teacher = json.loads((tmp_path / "teacher/summary.json").read_text())
    assert teacher["final_top1"] >= 90.0, teacher  # digits are easy: a real teacher is clearly good
    assert "epoch 5/5" in run.stderr  # the progress lines
    # The start line says how `auto` resolved here, as summary.json records it.
    assert f"device cpu, {teacher['precision']}, channels_last" in run.stdout + run.stderr

    student_spec = {"kind": "distill", "model": "resnet8", "dataset": {"name": "digits"},
                    "teacher": {"architecture": "resnet20", "path": str(tmp_path / "teacher/student.safetensors")},
                    "method": {"name": "itrd"}, "optim": {**optim, "epochs": 3, "lr_decay_epochs": [2]},
                    "device": "cpu"}
    (tmp_path / "student.json").write_text(json.dumps(student_spec))
    run = itrd("train", str(tmp_path / "student.json"), "--out", str(tmp_path / "student"))
    assert run.returncode == 0, run.stderr[-3000:]
    student = json.loads((tmp_path / "student/summary.json").read_text())
    assert student["teacher_top1"] == pytest.approx(teacher["final_top1"])
    assert student["final_top1"] > 50.0, student  # well above chance (10%) after three epochs
    metrics = [json.loads(line) for line in (tmp_path / "student/metrics.jsonl").read_text().splitlines()]
    assert all(m["loss_corr"] == m["loss_corr"] and "loss_mi" in m for m in metrics)

    # The saved student reloads and reproduces the reported accuracy on the same (whole) test split.
    result = CliRunner().invoke(cli, ["eval", str(tmp_path / "student/student.safetensors"), "--json",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["top1"] == pytest.approx(student["final_top1"], abs=1e-6)


def test_cli_refuses_a_bad_spec_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"model": "resnet9000", "kind": "train"}))
    run = itrd("train", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "out"))
    assert run.returncode == 2
    assert "unknown architecture 'resnet9000'" in run.stderr and "resnet8x4" in run.stderr


def test_spec_presets_and_models_commands() -> None:
    runner = CliRunner()
    out = runner.invoke(cli, ["spec", "resnet32x4-resnet8x4"])
    assert out.exit_code == 0 and yaml.safe_load(out.output)["teacher"]["architecture"] == "resnet32x4"
    presets = json.loads(runner.invoke(cli, ["presets", "--json"]).output)
    assert len(presets) == 15 and {"name", "teacher", "student"} <= set(presets[0])
    models = runner.invoke(cli, ["models"]).output
    assert "wrn_40_2" in models and "ShuffleV2" in models
