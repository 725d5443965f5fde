"""The errors of image folders and archives: :class:`kdarena.errors.DataError` s (one line, exit 2).

Like every ``DataError`` they are also ``ValueError`` s (a missing folder a ``FileNotFoundError``),
so code written against the older plain types keeps catching them.
"""
from __future__ import annotations

from ..errors import DataError, DataFilesNotFoundError


class ImageDataError(DataError):
    """A problem with an image folder or archive; the message is one line naming it and the fix."""


class BadImageError(DataError):
    """An image file that cannot be decoded; the message names the file and the fix."""


class DataNotFoundError(ImageDataError, DataFilesNotFoundError):
    """An image folder or archive that is not there."""


def moved_data(error: DataFilesNotFoundError, command: str) -> DataFilesNotFoundError:
    """``error`` met by a command that rebuilds a trained run's data, with the override that finds data that moved."""
    return DataFilesNotFoundError(f"{error}; if the run's data moved, pass data.root=WHERE_IT_IS_NOW to {command}")
