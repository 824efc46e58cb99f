"""CIFAR ResNets: the basic-block family (resnet8 ... resnet110, resnet8x4, resnet32x4) and ResNet50.

Shapes follow the CIFAR zoo of CRD/RepDistiller used by the ITRD paper: a 3x3 stem without max-pool,
stages of basic blocks (6n+2 layers) or bottlenecks, and global average pooling before the classifier.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .common import PooledClassifier, conv_bn, global_pool, init_convs_he_fan_out
from .registry import register_model


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Identity when shapes agree, else a strided 1x1 conv + BN projection."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return conv_bn(in_channels, out_channels, 1, stride=stride, relu=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus shortcut, ReLU after the sum."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(in_channels, width, 3, stride=stride)
        self.conv2 = conv_bn(width, width, 3, relu=False)
        self.shortcut = _shortcut(in_channels, width, stride)

    def forward(self, x: Tensor) -> Tensor:
        """Residual update."""
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, plus shortcut, ReLU after the sum."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = conv_bn(in_channels, width, 1)
        self.conv2 = conv_bn(width, width, 3, stride=stride)
        self.conv3 = conv_bn(width, out_channels, 1, relu=False)
        self.shortcut = _shortcut(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        """Residual update."""
        return F.relu(self.conv3(self.conv2(self.conv1(x))) + self.shortcut(x))


class CifarResNet(PooledClassifier):
    """3x3 stem, then stages (the first at stride 1, the others halving the resolution), pool, linear."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        stem_width: int,
        stage_widths: Sequence[int],
        blocks_per_stage: Sequence[int],
        num_classes: int,
    ) -> None:
        super().__init__()
        self.stem = conv_bn(3, stem_width, 3)
        stages: list[nn.Module] = []
        in_channels = stem_width
        for index, (width, depth) in enumerate(zip(stage_widths, blocks_per_stage, strict=True)):
            blocks: list[nn.Module] = []
            for position in range(depth):
                stride = 2 if index > 0 and position == 0 else 1
                blocks.append(block(in_channels, width, stride))
                in_channels = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = global_pool()
        self.feature_dim = in_channels
        self.classifier = nn.Linear(in_channels, num_classes)
        init_convs_he_fan_out(self)

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled output of the last stage."""
        return self.pool(self.stages(self.stem(x)))


def _basic_resnet(depth: int, widths: tuple[int, int, int, int], num_classes: int) -> CifarResNet:
    if (depth - 2) % 6:
        raise ValueError(f"a basic-block CIFAR ResNet has 6n+2 layers, got {depth}")
    n = (depth - 2) // 6
    return CifarResNet(BasicBlock, widths[0], widths[1:], (n, n, n), num_classes)


_THIN = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


@register_model("resnet8", family="resnet")
def resnet8(num_classes: int) -> CifarResNet:
    """ResNet-8 (CIFAR), 64-d features."""
    return _basic_resnet(8, _THIN, num_classes)


@register_model("resnet14", family="resnet")
def resnet14(num_classes: int) -> CifarResNet:
    """ResNet-14 (CIFAR), 64-d features."""
    return _basic_resnet(14, _THIN, num_classes)


@register_model("resnet20", family="resnet")
def resnet20(num_classes: int) -> CifarResNet:
    """ResNet-20 (CIFAR), 64-d features."""
    return _basic_resnet(20, _THIN, num_classes)


@register_model("resnet32", family="resnet")
def resnet32(num_classes: int) -> CifarResNet:
    """ResNet-32 (CIFAR), 64-d features."""
    return _basic_resnet(32, _THIN, num_classes)


@register_model("resnet44", family="resnet")
def resnet44(num_classes: int) -> CifarResNet:
    """ResNet-44 (CIFAR), 64-d features."""
    return _basic_resnet(44, _THIN, num_classes)


@register_model("resnet56", family="resnet")
def resnet56(num_classes: int) -> CifarResNet:
    """ResNet-56 (CIFAR), 64-d features."""
    return _basic_resnet(56, _THIN, num_classes)


@register_model("resnet110", family="resnet")
def resnet110(num_classes: int) -> CifarResNet:
    """ResNet-110 (CIFAR), 64-d features."""
    return _basic_resnet(110, _THIN, num_classes)


@register_model("resnet8x4", family="resnet")
def resnet8x4(num_classes: int) -> CifarResNet:
    """ResNet-8 with 4x wider stages (CIFAR), 256-d features."""
    return _basic_resnet(8, _WIDE, num_classes)


@register_model("resnet32x4", family="resnet")
def resnet32x4(num_classes: int) -> CifarResNet:
    """ResNet-32 with 4x wider stages (CIFAR), 256-d features."""
    return _basic_resnet(32, _WIDE, num_classes)


@register_model("ResNet50", family="resnet_bottleneck")
def resnet50_cifar(num_classes: int) -> CifarResNet:
    """ResNet-50 for 32x32 inputs (3x3 stem, no max-pool), 2048-d features."""
    return CifarResNet(Bottleneck, 64, (64, 128, 256, 512), (3, 4, 6, 3), num_classes)
