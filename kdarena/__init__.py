"""kdarena: competitive distillation and its baselines for groups of PyTorch networks."""
__version__ = "0.1.0"
