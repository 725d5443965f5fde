"""The package version, in a module of its own: read by the package, the trainer, checkpoints and pyproject."""
__version__ = "0.2.0"
