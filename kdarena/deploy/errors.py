"""The bad-input errors of export, predict and load_model (one line for the user, exit 2)."""
from __future__ import annotations

from ..errors import UserError


class ExportError(UserError):
    """A run, network or format that cannot be exported (or an exported file that cannot be loaded)."""


class PredictError(UserError):
    """Inputs that give nothing to predict on."""
