"""ShuffleNetV1 (g=3) and ShuffleNetV2 (1x) for CIFAR, in the CRD/RepDistiller shapes.

Both keep the reference's 1x1 stem at stride 1 and its default PyTorch initialisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import PooledClassifier, conv_bn, global_pool
from .registry import register_model


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """Interleave the channels of ``groups`` groups (reshape-only, so it traces with torch.fx)."""
    return x.unflatten(1, (groups, -1)).transpose(1, 2).flatten(1, 2)


class ShuffleV1Unit(nn.Module):
    """Grouped 1x1, shuffle, 3x3 depthwise, grouped 1x1; strided units concatenate an avg-pooled input."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int, first_groups: int) -> None:
        super().__init__()
        self.downsample = stride == 2
        branch_channels = out_channels - in_channels if self.downsample else out_channels
        mid = branch_channels // 4
        self.first_groups = first_groups
        self.reduce = conv_bn(in_channels, mid, 1, groups=first_groups)
        self.depthwise = conv_bn(mid, mid, 3, stride=stride, groups=mid, relu=False)
        self.expand = conv_bn(mid, branch_channels, 1, groups=groups, relu=False)
        self.pool = nn.AvgPool2d(3, stride=2, padding=1) if self.downsample else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """Unit output."""
        out = self.reduce(x)
        if self.first_groups > 1:
            out = channel_shuffle(out, self.first_groups)
        # The reference applies ReLU after the depthwise BN, unlike the ShuffleNet paper.
        out = self.expand(F.relu(self.depthwise(out)))
        merged = torch.cat([out, self.pool(x)], 1) if self.downsample else out + x
        return F.relu(merged)


class ShuffleNetV1(PooledClassifier):
    """1x1 stem to 24 channels, three stages of ShuffleV1 units, global pool, linear."""

    def __init__(self, stage_channels: tuple[int, ...], depths: tuple[int, ...], groups: int, num_classes: int) -> None:
        super().__init__()
        in_channels = 24
        self.stem = conv_bn(3, in_channels, 1)
        stages: list[nn.Module] = []
        for index, (channels, depth) in enumerate(zip(stage_channels, depths, strict=True)):
            units: list[nn.Module] = []
            for i in range(depth):
                # The first pointwise conv after the narrow stem is dense (as in the ShuffleNet paper).
                first_groups = 1 if index == 0 and i == 0 else groups
                units.append(ShuffleV1Unit(in_channels, channels, 2 if i == 0 else 1, groups, first_groups))
                in_channels = channels
            stages.append(nn.Sequential(*units))
        self.stages = nn.Sequential(*stages)
        self.pool = global_pool()
        self.feature_dim = in_channels
        self.classifier = nn.Linear(in_channels, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled output of the last stage."""
        return self.pool(self.stages(self.stem(x)))


class ShuffleV2Unit(nn.Module):
    """Split the channels in half; transform one half (1x1, 3x3 depthwise, 1x1); concat; shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            conv_bn(half, half, 1),
            conv_bn(half, half, 3, groups=half, relu=False),
            conv_bn(half, half, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Unit output."""
        kept, transformed = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([kept, self.branch(transformed)], 1), 2)


class ShuffleV2DownUnit(nn.Module):
    """Two strided branches over the full input, each giving half of ``out_channels``; concat; shuffle."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        half = out_channels // 2
        self.left = nn.Sequential(
            conv_bn(in_channels, in_channels, 3, stride=2, groups=in_channels, relu=False),
            conv_bn(in_channels, half, 1),
        )
        self.right = nn.Sequential(
            conv_bn(in_channels, half, 1),
            conv_bn(half, half, 3, stride=2, groups=half, relu=False),
            conv_bn(half, half, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Unit output."""
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1), 2)


class ShuffleNetV2(PooledClassifier):
    """1x1 stem to 24 channels, three stages (a down unit + basic units), 1x1 head conv, pool, linear."""

    def __init__(
        self, stage_channels: tuple[int, ...], depths: tuple[int, ...], head_channels: int, num_classes: int
    ) -> None:
        super().__init__()
        in_channels = 24
        self.stem = conv_bn(3, in_channels, 1)
        stages: list[nn.Module] = []
        for channels, depth in zip(stage_channels, depths, strict=True):
            units: list[nn.Module] = [ShuffleV2DownUnit(in_channels, channels)]
            units += [ShuffleV2Unit(channels) for _ in range(depth)]
            stages.append(nn.Sequential(*units))
            in_channels = channels
        self.stages = nn.Sequential(*stages)
        self.head = conv_bn(in_channels, head_channels, 1)
        self.pool = global_pool()
        self.feature_dim = head_channels
        self.classifier = nn.Linear(head_channels, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled output of the 1x1 head conv."""
        return self.pool(self.head(self.stages(self.stem(x))))


@register_model("ShuffleV1", family="shufflenet")
def shufflenet_v1(num_classes: int) -> ShuffleNetV1:
    """ShuffleNetV1 with 3 groups (stages 240/480/960, 4/8/4 units), 960-d features."""
    return ShuffleNetV1((240, 480, 960), (4, 8, 4), groups=3, num_classes=num_classes)


@register_model("ShuffleV2", family="shufflenet")
def shufflenet_v2(num_classes: int) -> ShuffleNetV2:
    """ShuffleNetV2 1x (stages 116/232/464, 3/7/3 basic units, 1024-d head), 1024-d features."""
    return ShuffleNetV2((116, 232, 464), (3, 7, 3), head_channels=1024, num_classes=num_classes)
