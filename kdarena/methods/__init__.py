"""Group training methods, one class per method, found by name through the registry.

Built in: ``independent``, ``dml`` (Deep Mutual Learning), ``cd`` (competitive distillation,
the paper's and the authors' code's rules) and ``kd`` (offline KD). A new method is one
``@register_method("name")`` class with a ``Params`` model and a ``losses(step)`` method.
"""
from __future__ import annotations

from . import registry
from .base import GroupLosses, GroupMethod, MethodContext, MethodParams, Needs, StepInput
from .common import pairwise_feature_l2, pairwise_kl, per_network_ce, select_teacher
from .registry import register_method

# Registration order is the order of `kdarena methods`, sweep presets and report rows: baselines first.
from .independent import Independent  # noqa: E402,I001
from .dml import DeepMutualLearning  # noqa: E402
from .cd import CompetitiveDistillation  # noqa: E402
from .cd_mean import CompetitiveMeanTeachers  # noqa: E402
from .kd import KnowledgeDistillation, freeze  # noqa: E402
from .kdcl import KDCL  # noqa: E402
from .pcl import PeerCollaborativeLearning  # noqa: E402
from .pskd import ProgressiveSelfKD  # noqa: E402
from .one import OnTheFlyNativeEnsemble  # noqa: E402

__all__ = [
    "CompetitiveDistillation",
    "CompetitiveMeanTeachers",
    "DeepMutualLearning",
    "GroupLosses",
    "GroupMethod",
    "Independent",
    "KDCL",
    "KnowledgeDistillation",
    "MethodContext",
    "MethodParams",
    "Needs",
    "OnTheFlyNativeEnsemble",
    "PeerCollaborativeLearning",
    "ProgressiveSelfKD",
    "StepInput",
    "freeze",
    "pairwise_feature_l2",
    "pairwise_kl",
    "per_network_ce",
    "register_method",
    "registry",
    "select_teacher",
]
