"""The ITRD loss (Miles et al., BMVC 2022): a correlation term and a mutual-information term.

The formulas are those of docs/itrd-method.md (the authors' released code where it differs from the
paper's pseudocode), plus guards for the numerical edges the released code does not handle.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itrd.losses._precision import TINY, compute_dtype, full_precision

# Added to the batch variance before the square root, exactly as BatchNorm's default eps: a feature
# column that is constant over the batch (a dead ReLU unit) standardises to zeros instead of 0/0.
DEFAULT_EPS = 1e-5


def correlation_loss(f_s: Tensor, f_t: Tensor, alpha: float, eps: float = DEFAULT_EPS) -> Tensor:
    """L_corr = log2(sum_i |v_i - 1|^(2 alpha)), v = diagonal of the batch cross-correlation matrix."""
    n = f_s.shape[0]
    c_s = f_s - f_s.mean(0)
    c_t = f_t - f_t.mean(0)
    # Unbiased variance, like torch.std's default; the d x d correlation matrix is never formed.
    inv_std_s = torch.rsqrt(c_s.square().sum(0) / (n - 1) + eps)
    inv_std_t = torch.rsqrt(c_t.square().sum(0) / (n - 1) + eps)
    v = (c_s * c_t).sum(0) * (inv_std_s * inv_std_t) / n
    # |v - 1|^(2 alpha) rather than ((v - 1)^2)^alpha: the same value, and its gradient stays finite
    # (zero) at v == 1 for every alpha >= 0.5.
    potential = (v - 1).abs().pow(2 * alpha).sum()
    return torch.log2(potential.clamp_min(TINY))


def mutual_information_loss(f_s: Tensor, f_t: Tensor) -> Tensor:
    """L_mi = sum(G_s^2) - sum(G_st^2) for unit-trace Gram matrices of L2-normalised rows."""
    u_s = F.normalize(f_s, dim=1)
    u_t = F.normalize(f_t, dim=1)
    g_s = u_s @ u_s.T
    g_t = u_t @ u_t.T
    g_s2 = g_s.square()
    # (G_s o G_t)^2 = G_s^2 o G_t^2: the joint Gram matrix itself is never formed.
    joint = torch.dot(g_s2.flatten(), g_t.square().flatten())
    diag_s = torch.diagonal(g_s)
    # Traces count the non-zero rows; the clamp only matters for an all-zero batch (0 / 0 otherwise).
    trace_s2 = diag_s.sum().square().clamp_min(TINY)
    trace_st2 = torch.dot(diag_s, torch.diagonal(g_t)).square().clamp_min(TINY)
    return g_s2.sum() / trace_s2 - joint / trace_st2


@dataclass
class ITRDOutput:
    """The two unweighted ITRD terms and their weighted sum (cross-entropy is added by the method)."""

    corr: Tensor
    mi: Tensor
    total: Tensor


class ITRDLoss(nn.Module):
    """ITRD's distillation loss with its trainable embed Linear(student_dim, teacher_dim).

    The embed always feeds the correlation term and feeds the mutual-information term only when the
    dimensions differ. Both terms are computed in float32 (float64 if an input is float64), whatever
    autocast says. A term whose weight is 0 is still computed and reported, but without a gradient.
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        alpha: float = 1.01,
        beta_corr: float = 2.0,
        beta_mi: float = 1.0,
        eps: float = DEFAULT_EPS,
    ) -> None:
        super().__init__()
        if student_dim < 1 or teacher_dim < 1:
            raise ValueError(f"feature dims must be positive, got {student_dim} and {teacher_dim}")
        # Below 0.5 the gradient of |v - 1|^(2 alpha) is infinite at v == 1.
        if not (math.isfinite(alpha) and alpha >= 0.5):
            raise ValueError(f"alpha must be a finite number >= 0.5, got {alpha}")
        for name, value in (("beta_corr", beta_corr), ("beta_mi", beta_mi)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.student_dim = student_dim
        self.teacher_dim = teacher_dim
        self.alpha = alpha
        self.beta_corr = beta_corr
        self.beta_mi = beta_mi
        self.eps = eps
        self.embed = nn.Linear(student_dim, teacher_dim)

    def extra_repr(self) -> str:
        """Show the hyper-parameters in print(module)."""
        return f"alpha={self.alpha}, beta_corr={self.beta_corr}, beta_mi={self.beta_mi}, eps={self.eps}"

    def forward(self, z_s: Tensor, z_t: Tensor) -> ITRDOutput:
        """Compute the loss for student features (n, d_s) and teacher features (n, d_t)."""
        self._check_inputs(z_s, z_t)
        dtype = compute_dtype(z_s, z_t)
        with full_precision(z_s.device):
            z_s = z_s.to(dtype)
            z_t = z_t.to(dtype)
            # The weights are cast too, so a half-precision copy of the module still embeds in float32.
            f_s = F.linear(z_s, self.embed.weight.to(dtype), self.embed.bias.to(dtype))
            with _grad_only_if(self.beta_corr != 0):
                corr = correlation_loss(f_s, z_t, self.alpha, self.eps)
            with _grad_only_if(self.beta_mi != 0):
                mi = mutual_information_loss(f_s if self.student_dim != self.teacher_dim else z_s, z_t)
            total = self.beta_corr * corr + self.beta_mi * mi
        return ITRDOutput(corr=corr, mi=mi, total=total)

    def _check_inputs(self, z_s: Tensor, z_t: Tensor) -> None:
        if z_s.ndim != 2 or z_t.ndim != 2:
            raise ValueError(
                f"ITRD expects pooled features of shape (n, d); got {tuple(z_s.shape)} and {tuple(z_t.shape)}"
            )
        if z_s.shape[0] != z_t.shape[0]:
            raise ValueError(f"student and teacher batch sizes differ: {z_s.shape[0]} vs {z_t.shape[0]}")
        if z_s.shape[1] != self.student_dim or z_t.shape[1] != self.teacher_dim:
            raise ValueError(
                f"expected feature dims ({self.student_dim}, {self.teacher_dim}), got ({z_s.shape[1]}, {z_t.shape[1]})"
            )
        if z_s.shape[0] < 2:
            raise ValueError(
                "ITRD needs a batch of at least 2 samples: the batch standard deviation of a single "
                "sample is undefined (drop the last incomplete batch or use a larger batch)"
            )


def _grad_only_if(needed: bool) -> contextlib.AbstractContextManager[object]:
    """No autograd graph for a term that is multiplied by zero; otherwise leave grad mode alone."""
    return contextlib.nullcontext() if needed else torch.no_grad()
