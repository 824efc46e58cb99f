"""Wide ResNets WRN-d-k for CIFAR (pre-activation blocks), as in the CRD/RepDistiller zoo."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .common import PooledClassifier, global_pool, init_convs_he_fan_out
from .registry import register_model


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3 twice; a 1x1 conv on the activated input when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        # The reference decides on channel counts only; in WRN every strided block also widens.
        self.projection: nn.Conv2d | None = None
        if in_channels != out_channels:
            self.projection = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Residual update."""
        activated = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(activated))))
        shortcut = x if self.projection is None else self.projection(activated)
        return out + shortcut


class WideResNet(PooledClassifier):
    """WRN-depth-widen: 3 groups of (depth-4)/6 pre-activation blocks, final BN-ReLU, pool, linear."""

    def __init__(self, depth: int, widen: int, num_classes: int) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"a WRN has 6n+4 layers, got {depth}")
        blocks_per_group = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.stem = _conv3x3(3, 16)
        groups: list[nn.Module] = []
        in_channels = 16
        for index, width in enumerate(widths):
            blocks = [
                PreActBlock(in_channels if i == 0 else width, width, 2 if index > 0 and i == 0 else 1)
                for i in range(blocks_per_group)
            ]
            groups.append(nn.Sequential(*blocks))
            in_channels = width
        self.groups = nn.Sequential(*groups)
        self.final_bn = nn.BatchNorm2d(in_channels)
        self.pool = global_pool()
        self.feature_dim = in_channels
        self.classifier = nn.Linear(in_channels, num_classes)
        init_convs_he_fan_out(self)
        nn.init.zeros_(self.classifier.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled, activated output of the last group."""
        return self.pool(F.relu(self.final_bn(self.groups(self.stem(x)))))


@register_model("wrn_16_1", family="wrn")
def wrn_16_1(num_classes: int) -> WideResNet:
    """WRN-16-1, 64-d features."""
    return WideResNet(16, 1, num_classes)


@register_model("wrn_16_2", family="wrn")
def wrn_16_2(num_classes: int) -> WideResNet:
    """WRN-16-2, 128-d features."""
    return WideResNet(16, 2, num_classes)


@register_model("wrn_40_1", family="wrn")
def wrn_40_1(num_classes: int) -> WideResNet:
    """WRN-40-1, 64-d features."""
    return WideResNet(40, 1, num_classes)


@register_model("wrn_40_2", family="wrn")
def wrn_40_2(num_classes: int) -> WideResNet:
    """WRN-40-2, 128-d features."""
    return WideResNet(40, 2, num_classes)
