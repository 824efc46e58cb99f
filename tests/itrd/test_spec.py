"""The job spec: paper defaults, resolution rules, and validation messages that say what to fix."""

from __future__ import annotations

import json

import pytest
import yaml
from pydantic import ValidationError

from itrd.spec import JobSpec, load_spec, preset_names, preset_spec

TEACHER = {"architecture": "resnet32x4", "path": "t.safetensors"}


def distill(**over: object) -> JobSpec:
    data: dict[str, object] = {"model": "resnet8x4", "teacher": TEACHER, **over}
    return JobSpec.model_validate(data)


def test_defaults_are_the_papers_recipe() -> None:
    s = distill()
    assert s.kind == "distill" and s.method.name == "itrd"
    assert s.method.params["beta_corr"] == 2.0 and s.method.params["beta_mi"] == 1.0
    assert s.method.params["gamma"] == 1.0
    assert s.optim.epochs == 240 and s.optim.batch_size == 64 and s.optim.lr == 0.05
    assert s.optim.momentum == 0.9 and s.optim.weight_decay == 5e-4
    assert s.optim.lr_decay_epochs == [150, 180, 210] and s.optim.lr_decay_rate == 0.1


def test_alpha_follows_architecture_families() -> None:
    assert distill().method.params["alpha"] == 1.01
    assert distill(model="ShuffleV2").method.params["alpha"] == 1.5
    assert distill(method={"name": "itrd", "params": {"alpha": 1.2}}).method.params["alpha"] == 1.2


def test_low_lr_for_mobile_students_unless_given() -> None:
    assert distill(model="MobileNetV2").optim.lr == 0.01
    assert distill(model="ShuffleV1").optim.lr == 0.01
    assert distill(model="ShuffleV1", optim={"lr": 0.02}).optim.lr == 0.02


def test_train_kind_defaults_to_cross_entropy_and_refuses_a_teacher() -> None:
    s = JobSpec.model_validate({"kind": "train", "model": "resnet32x4"})
    assert s.method.name == "ce" and s.teacher is None
    with pytest.raises(ValidationError, match="remove 'teacher'"):
        JobSpec.model_validate({"kind": "train", "model": "resnet32x4", "teacher": TEACHER})
    with pytest.raises(ValidationError, match="uses method 'ce'"):
        JobSpec.model_validate({"kind": "train", "model": "resnet32x4", "method": {"name": "kd"}})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"model": "resnet9000", "teacher": TEACHER}, "unknown architecture 'resnet9000'; known: .*resnet8x4"),
        ({"model": "resnet8x4"}, "needs a 'teacher'"),
        ({"model": "resnet8x4", "teacher": {"architecture": "nope", "path": "x"}}, "unknown architecture 'nope'"),
        ({"model": "resnet8x4", "teacher": {"architecture": "resnet32x4"}}, "exactly one weights source"),
        ({"model": "resnet8x4", "teacher": TEACHER, "optim": {"epochs": 0}}, "epochs"),
        ({"model": "resnet8x4", "teacher": TEACHER, "optim": {"epochs": 100000}}, "epochs"),
        ({"model": "resnet8x4", "teacher": TEACHER, "optim": {"batch_size": 1}}, "batch_size"),
        ({"model": "resnet8x4", "teacher": TEACHER, "optim": {"epochs": 100}}, r"lr_decay_epochs \[150, 180, 210\]"),
        ({"model": "resnet8x4", "teacher": TEACHER, "method": {"name": "itrd", "params": {"betta": 1}}},
         "unknown parameter.*betta.*allowed: .*beta_corr"),
        ({"model": "resnet8x4", "teacher": TEACHER, "method": {"name": "magic"}}, "unknown method 'magic'"),
        ({"model": "resnet8x4", "teacher": TEACHER, "dataset": {"name": "mnist"}}, "unknown dataset 'mnist'"),
        ({"model": "resnet8x4", "teacher": TEACHER, "learning_rate": 0.1}, "learning_rate"),
        ({"model": "resnet8x4", "teacher": TEACHER, "device": "tpu"}, "device"),
    ],
)
def test_validation_says_what_to_fix(data: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        JobSpec.model_validate(data)


def test_ce_distill_job_is_the_student_alone_baseline() -> None:
    s = JobSpec.model_validate({"model": "resnet8x4", "method": {"name": "ce"}})
    assert s.teacher is None


def test_yaml_and_json_files_load_the_same(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = {"model": "wrn_16_2", "teacher": {"architecture": "wrn_40_2", "path": "w.pt"},
            "optim": {"epochs": 3, "lr_decay_epochs": [2]}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / "s.json").write_text(json.dumps(data))
    a, b = load_spec(tmp_path / "s.yaml"), load_spec(tmp_path / "s.json")
    assert a == b and a.optim.epochs == 3
    (tmp_path / "bad.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        load_spec(tmp_path / "bad.yaml")


def test_resolved_spec_round_trips() -> None:
    s = distill(model="ShuffleV2")
    again = JobSpec.model_validate_json(s.to_json())
    assert again == s


def test_presets_cover_the_papers_pairs() -> None:
    names = preset_names()
    assert len([n for n in names if not n.startswith(("imagenet", "demo"))]) == 13
    for name in names:
        d = preset_spec(name)
        t = preset_spec(name, kind="train")
        assert d.teacher is not None and t.model == d.teacher.architecture and t.method.name == "ce"
    r = preset_spec("resnet32x4-ShuffleV2")
    assert r.optim.lr == 0.01 and r.method.params["alpha"] == 1.5
    i = preset_spec("imagenet-resnet34-resnet18")
    assert i.model == "resnet18" and i.optim.lr_decay_epochs == [30, 60, 90] and i.optim.epochs == 100
    with pytest.raises(ValueError, match="unknown preset"):
        preset_spec("nope")
