"""CIFAR ResNets (He et al., "Deep Residual Learning for Image Recognition", 2016, sec. 4.2).

``resnet20/32/44/56/110``: a 3x3 stem of 16 channels, then three stages of ``n = (depth-2)/6``
BasicBlocks with 16/32/64 channels (stride 1/2/2), global average pooling and a linear layer.
Shortcuts follow the paper's *option A*: identity, or when the shape changes, a strided
subsample padded with zero channels (no parameters). resnet20 has ~0.27M parameters.

``resnet8x4/32x4`` follow RepDistiller (Tian et al., CRD, 2020): ``ResNet(depth, [32, 64, 128,
256])``, i.e. a stem of 32 channels and three stages of 64/128/256 channels, ``n = (depth-2)/6``
blocks each. As in RepDistiller they use *option B* shortcuts (1x1 conv + BatchNorm whenever the
shape changes, including the stem-to-first-stage 32->64 widening), so their parameter counts
match the published ones (resnet8x4 ~1.23M, resnet32x4 ~7.43M).

Feature layer: ``pool`` (the globally pooled, flattened output of the last stage). Stage layers
(where early exits attach, :mod:`kdarena.models.heads`): ``layer1``, ``layer2``, ``layer3``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .registry import GlobalAvgPool, init_weights, register


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: subsample spatially with ``stride`` and zero-pad the extra channels."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        if planes < in_planes:
            raise ValueError("an option-A shortcut cannot reduce the channel count")
        self.stride = stride
        self.pad = planes - in_planes

    def forward(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            before = self.pad // 2
            x = F.pad(x, (0, 0, 0, 0, before, self.pad - before))
        return x


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride == 1 and in_planes == planes:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = ZeroPadShortcut(in_planes, planes, stride)
        elif shortcut == "B":
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        else:
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for small images: stem conv3x3 of ``widths[0]`` channels, then one stage per
    remaining width (first stride 1, then stride 2), ``(depth - 2) // 6`` BasicBlocks each."""

    def __init__(
        self,
        depth: int,
        widths: Sequence[int] = (16, 16, 32, 64),
        num_classes: int = 10,
        in_channels: int = 3,
        shortcut: str = "A",
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        stages = []
        for i, planes in enumerate(widths[1:]):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride, shortcut))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = GlobalAvgPool()
        self.fc = nn.Linear(in_planes, num_classes)
        self.feature_layer = "pool"
        self.stage_layers = ("layer1", "layer2", "layer3")
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x))


def _make(depth: int, widths: Sequence[int], shortcut: str):
    def build(num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> CifarResNet:
        return CifarResNet(depth, widths, num_classes, in_channels, shortcut=shortcut, **kwargs)

    return build


for _depth in (8, 14, 20, 32, 44, 56, 110):  # 8 and 14: the small CIFAR ResNets of the KD literature (RepDistiller)
    register(f"resnet{_depth}")(_make(_depth, (16, 16, 32, 64), "A"))
register("resnet8x4")(_make(8, (32, 64, 128, 256), "B"))
register("resnet32x4")(_make(32, (32, 64, 128, 256), "B"))
