"""kdarena's own exception for bad input.

The command line prints a :class:`UserError` as one line and exits 2; any other exception is a bug
of ours and keeps its traceback. Raise a subclass of ``UserError`` (never a bare ``ValueError``) when
the user's input is at fault, with a message that names the problem and the fix.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (a config value, a file, an option): one line for the user, exit 2."""


class ConfigError(UserError, ValueError):
    """A bad configuration value; the message is one line meant for the user (the key, the value, the fix)."""


class ModelSpecError(UserError, ValueError):
    """A model entry the zoo cannot build as written (an unknown name, a model with no branched form, a feature
    layer it lacks). Callers that know the config key add it; a model that breaks its own contract (a builder
    declaring a feature layer it does not have) raises a plain ``ValueError``: that is a bug, not bad input."""


class DataError(UserError, ValueError):
    """A data set's files that cannot be used (corrupt, truncated, missing, not what their name says)."""


class DataFilesNotFoundError(DataError, FileNotFoundError):
    """A data set's files are not where the config points (nor in any searched place)."""


class MissingExtraError(UserError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""
