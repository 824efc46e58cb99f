"""What the service knows how to run: architectures, distillation methods, the paper's presets."""

from __future__ import annotations

from functools import lru_cache

from fastapi import APIRouter

from itrd.losses import method_defaults, method_names, method_needs_teacher
from itrd.models import model_family, model_names
from itrd.spec import preset_names, preset_spec
from service.schemas import MethodInfo, ModelInfo, PresetInfo

router = APIRouter(tags=["catalog"])


@router.get("/models", response_model=list[ModelInfo])
def list_models() -> list[ModelInfo]:
    """Every architecture a spec may name, with its family (same family: ITRD alpha 1.01, else 1.5)."""
    return [ModelInfo(name=name, family=model_family(name)) for name in model_names()]


@router.get("/methods", response_model=list[MethodInfo])
def list_methods() -> list[MethodInfo]:
    """Every distillation method, whether it needs a teacher, and its hyper-parameters' defaults."""
    return [
        MethodInfo(name=name, needs_teacher=method_needs_teacher(name), defaults=dict(method_defaults(name)))
        for name in method_names()
    ]


@lru_cache(maxsize=1)
def _presets() -> tuple[PresetInfo, ...]:
    presets = []
    for name in preset_names():
        spec, teacher_spec = preset_spec(name), preset_spec(name, kind="train")
        assert spec.teacher is not None
        presets.append(PresetInfo(
            name=name, teacher=spec.teacher.architecture, student=spec.model, dataset=spec.dataset.name,
            spec=spec.model_dump(mode="json"), teacher_spec=teacher_spec.model_dump(mode="json"),
        ))
    return tuple(presets)


@router.get("/presets", response_model=list[PresetInfo])
def list_presets() -> list[PresetInfo]:
    """The paper's teacher/student pairs and a CPU-sized demo, each with its two specs."""
    return list(_presets())
