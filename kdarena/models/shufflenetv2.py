"""ShuffleNetV2 1x (Ma et al., ECCV 2018), CIFAR variant.

Stage widths 116/232/464 with 4/8/4 units (the first of each stage a stride-2 downsampling
unit), a final 1x1 conv to 1024 channels, global average pooling and a linear layer. For small
images the stem is a stride-1 3x3 conv of 24 channels with no max-pool (the paper's ImageNet
stem is a stride-2 conv plus a stride-2 max-pool), so 32x32 inputs end at 4x4.
~1.26M parameters for 10 classes.

Feature layer: ``pool`` (pooled 1024-d output of the final 1x1 conv).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .registry import GlobalAvgPool, conv_bn, init_weights, register


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, relu: bool = True) -> nn.Sequential:
    return conv_bn(cin, cout, kernel, stride, groups, nn.ReLU if relu else None)


class ShuffleUnit(nn.Module):
    """Basic unit (stride 1: split channels, transform one half) or downsampling unit (stride 2:
    both branches see the whole input), followed by concatenation and a 2-group channel shuffle."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        if cout % 2:
            raise ValueError("ShuffleNetV2 unit widths must be even")
        self.stride = stride
        mid = cout // 2
        if stride == 1:
            if cin != cout:
                raise ValueError("a stride-1 ShuffleNetV2 unit keeps the channel count")
            branch_in = mid
            self.left = nn.Identity()
        else:
            branch_in = cin
            self.left = nn.Sequential(
                _conv_bn(cin, cin, 3, stride, groups=cin, relu=False), _conv_bn(cin, mid, 1)
            )
        self.right = nn.Sequential(
            _conv_bn(branch_in, mid, 1),
            _conv_bn(mid, mid, 3, stride, groups=mid, relu=False),
            _conv_bn(mid, mid, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            a, b = x.chunk(2, dim=1)
            out = torch.cat((a, self.right(b)), dim=1)
        else:
            out = torch.cat((self.left(x), self.right(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        stage_widths: Sequence[int] = (116, 232, 464),
        stage_repeats: Sequence[int] = (4, 8, 4),
        stem_channels: int = 24,
        last_channels: int = 1024,
    ) -> None:
        super().__init__()
        self.stem = _conv_bn(in_channels, stem_channels, 3)
        cin = stem_channels
        stages = []
        for width, repeats in zip(stage_widths, stage_repeats):
            units = [ShuffleUnit(cin, width, 2)] + [ShuffleUnit(width, width, 1) for _ in range(repeats - 1)]
            stages.append(nn.Sequential(*units))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.conv_last = _conv_bn(cin, last_channels, 1)
        self.pool = GlobalAvgPool()
        self.fc = nn.Linear(last_channels, num_classes)
        self.feature_layer = "pool"
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_last(self.stages(self.stem(x)))
        return self.fc(self.pool(x))


@register("shufflenetv2")
def shufflenetv2(num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> ShuffleNetV2:
    return ShuffleNetV2(num_classes, in_channels, **kwargs)
