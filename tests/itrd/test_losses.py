"""ITRD and KD losses against independent float64 computations written from the formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

from itrd.losses import DEFAULT_EPS, ITRDLoss, KDLoss, correlation_loss, mutual_information_loss

# float(loss) on a graph-carrying scalar is how these tests read values; the warning adds nothing.
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")

# ---------------------------------------------------------------- references (numpy float64, loops)


def ref_corr(f_s: np.ndarray, f_t: np.ndarray, alpha: float, eps: float) -> float:
    """log2(sum_i |v_i - 1|^(2 alpha)) with batch-standardised columns (unbiased std, eps in the var)."""
    n, d = f_s.shape
    potential = 0.0
    for i in range(d):
        a, b = f_s[:, i], f_t[:, i]
        a_c, b_c = a - a.sum() / n, b - b.sum() / n
        std_a = math.sqrt(float(np.dot(a_c, a_c)) / (n - 1) + eps)
        std_b = math.sqrt(float(np.dot(b_c, b_c)) / (n - 1) + eps)
        v = sum((a_c[k] / std_a) * (b_c[k] / std_b) for k in range(n)) / n
        potential += abs(v - 1.0) ** (2 * alpha)
    return math.log2(potential)


def ref_mi(f_s: np.ndarray, f_t: np.ndarray) -> float:
    """sum(A^2) - sum(B^2), A = G_s / tr(G_s), B = (G_s o G_t) / tr(G_s o G_t), rows L2-normalised."""
    # An all-zero row stays zero (F.normalize's convention), so it drops out of the traces.
    u_s = f_s / np.maximum(np.linalg.norm(f_s, axis=1, keepdims=True), 1e-300)
    u_t = f_t / np.maximum(np.linalg.norm(f_t, axis=1, keepdims=True), 1e-300)
    n = f_s.shape[0]
    g_s = np.array([[float(np.dot(u_s[i], u_s[j])) for j in range(n)] for i in range(n)])
    g_t = np.array([[float(np.dot(u_t[i], u_t[j])) for j in range(n)] for i in range(n)])
    g_st = g_s * g_t
    a = g_s / np.trace(g_s)
    b = g_st / np.trace(g_st)
    return float((a**2).sum() - (b**2).sum())


def ref_itrd(loss: ITRDLoss, z_s: torch.Tensor, z_t: torch.Tensor) -> tuple[float, float, float]:
    """(corr, mi, total) in float64 from the module's embed weights."""
    w = loss.embed.weight.detach().double().numpy()
    bias = loss.embed.bias.detach().double().numpy()
    zs, zt = z_s.double().numpy(), z_t.double().numpy()
    f_s = zs @ w.T + bias
    corr = ref_corr(f_s, zt, loss.alpha, loss.eps)
    mi = ref_mi(f_s if zs.shape[1] != zt.shape[1] else zs, zt)
    return corr, mi, loss.beta_corr * corr + loss.beta_mi * mi


def ref_kd(s: np.ndarray, t: np.ndarray, temperature: float) -> float:
    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    p_s, p_t = softmax(s / temperature), softmax(t / temperature)
    kl = sum(float(np.sum(p_t[i] * (np.log(p_t[i]) - np.log(p_s[i])))) for i in range(s.shape[0]))
    return kl / s.shape[0] * temperature**2


def features(n: int, d_s: int, d_t: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_s, generator=g), torch.randn(n, d_t, generator=g) * 2 + 0.5


def grad_of(t: torch.Tensor) -> torch.Tensor:
    assert t.grad is not None
    return t.grad


def assert_close(actual: torch.Tensor, expected: float, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    assert math.isclose(float(actual.detach()), expected, rel_tol=rtol, abs_tol=atol), (
        float(actual.detach()),
        expected,
    )


# ---------------------------------------------------------------- ITRD values


@pytest.mark.parametrize(("n", "d_s", "d_t", "alpha"), [(8, 5, 7, 1.01), (16, 6, 6, 1.5), (3, 9, 2, 2.0)])
def test_itrd_matches_reference(n: int, d_s: int, d_t: int, alpha: float) -> None:
    torch.manual_seed(1)
    loss = ITRDLoss(d_s, d_t, alpha=alpha, beta_corr=2.0, beta_mi=1.0)
    z_s, z_t = features(n, d_s, d_t)
    out = loss(z_s, z_t)
    corr, mi, total = ref_itrd(loss, z_s, z_t)
    assert_close(out.corr, corr)
    assert_close(out.mi, mi)
    assert_close(out.total, total)
    assert out.total.dtype == torch.float32


def test_eps_sits_inside_the_square_root_like_batch_norm() -> None:
    # Columns with variance near eps tell sqrt(var + eps) apart from std + eps.
    torch.manual_seed(2)
    loss = ITRDLoss(4, 4, eps=1e-3)
    z_s, z_t = features(10, 4, 4)
    z_t = z_t * 0.03
    corr, _, _ = ref_itrd(loss, z_s, z_t)
    assert_close(loss(z_s, z_t).corr, corr)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 16),
    d_s=st.integers(1, 32),
    d_t=st.integers(1, 32),
    scale=st.floats(0.05, 20.0),
    seed=st.integers(0, 2**16),
)
def test_itrd_reference_on_generated_shapes(n: int, d_s: int, d_t: int, scale: float, seed: int) -> None:
    torch.manual_seed(seed)
    loss = ITRDLoss(d_s, d_t)
    z_s, z_t = features(n, d_s, d_t, seed)
    z_s = (z_s * scale).requires_grad_()
    out = loss(z_s, z_t)
    out.total.backward()
    corr, mi, _ = ref_itrd(loss, z_s.detach(), z_t)
    assert torch.isfinite(out.total)
    assert torch.isfinite(grad_of(z_s)).all() and torch.isfinite(grad_of(loss.embed.weight)).all()
    assert_close(out.corr, corr, rtol=2e-4, atol=1e-4)
    assert_close(out.mi, mi, rtol=2e-4, atol=1e-5)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("d_t", [3, 4])
def test_itrd_gradcheck_float64(d_t: int) -> None:
    torch.manual_seed(3)
    loss = ITRDLoss(4, d_t, alpha=1.5).double()
    z_s, z_t = (x.double().requires_grad_() for x in features(6, 4, d_t))
    weight = loss.embed.weight.detach().clone().requires_grad_()
    bias = loss.embed.bias.detach().clone().requires_grad_()

    def total(zs: torch.Tensor, zt: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = functional_call(loss, {"embed.weight": w, "embed.bias": b}, (zs, zt))
        assert out.total.dtype == torch.float64
        return out.total

    assert torch.autograd.gradcheck(total, (z_s, z_t, weight, bias))


def test_term_gradcheck_float64() -> None:
    z_s, z_t = (x.double().requires_grad_() for x in features(5, 3, 3, seed=4))
    assert torch.autograd.gradcheck(lambda a, b: correlation_loss(a, b, 1.01), (z_s, z_t))
    assert torch.autograd.gradcheck(mutual_information_loss, (z_s, z_t))


def test_zero_weight_term_is_reported_without_gradient() -> None:
    loss = ITRDLoss(4, 4, beta_mi=0.0)
    z_s, z_t = features(6, 4, 4)
    out = loss(z_s, z_t)
    assert not out.mi.requires_grad and out.corr.requires_grad
    assert_close(out.total, 2.0 * float(out.corr.detach()))
    assert_close(out.mi, ref_itrd(loss, z_s, z_t)[1])


# ---------------------------------------------------------------- the embed rule


def test_mi_skips_the_embed_when_dims_match() -> None:
    loss = ITRDLoss(5, 5)
    z_s, z_t = features(8, 5, 5)
    before = loss(z_s, z_t)
    with torch.no_grad():
        loss.embed.weight.add_(torch.randn_like(loss.embed.weight))
        loss.embed.bias.add_(1.0)
    after = loss(z_s, z_t)
    assert float(after.mi) == float(before.mi)
    assert abs(float(after.corr) - float(before.corr)) > 1e-3  # corr always embeds


def test_mi_uses_the_shared_embed_when_dims_differ() -> None:
    loss = ITRDLoss(5, 7)
    z_s, z_t = features(8, 5, 7)
    before = loss(z_s, z_t)
    with torch.no_grad():
        loss.embed.weight.add_(torch.randn_like(loss.embed.weight))
    after = loss(z_s, z_t)
    assert abs(float(after.mi) - float(before.mi)) > 1e-4
    assert abs(float(after.corr) - float(before.corr)) > 1e-3
    z = z_s.clone().requires_grad_()
    loss.embed.zero_grad()
    mutual_only = ITRDLoss(5, 7, beta_corr=0.0)
    mutual_only.embed = loss.embed  # one shared module, as in ITRDLoss
    mutual_only(z, z_t).total.backward()
    assert loss.embed.weight.grad is not None and loss.embed.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- numerical edges


def test_batch_of_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        ITRDLoss(4, 4)(torch.randn(1, 4), torch.randn(1, 4))


@pytest.mark.parametrize(
    ("z_s", "z_t"),
    [
        (torch.randn(4, 3), torch.randn(5, 6)),
        (torch.randn(4, 2), torch.randn(4, 6)),
        (torch.randn(4), torch.randn(4)),
    ],
)
def test_bad_shapes_are_refused(z_s: torch.Tensor, z_t: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        ITRDLoss(3, 6)(z_s, z_t)


def test_bad_hyper_parameters_are_refused() -> None:
    for kwargs in ({"alpha": 0.3}, {"alpha": math.nan}, {"beta_mi": -1.0}, {"eps": 0.0}):
        with pytest.raises(ValueError):
            ITRDLoss(3, 3, **kwargs)


def test_constant_columns_give_finite_loss_and_gradients() -> None:
    loss = ITRDLoss(4, 6)
    z_s, z_t = features(8, 4, 6)
    z_t[:, 2] = 3.0  # a dead teacher unit
    z_s = z_s[:1].repeat(8, 1).requires_grad_()  # every embedded student column constant
    out = loss(z_s, z_t)
    out.total.backward()
    assert torch.isfinite(out.total)
    assert torch.isfinite(grad_of(z_s)).all() and torch.isfinite(grad_of(loss.embed.weight)).all()
    # Standardised constant columns are zero, so every v_i = 0 and L_corr = log2(d_t).
    assert_close(out.corr, math.log2(6))
    _, mi, _ = ref_itrd(loss, z_s.detach(), z_t)
    assert_close(out.mi, mi)


def test_log2_argument_is_clamped() -> None:
    # v_i <= (n - 1) / n, so the sum only reaches 0 by underflow: a large alpha underflows float32.
    z = torch.randn(16, 3)
    loss = correlation_loss(z.requires_grad_(), z.detach(), alpha=60.0)
    loss.backward()
    assert torch.isfinite(loss) and float(loss) == pytest.approx(math.log2(torch.finfo(torch.float32).tiny))
    assert torch.isfinite(grad_of(z)).all()


def test_all_zero_rows_give_finite_mi() -> None:
    z = torch.zeros(4, 3, requires_grad=True)
    mi = mutual_information_loss(z, torch.zeros(4, 3))
    mi.backward()
    assert torch.isfinite(mi) and torch.isfinite(grad_of(z)).all()


def test_zero_teacher_row_leaves_the_joint_trace() -> None:
    # tr(G_st) counts rows non-zero on both sides, tr(G_s) the student's: one zero row tells them apart.
    z_s, z_t = features(7, 4, 4)
    z_t[3] = 0.0
    expected = ref_mi(z_s.double().numpy(), z_t.double().numpy())
    assert_close(mutual_information_loss(z_s, z_t), expected)


def test_autocast_bf16_computes_in_float32() -> None:
    torch.manual_seed(5)
    loss = ITRDLoss(8, 12)
    z_s, z_t = (x.bfloat16() for x in features(16, 8, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(z_s, z_t)
    exact = loss(z_s.float(), z_t.float())
    for got, want in ((out.corr, exact.corr), (out.mi, exact.mi), (out.total, exact.total)):
        assert got.dtype == torch.float32
        assert float(got) == pytest.approx(float(want), rel=1e-6, abs=1e-7)
    half_module = loss.to(torch.bfloat16)
    assert half_module(z_s, z_t).total.dtype == torch.float32


# ---------------------------------------------------------------- invariances from the maths


def test_corr_ignores_teacher_column_scale_and_shift() -> None:
    loss = ITRDLoss(4, 5, eps=1e-12)
    z_s, z_t = features(10, 4, 5)
    moved = z_t.clone()
    moved[:, 1] = moved[:, 1] * 7.5 - 3.0
    moved[:, 4] = moved[:, 4] * 0.2 + 10.0
    assert float(loss(z_s, moved).corr) == pytest.approx(float(loss(z_s, z_t).corr), rel=1e-5)
    flipped = z_t.clone()
    flipped[:, 1] = -flipped[:, 1]  # a negative scale flips that v_i: the loss must notice
    assert abs(float(loss(z_s, flipped).corr) - float(loss(z_s, z_t).corr)) > 1e-4


def test_mi_ignores_positive_row_scale() -> None:
    loss = ITRDLoss(5, 5)
    z_s, z_t = features(9, 5, 5)
    scale = torch.rand(9, 1) * 10 + 0.1
    base = float(loss(z_s, z_t).mi)
    assert float(loss(z_s, z_t * scale).mi) == pytest.approx(base, rel=1e-5, abs=1e-7)
    assert float(loss(z_s * scale.flip(0), z_t).mi) == pytest.approx(base, rel=1e-5, abs=1e-7)


def test_both_terms_are_invariant_to_batch_order() -> None:
    loss = ITRDLoss(4, 6)
    z_s, z_t = features(12, 4, 6)
    perm = torch.randperm(12)
    a, b = loss(z_s, z_t), loss(z_s[perm], z_t[perm])
    assert float(b.mi) == pytest.approx(float(a.mi), rel=1e-5, abs=1e-7)
    assert float(b.corr) == pytest.approx(float(a.corr), rel=1e-5)
    # ...but not to shuffling one side only: pairing samples is the point.
    assert abs(float(loss(z_s[perm], z_t).mi) - float(a.mi)) > 1e-5


def test_mi_is_zero_when_the_teacher_sees_one_point() -> None:
    # G_t = 1 everywhere, so G_st = G_s: the joint and marginal potentials coincide.
    z_s = torch.randn(6, 3)
    assert float(mutual_information_loss(z_s, torch.ones(6, 4))) == pytest.approx(0.0, abs=1e-7)


# ---------------------------------------------------------------- KD


@pytest.mark.parametrize("temperature", [1.0, 4.0, 0.5])
def test_kd_matches_reference(temperature: float) -> None:
    g = torch.Generator().manual_seed(6)
    s, t = torch.randn(7, 10, generator=g) * 3, torch.randn(7, 10, generator=g) * 3
    got = KDLoss(temperature)(s, t)
    assert got.dtype == torch.float32
    assert_close(got, ref_kd(s.double().numpy(), t.double().numpy(), temperature), rtol=1e-5)


def test_kd_properties() -> None:
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    kd = KDLoss()
    assert float(kd(t, t)) == pytest.approx(0.0, abs=1e-6)
    assert float(kd(s + torch.randn(5, 1), t)) == pytest.approx(float(kd(s, t)), rel=1e-5)
    assert float(kd(s, t)) > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kd(s.bfloat16(), t.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError):
        kd(s, t[:, :3])
    with pytest.raises(ValueError):
        KDLoss(0.0)


def test_kd_gradcheck_float64() -> None:
    s, t = torch.randn(4, 5, dtype=torch.float64, requires_grad=True), torch.randn(4, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: KDLoss(2.0)(x, t), (s,))


def test_default_eps_is_batch_norms() -> None:
    assert torch.nn.BatchNorm1d(1).eps == DEFAULT_EPS
