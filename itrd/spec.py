"""The job spec: one pydantic model shared by the CLI, the API and the worker.

A spec is resolved when it is validated: every default that depends on other fields (the ITRD
alpha by architecture family, the learning rate for MobileNet/ShuffleNet students, the method's
hyper-parameters) is written into the model, so a stored spec says exactly what ran.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from itrd.data import dataset_names
from itrd.losses import method_defaults, method_names, method_needs_teacher
from itrd.models import model_family, model_names

__all__ = [
    "DatasetSpec",
    "JobSpec",
    "MethodSpec",
    "OptimSpec",
    "TeacherSpec",
    "ValidationError",
    "load_spec",
    "preset_names",
    "preset_spec",
]

# Students that the paper trains with lr 0.01 instead of 0.05 (itrd-method.md, training recipe).
LOW_LR_STUDENTS = frozenset({"MobileNetV2", "ShuffleV1", "ShuffleV2"})
ALPHA_SAME_FAMILY = 1.01
ALPHA_CROSS_FAMILY = 1.5
MAX_EPOCHS = 1000
MAX_BATCH = 4096


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=False)


class TeacherSpec(_Strict):
    """The frozen teacher: its architecture and exactly one source of weights."""

    architecture: str
    path: str | None = Field(None, description="weights file (.pt state dict or .safetensors), CLI only")
    job: str | None = Field(None, description="id of a succeeded teacher-training job of the service")
    upload: str | None = Field(None, description="id of a teacher uploaded to the service")

    @model_validator(mode="after")
    def _one_source(self) -> TeacherSpec:
        given = [k for k in ("path", "job", "upload") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                "teacher needs exactly one weights source: 'path' (a file), 'job' (a teacher job id) "
                f"or 'upload' (an uploaded teacher id); got {given or 'none'}"
            )
        return self


class DatasetSpec(_Strict):
    """Which dataset, where it lives, and whether it may be downloaded."""

    name: str = "digits"
    root: str | None = Field(None, description="directory holding the dataset files")
    download: bool = Field(False, description="fetch the dataset if it is missing (never done implicitly)")
    subset: int | None = Field(
        None, ge=2, description="use at most N images of each split: a quick check of a spec, not a result"
    )

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in dataset_names():
            raise ValueError(f"unknown dataset {v!r}; known: {', '.join(dataset_names())}")
        return v


class MethodSpec(_Strict):
    """The distillation method and its hyper-parameters (unset ones take the method's defaults)."""

    name: str = "itrd"
    params: dict[str, float] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in method_names():
            raise ValueError(f"unknown method {v!r}; known: {', '.join(method_names())}")
        return v

    @model_validator(mode="after")
    def _known_params(self) -> MethodSpec:
        allowed = method_defaults(self.name)
        unknown = sorted(set(self.params) - set(allowed))
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {', '.join(unknown)} for method {self.name!r}; "
                f"allowed: {', '.join(sorted(allowed)) or 'none'}"
            )
        return self


class OptimSpec(_Strict):
    """SGD with a step learning-rate schedule: the paper's CIFAR recipe by default."""

    epochs: int = Field(240, ge=1, le=MAX_EPOCHS)
    batch_size: int = Field(64, ge=2, le=MAX_BATCH, description="a batch of one cannot be distilled")
    lr: float | None = Field(None, gt=0, le=10, description="default 0.05, or 0.01 for MobileNet/ShuffleNet")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0, le=1)
    lr_decay_epochs: list[int] = Field(default_factory=lambda: [150, 180, 210])
    lr_decay_rate: float = Field(0.1, gt=0, le=1)

    @model_validator(mode="after")
    def _decay_within_run(self) -> OptimSpec:
        late = [e for e in self.lr_decay_epochs if e < 1 or e > self.epochs]
        if late:
            raise ValueError(
                f"lr_decay_epochs {late} lie outside the run's epochs 1..{self.epochs}: "
                "lower them or raise epochs"
            )
        if sorted(self.lr_decay_epochs) != self.lr_decay_epochs:
            raise ValueError("lr_decay_epochs must be increasing")
        return self


class JobSpec(_Strict):
    """Everything needed to train a teacher (kind='train') or distill a student (kind='distill')."""

    kind: Literal["train", "distill"] = "distill"
    model: str = Field(description="the network being trained: the teacher for 'train', the student for 'distill'")
    teacher: TeacherSpec | None = None
    dataset: DatasetSpec = Field(default_factory=lambda: DatasetSpec())
    method: MethodSpec = Field(
        default_factory=lambda: MethodSpec(name="itrd"),
        description="default: 'itrd' for distill jobs, 'ce' for teacher training",
    )
    optim: OptimSpec = Field(default_factory=lambda: OptimSpec())
    seed: int = Field(0, ge=0, le=2**31 - 1)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16 autocast (losses and evaluation stay float32) or float32; auto: bf16 where the "
        "device multiplies bf16 natively (CUDA; CPUs with AMX or AVX512-BF16), float32 elsewhere",
    )
    compile: bool = Field(False, description="torch.compile the student and the teacher (pays off on long runs)")
    channels_last: bool | None = Field(
        None, description="NHWC memory format; auto (null): on wherever oneDNN or cuDNN runs the convolutions")
    fast_data: bool | None = Field(None, description="keep the dataset on the device; auto: when it fits")
    num_workers: int = Field(0, ge=0, le=64, description="DataLoader workers for the per-sample path")
    eval_every: int = Field(1, ge=1, description="evaluate every N epochs (and always after the last)")
    checkpoint_every: int = Field(1, ge=1, description="write last.pt every N epochs (and at the end)")
    callback_url: str | None = Field(
        None, max_length=2048, pattern=r"^https?://[^\s]+$",
        description="the service POSTs the ended job here, signed with HMAC-SHA256 (X-ITRD-Signature)",
    )

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        _check_architecture(v)
        return v

    @model_validator(mode="after")
    def _resolve(self) -> JobSpec:
        if self.kind == "train":
            if self.teacher is not None:
                raise ValueError("a 'train' job trains a teacher from scratch: remove 'teacher'")
            if "method" not in self.model_fields_set:
                self.method = MethodSpec(name="ce")
            elif self.method.name != "ce":
                raise ValueError("a 'train' job uses method 'ce' (plain cross-entropy)")
        else:
            # 'ce' as a distill job is the student-alone baseline: the teacher is then optional.
            if method_needs_teacher(self.method.name) and self.teacher is None:
                raise ValueError(
                    f"a 'distill' job with method {self.method.name!r} needs a 'teacher' "
                    "(architecture and weights: path, job or upload)"
                )
            if self.teacher is not None:
                _check_architecture(self.teacher.architecture)
        params = dict(method_defaults(self.method.name))
        if "alpha" in params and "alpha" not in self.method.params and self.teacher is not None:
            same = model_family(self.model) == model_family(self.teacher.architecture)
            params["alpha"] = ALPHA_SAME_FAMILY if same else ALPHA_CROSS_FAMILY
        params.update(self.method.params)
        self.method.params = params
        if self.optim.lr is None:
            self.optim.lr = 0.01 if self.model in LOW_LR_STUDENTS else 0.05
        return self

    def to_json(self) -> str:
        """The spec as indented JSON (what runs and jobs store)."""
        return self.model_dump_json(indent=2)


def _check_architecture(name: str) -> None:
    if name not in model_names():
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(model_names())}")


def load_spec(path: str | Path) -> JobSpec:
    """Read a spec from a YAML or JSON file (chosen by the file's suffix; YAML otherwise)."""
    p = Path(path)
    text = p.read_text()
    data: Any = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{p}: a spec file must hold a mapping of fields, got {type(data).__name__}")
    return JobSpec.model_validate(data)


# The paper's 13 CIFAR-100 teacher -> student pairs (Table 1) and its ImageNet pair (section 5.1).
_CIFAR_PAIRS: dict[str, tuple[str, str]] = {
    "wrn_40_2-wrn_16_2": ("wrn_40_2", "wrn_16_2"),
    "wrn_40_2-wrn_40_1": ("wrn_40_2", "wrn_40_1"),
    "resnet56-resnet20": ("resnet56", "resnet20"),
    "resnet110-resnet20": ("resnet110", "resnet20"),
    "resnet110-resnet32": ("resnet110", "resnet32"),
    "resnet32x4-resnet8x4": ("resnet32x4", "resnet8x4"),
    "vgg13-vgg8": ("vgg13", "vgg8"),
    "vgg13-MobileNetV2": ("vgg13", "MobileNetV2"),
    "ResNet50-MobileNetV2": ("ResNet50", "MobileNetV2"),
    "ResNet50-vgg8": ("ResNet50", "vgg8"),
    "resnet32x4-ShuffleV1": ("resnet32x4", "ShuffleV1"),
    "resnet32x4-ShuffleV2": ("resnet32x4", "ShuffleV2"),
    "wrn_40_2-ShuffleV1": ("wrn_40_2", "ShuffleV1"),
}
_IMAGENET_PAIR = "imagenet-resnet34-resnet18"
# A pair small enough to run on two CPU cores in minutes, on the built-in digits.
_DEMO_PAIR = "demo-digits"


def preset_names() -> list[str]:
    """Names of the built-in presets: the paper's pairs plus a CPU-sized demo."""
    return [*_CIFAR_PAIRS, _IMAGENET_PAIR, _DEMO_PAIR]


def preset_spec(name: str, kind: Literal["train", "distill"] = "distill", teacher_path: str | None = None) -> JobSpec:
    """The spec of a preset: the teacher-training job (kind='train') or the distillation job."""
    if name in _CIFAR_PAIRS:
        teacher, student = _CIFAR_PAIRS[name]
        dataset: dict[str, Any] = {"name": "cifar100", "root": "data/cifar100"}
        optim: dict[str, Any] = {}
    elif name == _IMAGENET_PAIR:
        teacher, student = "resnet34", "resnet18"
        dataset = {"name": "imagefolder", "root": "data/imagenet"}
        optim = {"epochs": 100, "batch_size": 256, "lr": 0.1, "weight_decay": 1e-4,
                 "lr_decay_epochs": [30, 60, 90]}
    elif name == _DEMO_PAIR:
        # ResNet-20 reaches ~97% on the digits in five epochs on two CPU cores (about a minute).
        teacher, student = "resnet20", "resnet8"
        dataset = {"name": "digits"}
        optim = {"epochs": 5, "batch_size": 64, "lr": 0.1, "lr_decay_epochs": [4]}
    else:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(preset_names())}")
    base: dict[str, Any] = {"dataset": dataset, "optim": optim}
    if kind == "train":
        return JobSpec.model_validate({**base, "kind": "train", "model": teacher, "method": {"name": "ce"}})
    path = teacher_path or f"teachers/{teacher}.safetensors"
    return JobSpec.model_validate(
        {**base, "kind": "distill", "model": student, "teacher": {"architecture": teacher, "path": path}}
    )
