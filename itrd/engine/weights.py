"""Loading untrusted weights safely, preparing a frozen teacher, and exporting a deployable student."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from itrd.engine.checkpoint import write_atomic


class WeightsError(ValueError):
    """Weights that cannot be read safely, or that do not fit the architecture they are loaded into."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a .pt/.pth state dict, never unpickling code.

    A .pt file may hold a bare state dict, an itrd checkpoint (its 'student' entry), or a dict with a
    'model' or 'state_dict' entry (the layout RepDistiller and many training scripts save).
    """
    p = Path(path)
    if not p.exists():
        raise WeightsError(f"weights file {p} does not exist")
    try:
        if p.suffix == ".safetensors":
            return load_file(str(p))
        obj: Any = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # many formats fail in many ways; all are the user's file at fault
        raise WeightsError(
            f"cannot read {p.name} safely: {exc}. Save weights with safetensors or torch.save(model.state_dict())"
        ) from exc
    if isinstance(obj, dict):
        for key in ("student", "model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{p.name} holds no state dict of tensors")
    return obj


def _misfit(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> list[str]:
    """What keeps `state` from loading strictly into a model whose state dict is `own`; empty if it fits."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    return misfit_report(missing, unexpected, wrong_shape)


def misfit_report(missing: list[str], unexpected: list[str], wrong_shape: list[str]) -> list[str]:
    """The parts of a does-not-fit message: counts and the first few keys of each kind of problem."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) e.g. {missing[:3]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) e.g. {unexpected[:3]}")
    if wrong_shape:
        parts.append(f"{len(wrong_shape)} shape mismatch(es) e.g. {wrong_shape[:2]}")
    return parts


def fit_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], architecture: str, source: str
) -> dict[str, torch.Tensor]:
    """`state` in `model`'s own key layout, checked key for key and shape for shape.

    A checkpoint saved by RepDistiller (the CRD authors' released teachers) is renamed to our layout:
    the mapping is exact, so it happens silently. Anything else that does not fit raises WeightsError
    naming both sides.
    """
    own = model.state_dict()
    problems = _misfit(own, state)
    if problems:
        # Imported here: itrd.models.convert imports this module for WeightsError.
        from itrd.models.convert import from_repdistiller, looks_like_repdistiller

        if looks_like_repdistiller(state, architecture):
            state = from_repdistiller(state, architecture)
            source = f"{source} (converted from RepDistiller's layout)"
            problems = _misfit(own, state)
    if problems:
        raise WeightsError(f"weights {source} do not fit architecture {architecture!r}: " + "; ".join(problems))
    return state


def load_weights_strict(model: nn.Module, state: dict[str, torch.Tensor], architecture: str, source: str) -> None:
    """Load `state` into `model` with strict key and shape matching; a mismatch names both sides.

    RepDistiller checkpoints of `architecture` load too (see `fit_state_dict`).
    """
    model.load_state_dict(fit_state_dict(model, state, architecture, source), strict=True)


def freeze_teacher(model: nn.Module, *, fold_bn: bool = True, channels_last: bool = False) -> nn.Module:
    """The teacher as a constant function: eval mode, no gradients, batch norm folded into its convs.

    Folding removes a full pass over every activation per batch-norm layer; it is exact up to float
    rounding because eval-mode batch norm is an affine map. Models that torch.fx cannot trace keep
    their batch norms.
    """
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if fold_bn:
        try:
            from torch.fx.experimental.optimization import fuse

            model = fuse(model)
        except Exception:  # not traceable (e.g. a user-wrapped model): run it unfused
            pass
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def export_student(model: nn.Module, directory: Path, card: dict[str, Any]) -> tuple[Path, Path]:
    """Write the deployable student (`student.safetensors`) and its model card (`model_card.json`)."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    weights = directory / "student.safetensors"
    tmp = directory / ".student.safetensors.tmp"
    save_file(state, str(tmp), metadata={"architecture": str(card.get("architecture", ""))})
    write_atomic(weights, tmp.read_bytes())
    tmp.unlink(missing_ok=True)
    card_path = directory / "model_card.json"
    write_atomic(card_path, (json.dumps(card, indent=2, sort_keys=True) + "\n").encode())
    return weights, card_path
