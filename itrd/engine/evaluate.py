"""Evaluation: top-1 / top-5 accuracy and cross-entropy on a held-out split."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Any], device: torch.device, *, channels_last: bool = False
             ) -> dict[str, float]:
    """Accuracy (percent) and mean loss of `model` over `loader`; restores the model's train/eval mode."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # top1, top5, loss, n
    for x, y, _ in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        _, logits = model(x)
        logits = logits.float()
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hit = topk == y[:, None]
        sums += torch.stack([
            hit[:, 0].sum().double(),
            hit.any(dim=1).sum().double(),
            F.cross_entropy(logits, y, reduction="sum").double(),
            torch.full((), float(y.numel()), dtype=torch.float64, device=device),
        ])
    model.train(was_training)
    top1, top5, loss, n = sums.tolist()
    n = max(n, 1.0)
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "loss": loss / n}
