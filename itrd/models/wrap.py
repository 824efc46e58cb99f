"""Bring-your-own model: adapt any classifier to the ``(features, logits)`` interface."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


class WrappedModel(nn.Module):
    """A user's classifier plus the name of the submodule whose flattened output is the representation.

    Runs ``module(x)`` unchanged (its output is the logits) and captures the feature submodule's output
    with a forward hook that lives only for the duration of the call.
    """

    def __init__(self, module: nn.Module, feature_module: str, feature_dim: int) -> None:
        super().__init__()
        self.module = module
        self.feature_module = feature_module
        self.feature_dim = feature_dim

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(features, logits)``."""
        captured: list[Any] = []

        def capture(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured.append(output)

        handle = self.module.get_submodule(self.feature_module).register_forward_hook(capture)
        try:
            logits = self.module(x)
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"submodule {self.feature_module!r} did not run during forward")
        # A submodule reused within one forward pass yields its last call's output.
        output = captured[-1]
        if not isinstance(output, Tensor) or not isinstance(logits, Tensor):
            raise TypeError("the feature submodule and the wrapped module must both return a Tensor")
        features = output.flatten(1)
        if features.shape[1] != self.feature_dim:
            raise ValueError(
                f"submodule {self.feature_module!r} gives {features.shape[1]} features per sample, "
                f"not feature_dim={self.feature_dim}; pass the right feature_dim to wrap_model"
            )
        return features, logits


def _infer_feature_dim(module: nn.Module, target: nn.Module) -> int:
    if isinstance(target, nn.Linear):
        return target.out_features
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1].in_features
    raise ValueError("cannot infer feature_dim (no nn.Linear in the module); pass feature_dim explicitly")


def wrap_model(module: nn.Module, feature_module: str, feature_dim: int | None = None) -> WrappedModel:
    """Adapt ``module`` so that ``forward(x)`` returns ``(features, logits)``.

    ``features`` is the output of the submodule named ``feature_module`` (a dotted path as in
    ``named_modules()``), flattened to ``(n, feature_dim)``; ``logits`` is ``module(x)``. For ITRD the
    representation should be what the final linear classifier consumes, e.g. the global pool.
    ``feature_dim`` defaults to ``out_features`` when the feature submodule is an ``nn.Linear``, else
    to ``in_features`` of the last ``nn.Linear`` registered in ``module`` (normally the classifier);
    a wrong value is reported on the first forward. Wrapped models are not guaranteed to be
    ``torch.fx`` traceable, so the engine cannot fold their batch norms.

    Example:
        >>> import torch, torchvision
        >>> net = torchvision.models.resnet18(weights=None, num_classes=10)
        >>> model = wrap_model(net, "avgpool")
        >>> features, logits = model(torch.randn(2, 3, 64, 64))
        >>> model.feature_dim, tuple(features.shape), tuple(logits.shape)
        (512, (2, 512), (2, 10))
    """
    try:
        target = module.get_submodule(feature_module)
    except AttributeError:
        names = [name for name, _ in module.named_modules() if name]
        raise ValueError(f"no submodule {feature_module!r}; submodules: {', '.join(names)}") from None
    if feature_dim is None:
        feature_dim = _infer_feature_dim(module, target)
    if feature_dim < 1:
        raise ValueError(f"feature_dim must be positive, got {feature_dim}")
    return WrappedModel(module, feature_module, feature_dim)
