"""Contrastive representation distillation (Tian, Krishnan and Isola, ICLR 2020), the paper's main baseline.

Both networks' features are embedded (linear + L2 normalisation). Each student embedding is contrasted
with the teacher memory-bank entry of the same sample (the positive) against K other entries (the
negatives), and symmetrically for the teacher embedding against the student bank. The critic is
exp(<a, b> / T) / Z with Z fixed from the first batch, trained with the NCE objective whose noise
distribution is uniform over the training set (P_n = 1 / N). Banks are momentum averages of past
embeddings, kept as buffers so they travel in checkpoints.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itrd.losses._precision import compute_dtype, full_precision


def nce_loss(logits: Tensor, log_z: Tensor, num_samples: int) -> Tensor:
    """NCE loss for critic log-values `logits - log_z` of shape (n, 1 + K); column 0 is the positive.

    Per sample: -log(P / (P + K/N)) for the positive and -log((K/N) / (P + K/N)) for each negative,
    written with softplus in log space so a large exp(<a, b> / T) cannot overflow.
    """
    k = logits.shape[1] - 1
    log_noise = math.log(k / num_samples)
    log_p = logits - log_z
    positive = F.softplus(log_noise - log_p[:, 0]).sum()
    negative = F.softplus(log_p[:, 1:] - log_noise).sum()
    return (positive + negative) / logits.shape[0]


class CRDLoss(nn.Module):
    """CRD with two memory banks of `num_samples` entries; defaults are the published ones.

    Negatives are drawn inside the module with the global torch RNG, so seeded runs repeat. With
    `train_targets` (the class of every training sample, by index) they come from other classes only
    (the "exact" mode); otherwise uniformly from the whole set. Draws are with replacement, and K is
    capped at num_samples - 1, the number of other samples: more draws than that would only repeat
    entries of a small training set. Banks are updated only in training mode.
    """

    memory_s: Tensor
    memory_t: Tensor
    log_z_s: Tensor
    log_z_t: Tensor
    # Present only in the class-aware mode.
    sample_class: Tensor
    by_class: Tensor
    class_start: Tensor
    class_count: Tensor

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        num_samples: int,
        *,
        embed_dim: int = 128,
        negatives: int = 16384,
        temperature: float = 0.07,
        momentum: float = 0.5,
        train_targets: Tensor | None = None,
    ) -> None:
        super().__init__()
        if num_samples < 2:
            raise ValueError(f"CRD needs at least 2 training samples, got {num_samples}")
        if embed_dim < 1 or negatives < 1:
            raise ValueError(f"embed_dim and negatives must be positive, got {embed_dim} and {negatives}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.num_samples = num_samples
        self.negatives = min(negatives, num_samples - 1)
        self.temperature = temperature
        self.momentum = momentum
        self.embed_s = nn.Linear(student_dim, embed_dim)
        self.embed_t = nn.Linear(teacher_dim, embed_dim)
        bound = 1.0 / math.sqrt(embed_dim / 3)
        self.register_buffer("memory_s", torch.rand(num_samples, embed_dim) * (2 * bound) - bound)
        self.register_buffer("memory_t", torch.rand(num_samples, embed_dim) * (2 * bound) - bound)
        # NaN marks "not fixed yet": the first training batch sets them.
        self.register_buffer("log_z_s", torch.tensor(math.nan))
        self.register_buffer("log_z_t", torch.tensor(math.nan))
        self.class_aware = train_targets is not None
        if train_targets is not None:
            self._register_class_index(train_targets)

    def _register_class_index(self, train_targets: Tensor) -> None:
        """Sort sample indices by class so "any sample of another class" is one contiguous range skip."""
        targets = train_targets.detach().to("cpu", torch.int64).reshape(-1)
        if targets.numel() != self.num_samples:
            raise ValueError(f"train_targets has {targets.numel()} entries, expected {self.num_samples}")
        if targets.min() < 0:
            raise ValueError("train_targets must be non-negative class indices")
        counts = torch.bincount(targets)
        if int(counts.max()) == self.num_samples:
            raise ValueError("class-aware CRD needs at least two classes in train_targets")
        # Derived from train_targets at construction, so not saved in checkpoints.
        self.register_buffer("sample_class", targets, persistent=False)
        self.register_buffer("by_class", torch.argsort(targets, stable=True), persistent=False)
        self.register_buffer("class_start", torch.cumsum(counts, 0) - counts, persistent=False)
        self.register_buffer("class_count", counts, persistent=False)

    def extra_repr(self) -> str:
        """Show the NCE settings in print(module)."""
        return (
            f"num_samples={self.num_samples}, negatives={self.negatives}, temperature={self.temperature}, "
            f"momentum={self.momentum}, class_aware={self.class_aware}"
        )

    def sample_contrast(self, indices: Tensor) -> Tensor:
        """(n, 1 + K) bank indices: each sample's own index, then K negatives."""
        n, k, device = indices.shape[0], self.negatives, self.memory_s.device
        indices = indices.to(device)
        if not self.class_aware:
            negatives = torch.randint(0, self.num_samples, (n, k), device=device)
        else:
            cls = self.sample_class[indices]
            start = self.class_start[cls].unsqueeze(1)
            count = self.class_count[cls].unsqueeze(1)
            # Uniform over the N - count positions outside the sample's class block in by_class order;
            # the modulo bias of a 62-bit draw is far below anything measurable.
            pos = torch.randint(0, 2**62, (n, k), device=device) % (self.num_samples - count)
            pos = pos + (pos >= start) * count
            negatives = self.by_class[pos]
        return torch.cat([indices.unsqueeze(1), negatives], dim=1)

    def forward(self, z_s: Tensor, z_t: Tensor, indices: Tensor, contrast_idx: Tensor | None = None) -> Tensor:
        """Return the scalar CRD loss for features (n, d_s), (n, d_t) of training samples `indices`.

        `contrast_idx` (n, 1 + K) replaces the module's own draw of negatives (for tests).
        """
        if z_s.ndim != 2 or z_t.ndim != 2 or z_s.shape[0] != z_t.shape[0] or indices.shape != z_s.shape[:1]:
            raise ValueError(
                "CRD expects features (n, d_s), (n, d_t) and indices (n,), got "
                f"{tuple(z_s.shape)}, {tuple(z_t.shape)}, {tuple(indices.shape)}"
            )
        if contrast_idx is None:
            contrast_idx = self.sample_contrast(indices)
        dtype = compute_dtype(z_s, z_t)
        with full_precision(z_s.device):
            e_s = _embed(self.embed_s, z_s.to(dtype))
            e_t = _embed(self.embed_t, z_t.to(dtype))
            bank_s = self.memory_s.to(dtype)
            bank_t = self.memory_t.to(dtype)
            # Student anchors against teacher entries, and the teacher against student entries.
            logits_s = _scores(bank_t, e_s, contrast_idx) / self.temperature
            logits_t = _scores(bank_s, e_t, contrast_idx) / self.temperature
            log_z_s = self._fixed_log_z(self.log_z_s, logits_s)
            log_z_t = self._fixed_log_z(self.log_z_t, logits_t)
            n_total = self.num_samples
            loss = nce_loss(logits_s, log_z_s, n_total) + nce_loss(logits_t, log_z_t, n_total)
        if self.training:
            self._update("memory_s", indices, e_s)
            self._update("memory_t", indices, e_t)
        return loss

    def _fixed_log_z(self, buffer: Tensor, logits: Tensor) -> Tensor:
        """log Z = log(N * mean exp(logits)) of the first training batch, then held fixed."""
        first = (torch.logsumexp(logits.detach().flatten(), 0) - math.log(logits.numel())) + math.log(self.num_samples)
        # torch.where instead of an `if`, so a GPU step never waits on a device-to-host read.
        log_z = torch.where(torch.isnan(buffer), first.to(buffer.dtype), buffer)
        if self.training:
            buffer.copy_(log_z)
        return log_z.to(logits.dtype)

    @torch.no_grad()
    def _update(self, name: str, indices: Tensor, embedding: Tensor) -> None:
        """Move the bank entries of `indices` towards the new embeddings, then re-normalise them."""
        bank: Tensor = getattr(self, name)
        indices = indices.to(bank.device)
        mixed = bank[indices] * self.momentum + embedding.detach().to(bank.dtype) * (1 - self.momentum)
        # Out of place: autograd saved the old bank to differentiate the scores, and an in-place write
        # would invalidate it before backward runs.
        setattr(self, name, bank.index_copy(0, indices, F.normalize(mixed, dim=1)))


def _embed(linear: nn.Linear, x: Tensor) -> Tensor:
    return F.normalize(F.linear(x, linear.weight.to(x.dtype), linear.bias.to(x.dtype)), dim=1)


def _scores(bank: Tensor, anchors: Tensor, contrast_idx: Tensor) -> Tensor:
    """<bank[contrast_idx[i, j]], anchors[i]> for every (i, j)."""
    if bank.shape[0] <= 4 * contrast_idx.shape[1]:
        # A bank not much larger than the draws: scoring it whole is one matmul over ~N x dim floats,
        # while gathering would copy n x (1 + K) x dim of them (537 MB at CRD's defaults).
        return (anchors @ bank.T).gather(1, contrast_idx)
    return torch.bmm(bank[contrast_idx], anchors.unsqueeze(2)).squeeze(2)
