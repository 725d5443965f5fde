"""ResNet-18 and ResNet-34 for 32x32 images (He et al. 2016's ImageNet ResNets, CIFAR stem).

The form the CIFAR self-distillation literature trains (e.g. BYOT, Zhang et al., ICCV 2019): a 3x3
stem of 64 channels without max-pooling, then four stages of BasicBlocks (2-2-2-2 or 3-4-6-3) with
64/128/256/512 channels and strides 1/2/2/2, projection shortcuts (1x1 conv + BatchNorm) where the
shape changes, global average pooling and a linear layer. resnet18 has ~11.2M parameters (100 classes).

Feature layer: ``pool``; stage layers (where early exits attach): ``layer1`` ... ``layer4``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .registry import GlobalAvgPool, init_weights, register
from .resnet_cifar import BasicBlock

WIDTHS = (64, 128, 256, 512)


class ResNet4(nn.Module):
    def __init__(self, blocks: Sequence[int], num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, WIDTHS[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTHS[0])
        in_planes = WIDTHS[0]
        stages = []
        for i, (planes, count) in enumerate(zip(WIDTHS, blocks)):
            layers = []
            for j in range(count):
                layers.append(BasicBlock(in_planes, planes, 2 if (i > 0 and j == 0) else 1, shortcut="B"))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = GlobalAvgPool()
        self.fc = nn.Linear(in_planes, num_classes)
        self.feature_layer = "pool"
        self.stage_layers = ("layer1", "layer2", "layer3", "layer4")
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.pool(x))


def _make(blocks: Sequence[int]):
    def build(num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> ResNet4:
        return ResNet4(blocks, num_classes, in_channels, **kwargs)

    return build


register("resnet18")(_make((2, 2, 2, 2)))
register("resnet34")(_make((3, 4, 6, 3)))
