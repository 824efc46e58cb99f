"""Building blocks shared by the CIFAR zoo: the (features, logits) contract, conv helpers, init."""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor, nn


class PooledClassifier(nn.Module, ABC):
    """A network whose logits are ``classifier(features)`` for pooled ``features`` of size ``feature_dim``.

    Subclasses build ``self.classifier`` (an ``nn.Linear(feature_dim, num_classes)``) and implement
    ``forward_features``; ``forward`` then returns exactly the tensor the classifier consumed, which is
    the representation ITRD distils.
    """

    feature_dim: int
    classifier: nn.Linear

    @abstractmethod
    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled, flattened representation of shape ``(n, feature_dim)``."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(features, logits)``."""
        features = self.forward_features(x)
        return features, self.classifier(features)


def conv_bn(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    groups: int = 1,
    relu: bool = True,
) -> nn.Sequential:
    """Bias-free ``kernel_size`` conv ("same" padding) + BatchNorm, optionally followed by ReLU."""
    layers: list[nn.Module] = [
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=groups,
            bias=False,
        ),
        nn.BatchNorm2d(out_channels),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def global_pool() -> nn.Sequential:
    """Global average pool to a flat ``(n, channels)`` tensor.

    The reference networks use fixed-size pools (e.g. ``AvgPool2d(8)``) that equal a global mean at
    32x32 input; the global mean keeps the same numbers there and stays valid at any resolution.
    """
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


def init_convs_he_fan_out(model: nn.Module) -> None:
    """He-normal conv weights on fan-out and zero conv biases, as the reference CIFAR zoo initialises."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def init_linear_small(linear: nn.Linear, std: float = 0.01) -> None:
    """Small-normal weights and zero bias for a classifier, as the reference VGG and MobileNetV2 use."""
    nn.init.normal_(linear.weight, mean=0.0, std=std)
    nn.init.zeros_(linear.bias)
