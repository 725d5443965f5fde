"""kdarena: competitive distillation and its baselines for groups of PyTorch networks.

Layout: ``methods/`` (one class per method and the registry), ``perturb/`` (input perturbation
and weight mutation), ``engine/`` (building the parts, checkpoints, run records, schedules,
distributed helpers, the fused group, evaluation), ``experiments/`` (sweep, report, plot),
``data/`` and ``models/``; ``config.py`` is the schema and ``trainer.py`` the training loop.
"""
from .cpu_threads import prefer_passive_waiting

prefer_passive_waiting()  # before torch is imported (below): OpenMP reads its wait policy once, as it loads

from .group import Group, GroupOutput  # noqa: E402
from .losses import MixedTarget, cross_entropy, feature_l2, kl_to_teacher
from .methods import (
    CompetitiveDistillation,
    DeepMutualLearning,
    GroupLosses,
    GroupMethod,
    Independent,
    KnowledgeDistillation,
    MethodParams,
    StepInput,
    register_method,
)
from .trainer import Trainer, train
from .version import __version__
from .deploy import load_model

__all__ = [
    "__version__",
    "Group",
    "GroupOutput",
    "GroupLosses",
    "GroupMethod",
    "MethodParams",
    "MixedTarget",
    "StepInput",
    "Independent",
    "DeepMutualLearning",
    "CompetitiveDistillation",
    "KnowledgeDistillation",
    "Trainer",
    "cross_entropy",
    "feature_l2",
    "kl_to_teacher",
    "load_model",
    "register_method",
    "train",
]
