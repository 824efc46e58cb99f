"""Hinton et al. (2015) knowledge distillation on temperature-softened logits."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from itrd.losses._precision import compute_dtype, full_precision


class KDLoss(nn.Module):
    """T^2 * KL(p_t || p_s) per sample, p = softmax(logits / T); the teacher's soft targets are the target.

    The T^2 factor keeps the gradient scale independent of T (Hinton et al., section 2), and the KL is
    summed over classes and averaged over the batch, as RepDistiller's DistillKL does.
    """

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        self.temperature = temperature

    def extra_repr(self) -> str:
        """Show the temperature in print(module)."""
        return f"temperature={self.temperature}"

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """Return the scalar KD loss for logits of shape (n, C)."""
        if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
            raise ValueError(
                "KD expects student and teacher logits of the same (n, C) shape, got "
                f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
            )
        dtype = compute_dtype(student_logits, teacher_logits)
        t = self.temperature
        with full_precision(student_logits.device):
            log_p_s = F.log_softmax(student_logits.to(dtype) / t, dim=1)
            log_p_t = F.log_softmax(teacher_logits.to(dtype) / t, dim=1)
            # log_target keeps classes the teacher gives (numerically) zero probability finite.
            kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
        return kl * (t * t)
