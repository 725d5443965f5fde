"""kdarena: competitive distillation and its baselines for groups of PyTorch networks."""
__version__ = "0.1.0"

from .group import Group, GroupOutput
from .losses import MixedTarget, cross_entropy, feature_l2, kl_to_teacher
from .methods import (
    METHODS,
    CompetitiveDistillation,
    DeepMutualLearning,
    GroupLosses,
    Independent,
    KnowledgeDistillation,
)

__all__ = [
    "__version__",
    "Group",
    "GroupOutput",
    "GroupLosses",
    "MixedTarget",
    "Independent",
    "DeepMutualLearning",
    "CompetitiveDistillation",
    "KnowledgeDistillation",
    "METHODS",
    "cross_entropy",
    "feature_l2",
    "kl_to_teacher",
]
