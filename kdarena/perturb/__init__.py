"""Stochastic perturbation ("mutation") of one network's input batch.

Method, section 3: at a perturbed step ONE network, chosen uniformly at random, sees an
aggressively perturbed view of the batch; the competition (lowest CE becomes the teacher) is
the only filter. The package:

* :mod:`.base` - the op call convention ``op(x, y, lam, generator=None) -> (x', target)`` on a
  normalised (N, C, H, W) batch, input checks, parameter validation;
* :mod:`.ops` - mixing and photometric ops: ``Mixup``, ``CutMix``, ``Noise``, ``Jitter``, ``Blur``;
* :mod:`.geometry` - geometric ops: ``Warp``, ``Crop``, ``Rotate``, ``HFlip``, ``VFlip``;
* :mod:`.pools` - the registry (``OPS``: default instances, ``OP_CLASSES``), the pools
  ``PAPER_POOL`` / ``CODE_POOL`` / ``ALL_OPS``, :func:`get_op` and :func:`resolve_ops`;
* :mod:`.scheduler` - :class:`PerturbationScheduler` (whether, which network, which op, lam);
* :mod:`.batchnorm` - BatchNorm running-statistics protection (:func:`preserved_bn_stats`,
  alias ``frozen_bn_stats``; :class:`BatchNormSnapshot` for a device-side conditional restore);
* :mod:`.mutation` - optional parameter-space mutation (:class:`ParameterMutation`,
  :class:`MutationTracker`), not in the paper.

Op strengths are constructor arguments (``Noise(std=0.5, clamp=(0, 1))``, ``get_op("crop",
scale=(0.2, 0.5))``, or ``perturb.op_params`` in the YAML config); the module-level names
``mixup``, ``cutmix``, ``noise``, ``warp``, ``crop``, ``jitter``, ``blur``, ``hflip``, ``vflip``,
``rotate`` are the default instances, callable as ``noise(x, y, lam, generator)``.
"""
from __future__ import annotations

from .base import Op, OpParameterError, OpResult, PerturbOp
from .batchnorm import BatchNormSnapshot, GroupBatchNormSnapshot, bn_buffers, frozen_bn_stats, preserved_bn_stats
from .geometry import Crop, HFlip, Rotate, VFlip, Warp
from .mutation import MutationTracker, ParameterMutation
from .ops import Blur, CutMix, Jitter, Mixup, Noise
from .pools import ALL_OPS, CODE_POOL, MIXING_OPS, OP_CLASSES, OPS, PAPER_POOL, POOLS, build_ops, get_op, resolve_ops
from .scheduler import Perturbation, PerturbationScheduler

mixup = OPS["mixup"]
cutmix = OPS["cutmix"]
noise = OPS["noise"]
warp = OPS["warp"]
crop = OPS["crop"]
jitter = OPS["jitter"]
blur = OPS["blur"]
hflip = OPS["hflip"]
vflip = OPS["vflip"]
rotate = OPS["rotate"]

__all__ = [
    "OPS", "OP_CLASSES", "PAPER_POOL", "CODE_POOL", "ALL_OPS", "MIXING_OPS", "POOLS",
    "Op", "OpResult", "PerturbOp", "OpParameterError",
    "Mixup", "CutMix", "Noise", "Warp", "Crop", "Jitter", "Blur", "HFlip", "VFlip", "Rotate",
    "get_op", "build_ops", "resolve_ops",
    "Perturbation", "PerturbationScheduler",
    "BatchNormSnapshot", "GroupBatchNormSnapshot", "bn_buffers", "preserved_bn_stats", "frozen_bn_stats",
    "ParameterMutation", "MutationTracker",
    "mixup", "cutmix", "noise", "warp", "crop", "jitter", "blur", "hflip", "vflip", "rotate",
]
