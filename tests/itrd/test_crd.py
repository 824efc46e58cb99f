"""CRD baseline: the NCE objective against a float64 reference, sampling, memory banks, training signal."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from itrd.losses import CRDLoss

# float(loss) on a graph-carrying scalar is how these tests read values; the warning adds nothing.
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


def ref_crd(crd: CRDLoss, z_s: torch.Tensor, z_t: torch.Tensor, contrast: torch.Tensor) -> float:
    """Tian et al.'s NCE loss written out: P = exp(<bank, e> / T) / Z, Z = N * mean over the first batch."""

    def embed(linear: torch.nn.Linear, z: torch.Tensor) -> np.ndarray:
        e = z.double().numpy() @ linear.weight.detach().double().numpy().T + linear.bias.detach().double().numpy()
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    n_total, k = crd.num_samples, contrast.shape[1] - 1
    idx = contrast.numpy()

    def one_side(anchors: np.ndarray, bank: np.ndarray) -> float:
        p = np.array(
            [
                [math.exp(float(bank[idx[i, j]] @ anchors[i]) / crd.temperature) for j in range(k + 1)]
                for i in range(len(anchors))
            ]
        )
        p = p / (p.mean() * n_total)
        noise = k / n_total
        total = 0.0
        for i in range(len(anchors)):
            total += math.log(p[i, 0] / (p[i, 0] + noise))
            total += sum(math.log(noise / (p[i, j] + noise)) for j in range(1, k + 1))
        return -total / len(anchors)

    e_s, e_t = embed(crd.embed_s, z_s), embed(crd.embed_t, z_t)
    return one_side(e_s, crd.memory_t.double().numpy()) + one_side(e_t, crd.memory_s.double().numpy())


def make(num_samples: int = 40, **kwargs: object) -> CRDLoss:
    torch.manual_seed(0)
    return CRDLoss(6, 10, num_samples, embed_dim=8, negatives=12, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("num_samples", [20, 500])  # the whole-bank matmul path and the gather path
def test_crd_matches_reference(num_samples: int) -> None:
    crd = make(num_samples).eval()
    z_s, z_t = torch.randn(5, 6), torch.randn(5, 10)
    indices = torch.tensor([0, 3, 7, 11, 19])
    contrast = crd.sample_contrast(indices)
    got = crd(z_s, z_t, indices, contrast_idx=contrast)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    assert float(got.detach()) == pytest.approx(ref_crd(crd, z_s, z_t, contrast), rel=1e-4)


def test_negatives_are_capped_by_the_training_set() -> None:
    crd = CRDLoss(4, 4, 9)
    assert crd.negatives == 8
    contrast = crd.sample_contrast(torch.arange(3))
    assert contrast.shape == (3, 9)
    assert CRDLoss(4, 4, 2).negatives == 1
    with pytest.raises(ValueError):
        CRDLoss(4, 4, 1)


def test_uniform_sampling_shape_and_range() -> None:
    crd = make(40)
    indices = torch.tensor([5, 6, 39])
    contrast = crd.sample_contrast(indices)
    assert contrast.shape == (3, 13) and contrast.dtype == torch.int64
    assert torch.equal(contrast[:, 0], indices)
    assert int(contrast.min()) >= 0 and int(contrast.max()) < 40


def test_class_aware_negatives_come_from_other_classes() -> None:
    targets = torch.tensor([0, 1, 2, 3] * 10 + [3] * 20)  # class 3 holds half the set
    crd = make(60, train_targets=targets)
    indices = torch.arange(60)
    torch.manual_seed(1)
    contrast = crd.sample_contrast(indices)
    anchor_class = targets[indices].unsqueeze(1)
    assert (targets[contrast[:, 1:]] != anchor_class).all()
    assert torch.equal(contrast[:, 0], indices)
    # Every other-class sample is reachable: 2400 draws for class-0 anchors cover all 50 outside it.
    class_zero = torch.nonzero(targets == 0).flatten().repeat(20)
    seen = set(crd.sample_contrast(class_zero)[:, 1:].flatten().tolist())
    assert seen == set(torch.nonzero(targets != 0).flatten().tolist())


def test_class_aware_mode_needs_two_classes() -> None:
    with pytest.raises(ValueError):
        CRDLoss(4, 4, 5, train_targets=torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError):
        CRDLoss(4, 4, 5, train_targets=torch.tensor([0, 1]))


@pytest.mark.parametrize("class_aware", [False, True])
def test_seeded_runs_repeat(class_aware: bool) -> None:
    targets = torch.arange(40) % 4 if class_aware else None
    z_s, z_t, idx = torch.randn(4, 6), torch.randn(4, 10), torch.tensor([1, 2, 30, 31])
    results = []
    for _ in range(2):
        crd = make(40, train_targets=targets).train()
        torch.manual_seed(7)
        losses = [crd(z_s, z_t, idx), crd(z_s, z_t, idx)]
        results.append((torch.stack(losses), crd.memory_s.clone()))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert results[0][0][0] != results[0][0][1]  # fresh negatives and an updated bank


def test_bank_momentum_update_and_eval_mode() -> None:
    crd = make(40, momentum=0.3).train()  # asymmetric, so swapped old/new weights would show
    z_s, z_t, idx = torch.randn(3, 6), torch.randn(3, 10), torch.tensor([4, 9, 20])
    old_s, old_t = crd.memory_s.clone(), crd.memory_t.clone()
    crd(z_s, z_t, idx)
    with torch.no_grad():
        e_s = torch.nn.functional.normalize(crd.embed_s(z_s), dim=1)
        e_t = torch.nn.functional.normalize(crd.embed_t(z_t), dim=1)
    for new, old, e in ((crd.memory_s, old_s, e_s), (crd.memory_t, old_t, e_t)):
        mixed = 0.3 * old[idx] + 0.7 * e
        torch.testing.assert_close(new[idx], mixed / mixed.norm(dim=1, keepdim=True))
        others = torch.ones(40, dtype=torch.bool)
        others[idx] = False
        assert torch.equal(new[others], old[others])
    frozen = crd.memory_s.clone()
    crd.eval()
    crd(z_s, z_t, idx)
    assert torch.equal(crd.memory_s, frozen)


def test_normaliser_is_fixed_by_the_first_training_batch() -> None:
    crd = make(40).train()
    assert math.isnan(float(crd.log_z_s))
    crd(torch.randn(4, 6), torch.randn(4, 10), torch.arange(4))
    first = float(crd.log_z_s)
    assert math.isfinite(first) and math.isfinite(float(crd.log_z_t))
    crd(torch.randn(4, 6) * 5, torch.randn(4, 10), torch.arange(4, 8))
    assert float(crd.log_z_s) == first


def test_banks_and_normalisers_travel_in_the_state_dict() -> None:
    crd = make(40).train()
    crd(torch.randn(4, 6), torch.randn(4, 10), torch.arange(4))
    state = crd.state_dict()
    assert {"memory_s", "memory_t", "log_z_s", "log_z_t"} <= set(state)
    fresh = make(40)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.memory_t, crd.memory_t) and float(fresh.log_z_t) == float(crd.log_z_t)


def test_backward_after_bank_update() -> None:
    # The bank is updated after scoring; backward must still see the bank it scored against.
    crd = make(20).train()
    z_s = torch.randn(4, 6, requires_grad=True)
    crd(z_s, torch.randn(4, 10), torch.arange(4)).backward()
    assert z_s.grad is not None and torch.isfinite(z_s.grad).all()
    assert crd.embed_t.weight.grad is not None


def test_aligned_student_scores_lower_than_random() -> None:
    torch.manual_seed(3)
    crd = CRDLoss(8, 8, 64, embed_dim=16, negatives=32).eval()
    with torch.no_grad():
        crd.embed_s.load_state_dict(crd.embed_t.state_dict())
        z_t = torch.randn(64, 8)
        trained = torch.nn.functional.normalize(crd.embed_t(z_t), dim=1)
        crd.memory_s.copy_(trained)  # as if both banks had converged on these samples
        crd.memory_t.copy_(trained)
    idx = torch.arange(16)
    contrast = crd.sample_contrast(idx)
    aligned = crd(z_t[idx], z_t[idx], idx, contrast_idx=contrast)
    unrelated = crd(torch.randn(16, 8), z_t[idx], idx, contrast_idx=contrast)
    assert float(aligned) < float(unrelated) - 1.0


def test_training_reduces_the_loss() -> None:
    torch.manual_seed(4)
    crd = CRDLoss(4, 8, 32, embed_dim=16, negatives=16).train()
    z_t = torch.randn(32, 8)
    z_s = torch.nn.Parameter(torch.randn(32, 4))
    opt = torch.optim.SGD([z_s, *crd.parameters()], lr=0.5)
    epochs = []
    for _ in range(15):
        total = 0.0
        for idx in torch.arange(32).split(8):
            loss = crd(z_s[idx], z_t[idx], idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss)
        epochs.append(total)
    assert epochs[-1] < 0.8 * epochs[1]


def test_autocast_bf16_stays_float32() -> None:
    crd = make(40).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = crd(torch.randn(4, 6).bfloat16(), torch.randn(4, 10).bfloat16(), torch.arange(4))
    assert loss.dtype == torch.float32 and crd.memory_s.dtype == torch.float32


def test_bad_inputs_are_refused() -> None:
    crd = make(40)
    with pytest.raises(ValueError):
        crd(torch.randn(4, 6), torch.randn(3, 10), torch.arange(4))
    with pytest.raises(ValueError):
        crd(torch.randn(4, 6), torch.randn(4, 10), torch.arange(3))
    for kwargs in ({"temperature": 0.0}, {"momentum": 1.0}, {"negatives": 0}):
        with pytest.raises(ValueError):
            CRDLoss(4, 4, 10, **kwargs)
