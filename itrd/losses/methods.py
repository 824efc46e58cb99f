"""Training objectives by name: the one registry the engine uses, so it never branches on a method.

Every method is a weighted sum of parts: cross-entropy on the labels ("ce"), Hinton KD on the logits
("kd"), ITRD on the pooled features ("corr", "mi") and CRD on the pooled features ("crd"). Adding a
method is adding one registry entry that names its parts and the defaults of its hyper-parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itrd.losses._precision import full_precision
from itrd.losses.crd import CRDLoss
from itrd.losses.itrd import ITRDLoss
from itrd.losses.kd import KDLoss


@dataclass
class Batch:
    """What the engine hands a method each step."""

    student_features: Tensor
    student_logits: Tensor
    targets: Tensor
    indices: Tensor
    teacher_features: Tensor | None = None
    teacher_logits: Tensor | None = None


@dataclass
class MethodOutput:
    """The full float32 objective and its unweighted scalar terms (for logging)."""

    total: Tensor
    terms: dict[str, Tensor]


class _CrossEntropy(nn.Module):
    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        with full_precision(batch.student_logits.device):
            ce = F.cross_entropy(batch.student_logits.float(), batch.targets)
        return self.weight * ce, {"ce": ce}


class _KD(nn.Module):
    def __init__(self, weight: float, temperature: float) -> None:
        super().__init__()
        self.weight = weight
        self.loss = KDLoss(temperature)

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        assert batch.teacher_logits is not None  # Method.forward checked it
        kd = self.loss(batch.student_logits, batch.teacher_logits)
        return self.weight * kd, {"kd": kd}


class _ITRD(nn.Module):
    def __init__(self, loss: ITRDLoss) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        assert batch.teacher_features is not None
        out = self.loss(batch.student_features, batch.teacher_features)
        return out.total, {"corr": out.corr, "mi": out.mi}


class _CRD(nn.Module):
    def __init__(self, weight: float, loss: CRDLoss) -> None:
        super().__init__()
        self.weight = weight
        self.loss = loss

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        assert batch.teacher_features is not None
        crd = self.loss(batch.student_features, batch.teacher_features, batch.indices)
        return self.weight * crd, {"crd": crd}


class Method(nn.Module):
    """A training objective: the sum of its weighted parts.

    Its parameters (ITRD's embed, CRD's heads) are trained by the student's optimizer; its buffers
    (CRD's memory banks) belong in checkpoints.
    """

    def __init__(self, parts: Mapping[str, nn.Module], needs_teacher: bool) -> None:
        super().__init__()
        self.parts = nn.ModuleDict(dict(parts))
        self.needs_teacher = needs_teacher

    def forward(self, batch: Batch) -> MethodOutput:
        """Return the objective for one batch."""
        if self.needs_teacher and (batch.teacher_features is None or batch.teacher_logits is None):
            raise ValueError("this method distils from a teacher: the batch needs its features and logits")
        total = torch.zeros((), dtype=torch.float32, device=batch.student_logits.device)
        terms: dict[str, Tensor] = {}
        for part in self.parts.values():
            weighted, part_terms = part(batch)
            total = total + weighted
            terms.update(part_terms)
        return MethodOutput(total=total, terms=terms)


@dataclass(frozen=True)
class _Context:
    student_dim: int
    teacher_dim: int | None
    num_classes: int
    num_samples: int
    train_targets: Tensor | None


@dataclass(frozen=True)
class _Entry:
    parts: tuple[str, ...]
    defaults: dict[str, float]
    # Values the method fixes and the user may not set, e.g. itrd_corr's beta_mi = 0.
    fixed: dict[str, float] = field(default_factory=dict)


def _teacher_dim(ctx: _Context, part: str) -> int:
    if ctx.teacher_dim is None:
        raise ValueError(f"the {part!r} part distils features: build_method needs teacher_dim")
    return ctx.teacher_dim


def _build_ce(ctx: _Context, p: Mapping[str, float]) -> nn.Module:
    return _CrossEntropy(p["gamma"])


def _build_kd(ctx: _Context, p: Mapping[str, float]) -> nn.Module:
    return _KD(p["kd_weight"], p["temperature"])


def _build_itrd(ctx: _Context, p: Mapping[str, float]) -> nn.Module:
    loss = ITRDLoss(
        ctx.student_dim,
        _teacher_dim(ctx, "itrd"),
        alpha=p["alpha"],
        beta_corr=p["beta_corr"],
        beta_mi=p["beta_mi"],
    )
    return _ITRD(loss)


def _build_crd(ctx: _Context, p: Mapping[str, float]) -> nn.Module:
    loss = CRDLoss(
        ctx.student_dim,
        _teacher_dim(ctx, "crd"),
        ctx.num_samples,
        embed_dim=int(p["crd_dim"]),
        negatives=int(p["crd_negatives"]),
        temperature=p["crd_temperature"],
        momentum=p["crd_momentum"],
        train_targets=ctx.train_targets,
    )
    return _CRD(p["crd_weight"], loss)


_PART_BUILDERS: dict[str, Callable[[_Context, Mapping[str, float]], nn.Module]] = {
    "ce": _build_ce,
    "kd": _build_kd,
    "itrd": _build_itrd,
    "crd": _build_crd,
}
_TEACHER_PARTS = frozenset({"kd", "itrd", "crd"})
_INTEGER_PARAMS = frozenset({"crd_dim", "crd_negatives"})
_POSITIVE_PARAMS = frozenset({"temperature", "crd_temperature", "crd_dim", "crd_negatives"})

# Paper Table 1 for ITRD (alpha 1.01 within a family; the spec passes 1.5 across families).
_ITRD_DEFAULTS = {"beta_corr": 2.0, "beta_mi": 1.0, "alpha": 1.01}
# CRD's published defaults, and RepDistiller's weight for it (-b 0.8).
_CRD_DEFAULTS = {
    "crd_weight": 0.8,
    "crd_dim": 128.0,
    "crd_negatives": 16384.0,
    "crd_temperature": 0.07,
    "crd_momentum": 0.5,
}
_ITRD_CORR_DEFAULTS = {k: v for k, v in _ITRD_DEFAULTS.items() if k != "beta_mi"}
_KD_FULL_CE = {"gamma": 1.0, "kd_weight": 1.0, "temperature": 4.0}

_REGISTRY: dict[str, _Entry] = {
    "ce": _Entry(("ce",), {"gamma": 1.0}),
    # RepDistiller's KD recipe: -r 0.1 -a 0.9, T = 4.
    "kd": _Entry(("ce", "kd"), {"gamma": 0.1, "kd_weight": 0.9, "temperature": 4.0}),
    "itrd": _Entry(("ce", "itrd"), {"gamma": 1.0, **_ITRD_DEFAULTS}),
    "itrd_corr": _Entry(("ce", "itrd"), {"gamma": 1.0, **_ITRD_CORR_DEFAULTS}, fixed={"beta_mi": 0.0}),
    "crd": _Entry(("ce", "crd"), {"gamma": 1.0, **_CRD_DEFAULTS}),
    # Combinations weight KD at 1 beside the full CE, as RepDistiller's "CRD+KD" (-r 1 -a 1 -b 0.8).
    "kd+itrd": _Entry(("ce", "kd", "itrd"), {**_KD_FULL_CE, **_ITRD_DEFAULTS}),
    "kd+crd": _Entry(("ce", "kd", "crd"), {**_KD_FULL_CE, **_CRD_DEFAULTS}),
}


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(method_names())}") from None


def method_names() -> list[str]:
    """The registered method names."""
    return list(_REGISTRY)


def method_defaults(name: str) -> dict[str, float]:
    """The hyper-parameters a method accepts, with their defaults."""
    return dict(_entry(name).defaults)


def method_needs_teacher(name: str) -> bool:
    """Whether the method distils from a teacher (and so needs one trained first)."""
    return any(part in _TEACHER_PARTS for part in _entry(name).parts)


def _resolve_params(name: str, entry: _Entry, params: Mapping[str, float] | None) -> dict[str, float]:
    given = dict(params or {})
    unknown = sorted(set(given) - set(entry.defaults))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(unknown)} for method {name!r}; "
            f"allowed: {', '.join(sorted(entry.defaults))}"
        )
    resolved = {**entry.defaults, **given, **entry.fixed}
    for key, value in resolved.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"parameter {key!r} of method {name!r} must be a finite number, got {value!r}")
        if value < 0 or (key in _POSITIVE_PARAMS and value == 0):
            raise ValueError(f"parameter {key!r} of method {name!r} must be positive, got {value!r}")
        if key in _INTEGER_PARAMS and value != int(value):
            raise ValueError(f"parameter {key!r} of method {name!r} must be a whole number, got {value!r}")
    return {key: float(value) for key, value in resolved.items()}


def build_method(
    name: str,
    *,
    student_dim: int,
    teacher_dim: int | None,
    num_classes: int,
    num_samples: int,
    train_targets: Tensor | None = None,
    params: Mapping[str, float] | None = None,
) -> Method:
    """Build the named method; `params` overrides its defaults and may only name keys it accepts."""
    entry = _entry(name)
    resolved = _resolve_params(name, entry, params)
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if train_targets is not None and train_targets.numel() and int(train_targets.max()) >= num_classes:
        raise ValueError(f"train_targets holds a class >= num_classes ({num_classes})")
    ctx = _Context(student_dim, teacher_dim, num_classes, num_samples, train_targets)
    parts = {part: _PART_BUILDERS[part](ctx, resolved) for part in entry.parts}
    return Method(parts, needs_teacher=method_needs_teacher(name))
