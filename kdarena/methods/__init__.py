"""Group training methods, one class per method, found by name through the registry.

A method is one ``@register_method("name")`` class in its own file with a ``Params`` model (its
options, stated once) and a ``losses(step)`` method; it takes its maths from :mod:`kdarena.losses`
and its types from :mod:`kdarena.methods.base`. A built-in method is also imported here and placed in
:data:`BUILT_IN`, which orders ``kdarena methods``, sweep presets and report rows.
"""
from __future__ import annotations

from . import registry
from .base import GroupLosses, GroupMethod, MethodContext, MethodParams, Needs, StepInput, freeze
from .cd import CompetitiveDistillation
from .cd_mean import CompetitiveMeanTeachers
from .dml import DeepMutualLearning
from .independent import Independent
from .kd import KnowledgeDistillation
from .kdcl import KDCL
from .one import OnTheFlyNativeEnsemble
from .pcl import PeerCollaborativeLearning
from .pskd import ProgressiveSelfKD
from .byot import BeYourOwnTeacher
from .mcl import MutualContrastiveLearning
from .okddip import OnlineDistillationDiversePeers
from .registry import register_method

#: the built-in methods in the order of `kdarena methods`, sweep presets and report rows: baselines first
BUILT_IN: tuple[type[GroupMethod], ...] = (
    Independent,
    DeepMutualLearning,
    CompetitiveDistillation,
    CompetitiveMeanTeachers,
    KnowledgeDistillation,
    KDCL,
    PeerCollaborativeLearning,
    ProgressiveSelfKD,
    OnTheFlyNativeEnsemble,
    MutualContrastiveLearning,
    OnlineDistillationDiversePeers,
    BeYourOwnTeacher,
)
registry.set_order([method.name for method in BUILT_IN])

__all__ = [
    "BUILT_IN",
    "BeYourOwnTeacher",
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
    "MutualContrastiveLearning",
    "Needs",
    "OnTheFlyNativeEnsemble",
    "OnlineDistillationDiversePeers",
    "PeerCollaborativeLearning",
    "ProgressiveSelfKD",
    "StepInput",
    "freeze",
    "register_method",
    "registry",
]
