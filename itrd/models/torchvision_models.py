"""torchvision classifiers adapted to the ``(features, logits)`` interface, never with downloaded weights.

Registered as ``torchvision.<name>`` for every torchvision classification model with a final
``nn.Linear``, plus ``resnet18`` / ``resnet34``: the ImageNet student/teacher pair of the ITRD paper.
"""

from __future__ import annotations

import re
from typing import Any

import torchvision
from torch import Tensor, nn

from .registry import register_model

# Where torchvision keeps the final classifier; a Sequential found here contributes its last layer.
_HEAD_PATHS = ("fc", "head", "heads.head", "classifier")

# Their classifier is a conv, so there is no linear layer whose input is the representation.
_WITHOUT_LINEAR_HEAD = frozenset({"squeezenet1_0", "squeezenet1_1"})

# Auxiliary heads make the training-mode output a tuple; explicit init avoids torchvision's warning.
_EXTRA_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}

_FAMILY_OVERRIDES = {
    "resnet18": "resnet",
    "resnet34": "resnet",
    "resnet50": "resnet_bottleneck",
    "resnet101": "resnet_bottleneck",
    "resnet152": "resnet_bottleneck",
    "resnext": "resnet_bottleneck",
    "wide": "resnet_bottleneck",
    "mobilenet": "mobilenet",
    "shufflenet": "shufflenet",
}


def torchvision_family(arch: str) -> str:
    """Family of a torchvision architecture, e.g. "resnet" (resnet18), "efficientnet" (efficientnet_b0)."""
    if arch in _FAMILY_OVERRIDES:
        return _FAMILY_OVERRIDES[arch]
    stem = re.split(r"[_\d]", arch, maxsplit=1)[0]
    return _FAMILY_OVERRIDES.get(stem, stem)


def _find_linear_head(net: nn.Module, arch: str) -> tuple[str, nn.Linear]:
    for path in _HEAD_PATHS:
        try:
            module = net.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, nn.Sequential) and len(module) > 0:
            path, module = f"{path}.{len(module) - 1}", module[-1]
        if isinstance(module, nn.Linear):
            return path, module
    raise ValueError(f"torchvision model {arch!r} has no final nn.Linear at any of {_HEAD_PATHS}")


def _replace_submodule(net: nn.Module, path: str, replacement: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(net.get_submodule(parent_path), child, replacement)


class TorchvisionClassifier(nn.Module):
    """A torchvision classifier cut before its final Linear: ``forward(x) -> (features, logits)``.

    ``backbone`` is the torchvision network with that Linear replaced by an identity, so its output is
    exactly the Linear's input (the representation); ``classifier`` is the Linear itself.
    """

    def __init__(self, arch: str, num_classes: int) -> None:
        super().__init__()
        # weights=None: never download; the product trains or loads its own checkpoints.
        net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **_EXTRA_KWARGS.get(arch, {}))
        path, head = _find_linear_head(net, arch)
        _replace_submodule(net, path, nn.Identity())
        self.arch = arch
        self.backbone = net
        self.classifier = head
        self.feature_dim = head.in_features

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(features, logits)``."""
        features = self.backbone(x)
        return features, self.classifier(features)


def torchvision_arches() -> list[str]:
    """torchvision classification architectures that this adapter supports."""
    return [a for a in torchvision.models.list_models(module=torchvision.models) if a not in _WITHOUT_LINEAR_HEAD]


def _register(name: str, arch: str) -> None:
    def build(num_classes: int) -> TorchvisionClassifier:
        return TorchvisionClassifier(arch, num_classes)

    build.__doc__ = f"torchvision {arch} (random init), split into (features, logits)."
    register_model(name, family=torchvision_family(arch))(build)


_register("resnet18", "resnet18")
_register("resnet34", "resnet34")
for _arch in torchvision_arches():
    _register(f"torchvision.{_arch}", _arch)
