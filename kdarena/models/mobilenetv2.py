"""MobileNetV2 (Sandler et al., CVPR 2018), CIFAR variant.

Same inverted-residual stack as the paper, (t, c, n, s) = (1,16,1,1), (6,24,2,1*), (6,32,3,2),
(6,64,4,2), (6,96,3,1), (6,160,3,2), (6,320,1,1), but with a stride-1 stem and (*) stride 1 in
the second stage (the paper's ImageNet network downsamples 32x; this one 8x so 32x32 inputs end
at 4x4). Stem of 32 channels, final 1x1 conv to 1280 channels, ReLU6 activations, ``width_mult``
(default 1.0, ~2.2M parameters for 10 classes) scales every width except the last conv's.

Feature layer: ``pool`` (pooled 1280-d output of the last 1x1 conv).
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .registry import GlobalAvgPool, conv_bn, init_weights, register

# (expansion t, output channels c, repeats n, first stride s)
CIFAR_CONFIG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def _divisible(v: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor``, never dropping more than 10%."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new < 0.9 * v:
        new += divisor
    return new


def _conv_bn_act(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    return conv_bn(cin, cout, kernel, stride, groups, nn.ReLU6 if act else None)


class InvertedResidual(nn.Module):
    """1x1 expand - 3x3 depthwise - 1x1 linear projection, residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(_conv_bn_act(cin, hidden, 1))
        layers += [_conv_bn_act(hidden, hidden, 3, stride, groups=hidden), _conv_bn_act(hidden, cout, 1, act=False)]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width_mult: float = 1.0,
        last_channels: int = 1280,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        cin = _divisible(32 * width_mult)
        layers: list[nn.Module] = [_conv_bn_act(in_channels, cin, 3, stride=1)]
        for t, c, n, s in CIFAR_CONFIG:
            cout = _divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers.append(_conv_bn_act(cin, last_channels, 1))
        self.features = nn.Sequential(*layers)
        self.pool = GlobalAvgPool()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(last_channels, num_classes)
        self.feature_layer = "pool"
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(self.pool(self.features(x))))


@register("mobilenetv2")
def mobilenetv2(num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> MobileNetV2:
    return MobileNetV2(num_classes, in_channels, **kwargs)
