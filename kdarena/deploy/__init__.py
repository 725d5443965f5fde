"""From a run to a network you can use: export it, predict with it, load it in Python.

``export.py`` (``kdarena export``: safetensors, TorchScript, ONNX, each with its model card),
``card.py`` (the card's fields), ``source.py`` (which network of which checkpoint, never chosen on
test), ``load.py`` (:func:`load_model`), ``inputs.py`` and ``predict.py`` (``kdarena predict``).
Starting a run from weights is :mod:`kdarena.engine.weights`.
"""
from .errors import ExportError, PredictError
from .export import export_run
from .load import load_model
from .predict import predict

__all__ = ["ExportError", "PredictError", "export_run", "load_model", "predict"]
