"""Experiments: ``kdarena sweep`` (methods x seeds), ``kdarena report`` (tables) and ``kdarena plot``."""
