"""Name -> model builder registry shared by the CIFAR zoo, the torchvision adapter and user models."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from torch import nn

ModelBuilder = Callable[[int], nn.Module]
"""Builds a model for ``num_classes`` classes; the model returns ``(features, logits)``."""

BuilderT = TypeVar("BuilderT", bound=ModelBuilder)


@dataclass(frozen=True)
class ModelEntry:
    """One registered architecture: its name, its family (chooses ITRD's alpha) and its builder."""

    name: str
    family: str
    build: ModelBuilder


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, *, family: str) -> Callable[[BuilderT], BuilderT]:
    """Decorator adding ``builder(num_classes) -> nn.Module`` under ``name``.

    Example::

        @register_model("tiny_mlp", family="mlp")
        def tiny_mlp(num_classes: int) -> nn.Module:
            return MyMLP(num_classes)  # forward(x) -> (features, logits); has feature_dim
    """
    if not name or not family:
        raise ValueError("a model needs a non-empty name and family")

    def decorate(builder: BuilderT) -> BuilderT:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = ModelEntry(name=name, family=family, build=builder)
        return builder

    return decorate


def model_names() -> list[str]:
    """All registered model names, sorted case-insensitively, namespaced ones (``torchvision.*``) last."""
    return sorted(_REGISTRY, key=lambda name: ("." in name, name.lower()))


def _entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(model_names())}") from None


def model_family(name: str) -> str:
    """Architecture family of a registered model, e.g. "resnet", "wrn", "vgg", "shufflenet"."""
    return _entry(name).family


def create_model(name: str, num_classes: int) -> nn.Module:
    """Build a freshly initialised model whose ``forward(x)`` returns ``(features, logits)``."""
    entry = _entry(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    model = entry.build(num_classes)
    feature_dim = getattr(model, "feature_dim", None)
    if isinstance(feature_dim, bool) or not isinstance(feature_dim, int) or feature_dim < 1:
        raise TypeError(f"model {name!r} must expose a positive integer `feature_dim`, got {feature_dim!r}")
    return model
