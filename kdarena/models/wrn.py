"""Wide ResNets (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016).

WRN-d-k: a 3x3 stem of 16 channels, three groups of ``n = (d-4)/6`` pre-activation blocks
(BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3) with 16k/32k/64k channels (stride 1/2/2), a final
BN-ReLU, global average pooling and a linear layer. A shortcut is a 1x1 conv (no BN) applied to
the pre-activated input whenever the shape changes. ``dropout`` (default 0) is the paper's
dropout between the two convolutions of a block.

Published CIFAR-10 sizes: WRN-16-2 ~0.70M, WRN-40-2 ~2.2M, WRN-28-10 ~36.5M parameters.

Feature layer: ``pool`` (pooled output of the final BN-ReLU).
"""
from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .registry import GlobalAvgPool, init_weights, register


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = F.relu(self.bn2(out))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        residual = x if self.shortcut is None else self.shortcut(pre)
        return out + residual


class WideResNet(nn.Module):
    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int = 10,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        in_planes = 16
        groups = []
        for i, planes in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(PreActBlock(in_planes, planes, stride, dropout))
                in_planes = planes
            groups.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(in_planes)
        self.pool = GlobalAvgPool()
        self.fc = nn.Linear(in_planes, num_classes)
        self.feature_layer = "pool"
        self.stage_layers = ("block1", "block2", "block3")  # where early exits attach (models.heads)
        init_weights(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.block3(self.block2(self.block1(x)))
        x = F.relu(self.bn(x))
        return self.fc(self.pool(x))


def _make(depth: int, k: int):
    def build(num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> WideResNet:
        return WideResNet(depth, k, num_classes, in_channels, **kwargs)

    return build


register("wrn16_2")(_make(16, 2))
register("wrn40_2")(_make(40, 2))
register("wrn28_10")(_make(28, 10))
