"""The errors of image folders and archives (one line for the user, exit 2: see :mod:`kdarena.errors`).

They also derive from ``ValueError`` (and a missing folder from ``FileNotFoundError``) so that code
written against the older plain types keeps catching them.
"""
from __future__ import annotations

from ..errors import UserError


class ImageDataError(UserError, ValueError):
    """A problem with an image folder or archive; the message is one line naming it and the fix."""


class BadImageError(UserError, ValueError):
    """An image file that cannot be decoded; the message names the file and the fix."""


class DataNotFoundError(ImageDataError, FileNotFoundError):
    """An image folder or archive that is not there."""
