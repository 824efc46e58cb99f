"""VGG with batch norm for CIFAR (the CRD/RepDistiller ``vggN_bn`` networks, named ``vggN`` there too)."""

from __future__ import annotations

from torch import Tensor, nn

from .common import PooledClassifier, global_pool, init_convs_he_fan_out, init_linear_small
from .registry import register_model

# Conv widths of the five stages; no fully-connected layers besides the classifier.
_STAGES: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}

# The reference max-pools after stages 0-2 only (its 4th pool is skipped for 32x32 inputs), so the
# last two stages both run at 4x4 before the global pool.
_POOLED_STAGES = 3


class VGG(PooledClassifier):
    """Stages of conv3x3 (with bias) + BN + ReLU, max-pool after the first three, global pool, linear."""

    def __init__(self, stages: tuple[tuple[int, ...], ...], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for index, widths in enumerate(stages):
            for width in widths:
                layers += [
                    nn.Conv2d(in_channels, width, 3, padding=1),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
                in_channels = width
            if index < _POOLED_STAGES:
                layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        self.pool = global_pool()
        self.feature_dim = in_channels
        self.classifier = nn.Linear(in_channels, num_classes)
        init_convs_he_fan_out(self)
        init_linear_small(self.classifier)

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled output of the last stage."""
        return self.pool(self.body(x))


def _register(name: str) -> None:
    def build(num_classes: int) -> VGG:
        return VGG(_STAGES[name], num_classes)

    build.__doc__ = f"{name} with batch norm, 512-d features."
    register_model(name, family="vgg")(build)


for _name in _STAGES:
    _register(_name)
