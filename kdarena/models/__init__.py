"""Model zoo: CIFAR ResNets (and ResNet-18/34 with a CIFAR stem), WRNs, MobileNetV2, ShuffleNetV2, VGG,
a tiny ConvNet, and any timm model as ``'timm:NAME'``; the extra heads some methods train
(:mod:`kdarena.models.heads`).

>>> from kdarena import models
>>> net = models.create("resnet20", num_classes=10, in_channels=3)
>>> models.feature_layer(net)   # module whose output is the pooled (N, D) feature
'pool'
"""
from __future__ import annotations

from .registry import available, create, feature_layer, register
from . import convnet, mobilenetv2, resnet_cifar, shufflenetv2, vgg, wrn  # noqa: F401  (register models)
from . import resnet18_cifar  # noqa: F401  (resnet18/34 at CIFAR scale)
from . import mlp  # noqa: F401  (BatchNorm-free MLP for tests)
from . import branched  # noqa: F401  (branched:<model>, one shared trunk and a branch per group network)

__all__ = ["available", "create", "feature_layer", "register"]
