"""VGG with BatchNorm, CIFAR style (as in RepDistiller, Tian et al. 2020).

Five stages of 3x3 conv-BN-ReLU layers, a 2x2 max-pool after each of the first four, global
average pooling and a single linear layer (no large fully connected head):

* ``vgg8``:  [[64], [128], [256], [512], [512]]
* ``vgg11``: [[64], [128], [256, 256], [512, 512], [512, 512]]
* ``vgg13``: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]]

The max-pools use ``ceil_mode=True`` so inputs as small as 8x8 never shrink to zero size (no
change for power-of-two sizes such as 32x32). Convs have no bias (BatchNorm follows).

Feature layer: ``pool`` (pooled 512-d output of the last stage).
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn

from .registry import GlobalAvgPool, init_weights, register

CONFIGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
}


class VGG(nn.Module):
    def __init__(self, config: Sequence[Sequence[int]], num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for i, stage in enumerate(config):
            for width in stage:
                layers += [nn.Conv2d(cin, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                cin = width
            if i < len(config) - 1:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
        self.features = nn.Sequential(*layers)
        self.pool = GlobalAvgPool()
        self.fc = nn.Linear(cin, num_classes)
        self.feature_layer = "pool"
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.features(x)))


def _make(config: list[list[int]]):
    def build(num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> VGG:
        return VGG(config, num_classes, in_channels, **kwargs)

    return build


for _name, _config in CONFIGS.items():
    register(_name)(_make(_config))
