"""The method registry: names, defaults, validation, and objectives that add up from their terms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from itrd.losses import (
    Batch,
    CRDLoss,
    ITRDLoss,
    KDLoss,
    Method,
    build_method,
    method_defaults,
    method_names,
    method_needs_teacher,
)

# float(loss) on a graph-carrying scalar is how these tests read values; the warning adds nothing.
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")

N, D_S, D_T, C, NUM_SAMPLES = 8, 6, 10, 5, 40
TERMS = {
    "ce": {"ce"},
    "kd": {"ce", "kd"},
    "itrd": {"ce", "corr", "mi"},
    "itrd_corr": {"ce", "corr", "mi"},
    "crd": {"ce", "crd"},
    "kd+itrd": {"ce", "kd", "corr", "mi"},
    "kd+crd": {"ce", "kd", "crd"},
}
# Which hyper-parameter weights which term.
WEIGHT_OF = {"ce": "gamma", "kd": "kd_weight", "corr": "beta_corr", "mi": "beta_mi", "crd": "crd_weight"}


def build(name: str, **params: float) -> Method:
    torch.manual_seed(0)
    return build_method(
        name,
        student_dim=D_S,
        teacher_dim=D_T,
        num_classes=C,
        num_samples=NUM_SAMPLES,
        train_targets=torch.arange(NUM_SAMPLES) % C,
        params=params or None,
    )


def make_batch(dtype: torch.dtype = torch.float32, requires_grad: bool = False) -> Batch:
    g = torch.Generator().manual_seed(1)
    return Batch(
        student_features=torch.randn(N, D_S, generator=g).to(dtype).requires_grad_(requires_grad),
        student_logits=torch.randn(N, C, generator=g).to(dtype).requires_grad_(requires_grad),
        targets=torch.randint(0, C, (N,), generator=g),
        indices=torch.randperm(NUM_SAMPLES, generator=g)[:N],
        teacher_features=torch.randn(N, D_T, generator=g).to(dtype),
        teacher_logits=torch.randn(N, C, generator=g).to(dtype),
    )


def test_names_and_teacher_flags() -> None:
    assert set(method_names()) == set(TERMS)
    assert not method_needs_teacher("ce")
    assert all(method_needs_teacher(name) for name in TERMS if name != "ce")


def test_defaults_follow_the_papers() -> None:
    assert method_defaults("ce") == {"gamma": 1.0}
    assert method_defaults("kd") == {"gamma": 0.1, "kd_weight": 0.9, "temperature": 4.0}
    assert method_defaults("itrd") == {"gamma": 1.0, "beta_corr": 2.0, "beta_mi": 1.0, "alpha": 1.01}
    assert "beta_mi" not in method_defaults("itrd_corr")
    crd = method_defaults("crd")
    assert (crd["gamma"], crd["crd_weight"], crd["crd_dim"], crd["crd_negatives"]) == (1.0, 0.8, 128, 16384)
    assert (crd["crd_temperature"], crd["crd_momentum"]) == (0.07, 0.5)
    assert set(method_defaults("kd+itrd")) == set(method_defaults("kd")) | set(method_defaults("itrd"))
    assert set(method_defaults("kd+crd")) == set(method_defaults("kd")) | set(crd)
    method_defaults("itrd")["gamma"] = 5.0  # a copy: callers cannot change the registry
    assert method_defaults("itrd")["gamma"] == 1.0


@pytest.mark.parametrize("name", sorted(TERMS))
def test_every_method_adds_up_its_unweighted_terms(name: str) -> None:
    method = build(name).train()
    out = method(make_batch())
    assert set(out.terms) == TERMS[name]
    assert out.total.dtype == torch.float32 and out.total.ndim == 0 and torch.isfinite(out.total)
    weights = {**method_defaults(name), "beta_mi": 0.0 if name == "itrd_corr" else 1.0}
    expected = sum(weights[WEIGHT_OF[term]] * float(value) for term, value in out.terms.items())
    assert float(out.total) == pytest.approx(expected, rel=1e-5)
    assert all(value.dtype == torch.float32 and value.ndim == 0 for value in out.terms.values())


@pytest.mark.parametrize("name", sorted(TERMS))
def test_gradients_reach_the_student_and_the_method(name: str) -> None:
    method = build(name).train()
    batch = make_batch(requires_grad=True)
    method(batch).total.backward()
    assert batch.student_logits.grad is not None and batch.student_logits.grad.abs().sum() > 0
    feature_based = TERMS[name] & {"corr", "crd"}
    assert (batch.student_features.grad is not None) == bool(feature_based)
    for parameter in method.parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all()


def test_terms_match_the_standalone_losses() -> None:
    batch = make_batch()
    out = build("kd+itrd", alpha=1.5, temperature=2.0)(batch)
    assert float(out.terms["ce"]) == pytest.approx(float(F.cross_entropy(batch.student_logits, batch.targets)))
    assert batch.teacher_logits is not None and batch.teacher_features is not None
    kd = KDLoss(2.0)(batch.student_logits, batch.teacher_logits)
    assert float(out.terms["kd"]) == pytest.approx(float(kd))
    torch.manual_seed(0)  # the same embed initialisation as build()
    itrd = ITRDLoss(D_S, D_T, alpha=1.5)(batch.student_features, batch.teacher_features)
    assert float(out.terms["corr"]) == pytest.approx(float(itrd.corr))
    assert float(out.terms["mi"]) == pytest.approx(float(itrd.mi))


def test_params_override_defaults() -> None:
    itrd = build("itrd", alpha=1.5, beta_mi=0.25, gamma=0.0).get_submodule("parts.itrd.loss")
    assert isinstance(itrd, ITRDLoss)
    assert (itrd.alpha, itrd.beta_mi, itrd.beta_corr) == (1.5, 0.25, 2.0)
    crd = build("crd", crd_negatives=7, crd_dim=16).get_submodule("parts.crd.loss")
    assert isinstance(crd, CRDLoss)
    assert crd.negatives == 7 and crd.memory_s.shape == (NUM_SAMPLES, 16)


def test_method_state_holds_embed_heads_and_banks() -> None:
    assert set(build("itrd").state_dict()) == {"parts.itrd.loss.embed.weight", "parts.itrd.loss.embed.bias"}
    assert not list(build("kd").parameters()) and not build("ce").state_dict()
    keys = set(build("crd").state_dict())
    assert {"parts.crd.loss.memory_s", "parts.crd.loss.memory_t", "parts.crd.loss.embed_s.weight"} <= keys


def test_unknown_params_are_refused_with_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match=r"beta_corr.*beta_mi.*gamma") as info:
        build("itrd", beta=1.0)
    assert "beta" in str(info.value) and "alpha" in str(info.value)
    with pytest.raises(ValueError, match="beta_mi"):
        build("itrd_corr", beta_mi=1.0)  # fixed at 0 by the method
    with pytest.raises(ValueError, match="temperature"):
        build("ce", temperature=4.0)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("kd", {"temperature": 0.0}),
        ("itrd", {"gamma": -1.0}),
        ("itrd", {"alpha": float("nan")}),
        ("itrd", {"alpha": 0.2}),
        ("crd", {"crd_negatives": 10.5}),
        ("crd", {"crd_momentum": 1.0}),
        ("crd", {"crd_dim": 0.0}),
    ],
)
def test_bad_values_are_refused(name: str, params: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        build(name, **params)


def test_unknown_method_and_missing_teacher_dim() -> None:
    with pytest.raises(ValueError, match="known methods"):
        method_defaults("fitnet")
    with pytest.raises(ValueError, match="known methods"):
        build("fitnet")
    for name in ("itrd", "crd", "kd+itrd"):
        with pytest.raises(ValueError, match="teacher_dim"):
            build_method(name, student_dim=4, teacher_dim=None, num_classes=C, num_samples=NUM_SAMPLES)
    kd = build_method("kd", student_dim=4, teacher_dim=None, num_classes=C, num_samples=NUM_SAMPLES)
    assert kd.needs_teacher


def test_a_teacher_method_refuses_a_batch_without_teacher() -> None:
    batch = make_batch()
    batch.teacher_logits = None
    with pytest.raises(ValueError, match="teacher"):
        build("kd")(batch)
    assert build("ce")(batch).terms.keys() == {"ce"}


@pytest.mark.parametrize("name", ["kd+itrd", "kd+crd"])
def test_autocast_and_bf16_inputs_give_float32(name: str) -> None:
    method = build(name).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method(make_batch(torch.bfloat16))
    assert out.total.dtype == torch.float32
    assert all(value.dtype == torch.float32 for value in out.terms.values())
