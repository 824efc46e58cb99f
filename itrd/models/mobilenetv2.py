"""MobileNetV2 for CIFAR as used by CRD/RepDistiller and the ITRD paper (``mobile_half``: width 0.5)."""

from __future__ import annotations

from torch import Tensor, nn

from .common import PooledClassifier, conv_bn, global_pool, init_convs_he_fan_out, init_linear_small
from .registry import register_model

# (expansion, channels, blocks, first stride); expansion None means "the network's expansion".
_SETTINGS: tuple[tuple[int | None, int, int, int], ...] = (
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise, 1x1 linear projection; residual when the shape is kept.

    Unlike torchvision's MobileNetV2, the expansion conv is present even for expansion 1, as in the
    reference network (it changes the parameter count).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.body = nn.Sequential(
            conv_bn(in_channels, hidden, 1),
            conv_bn(hidden, hidden, 3, stride=stride, groups=hidden),
            conv_bn(hidden, out_channels, 1, relu=False),
        )
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        """Block output."""
        out = self.body(x)
        return x + out if self.residual else out


class MobileNetV2(PooledClassifier):
    """Stride-2 stem, seven inverted-residual stages, 1x1 conv to 1280, global pool, linear."""

    def __init__(self, width: float, expansion: int, num_classes: int) -> None:
        super().__init__()
        in_channels = int(32 * width)
        self.stem = conv_bn(3, in_channels, 3, stride=2)
        stages: list[nn.Module] = []
        for stage_expansion, channels, depth, first_stride in _SETTINGS:
            out_channels = int(channels * width)
            blocks: list[nn.Module] = []
            for i in range(depth):
                blocks.append(
                    InvertedResidual(
                        in_channels,
                        out_channels,
                        first_stride if i == 0 else 1,
                        expansion if stage_expansion is None else stage_expansion,
                    )
                )
                in_channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        # The head keeps 1280 channels for narrow networks and only widens for width > 1.
        head_channels = int(1280 * width) if width > 1.0 else 1280
        self.head = conv_bn(in_channels, head_channels, 1)
        self.pool = global_pool()
        self.feature_dim = head_channels
        self.classifier = nn.Linear(head_channels, num_classes)
        init_convs_he_fan_out(self)
        init_linear_small(self.classifier)

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled output of the 1x1 head conv."""
        return self.pool(self.head(self.stages(self.stem(x))))


@register_model("mobile_half", family="mobilenet")
@register_model("MobileNetV2", family="mobilenet")
def mobilenetv2_half(num_classes: int) -> MobileNetV2:
    """MobileNetV2 at width 0.5 with expansion 6 (the paper's "MobileNetV2"), 1280-d features."""
    return MobileNetV2(width=0.5, expansion=6, num_classes=num_classes)
