"""Reading files kdarena does not trust, and writing every file it produces.

Reading (run folders, model files, cards, inputs): a path is opened with ``O_NONBLOCK`` and
checked with ``fstat`` before a byte is read, so a FIFO never blocks and a device
(``-> /dev/zero``) is never read; a regular file larger than the caller's limit is refused unread
(a file that grows while it is read is cut at ``limit + 1`` bytes and refused too). Links to
regular files are followed: the checks apply to what is opened.

Writing: a file is written under a temporary name in its own folder, fsynced, and renamed over
the target, so a crash or a full disk leaves the old file (or none), never half of one. The
target must be a regular file or not exist: a device node or a FIFO is never replaced (an export
run as root with ``--out /dev/null`` once replaced the machine's ``/dev/null``). Every OS error
(a full disk, a read-only file system, a name too long, no permission) is one line naming the
file and what to do, as a :class:`SafeFileError`.

API: :func:`read_bytes`, :func:`read_text`, :func:`open_regular` (to stream a regular file),
:func:`write_atomic`, and :func:`atomic_path` / :func:`atomic_paths` (temporary paths to hand to
a writer that wants file names, renamed over the targets when the block ends without an error).
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

from .errors import UserError

PathLike = str | os.PathLike


class SafeFileError(UserError, OSError):
    """A file that cannot be read or written as asked; the message (one line) names it and the fix."""

    def __str__(self) -> str:  # OSError's own str() would show the args tuple
        return str(self.args[0]) if self.args else ""


_WRITE_FIXES = {
    errno.ENOSPC: "free disk space and try again",
    errno.EDQUOT: "free space in your quota and try again",
    errno.EROFS: "the folder is on a read-only file system; choose a writable folder",
    errno.EACCES: "fix the folder's permissions or choose another folder",
    errno.EPERM: "fix the folder's permissions or choose another folder",
    errno.ENAMETOOLONG: "the name is too long for the file system; choose a shorter name",
    errno.ENOENT: "its folder does not exist; create it or choose another",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EISDIR: "it is a folder; give a file name",
    errno.EEXIST: "a file stands where a folder is needed; choose another path",
}


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _read_failed(path: PathLike, error: OSError) -> SafeFileError:
    return SafeFileError(f"cannot read {os.fspath(path)}: {error.strerror or error}")


def open_regular(path: PathLike, follow_links: bool = True) -> BinaryIO:
    """``path`` opened for reading in binary; refused unless it is a regular file. Never blocks.

    ``follow_links=False`` refuses a link too (a walk that already resolved its links uses it, so a
    file swapped for a link after the walk is not followed).
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow_links:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise SafeFileError(f"{os.fspath(path)} does not exist") from None
    except OSError as error:
        raise _read_failed(path, error) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise SafeFileError(f"{os.fspath(path)} is {_kind(mode)}, not a regular file; kdarena reads only regular files")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: PathLike, limit: int, follow_links: bool = True) -> bytes:
    """Every byte of the regular file ``path``, refused unread when it holds more than ``limit`` bytes."""
    with open_regular(path, follow_links) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > limit:
            raise SafeFileError(f"{os.fspath(path)} is {size} bytes, over kdarena's limit of {limit} bytes for this file; "
                                "it is not a file kdarena wrote")
        try:
            data = handle.read(limit + 1)
        except OSError as error:
            raise _read_failed(path, error) from None
    if len(data) > limit:
        raise SafeFileError(f"{os.fspath(path)} grew past kdarena's limit of {limit} bytes while it was read")
    return data


def read_text(path: PathLike, limit: int, encoding: str = "utf-8") -> str:
    """:func:`read_bytes` decoded; a file that is not text in ``encoding`` is one line too."""
    data = read_bytes(path, limit)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as error:
        raise SafeFileError(f"{os.fspath(path)} is not {encoding.upper()} text (byte {error.start}); it is not a file kdarena "
                            "wrote, or it is damaged") from None


def write_failed(path: PathLike, error: OSError) -> SafeFileError:
    """The OS error of writing ``path`` as the user's one-line error (the fix chosen by its errno)."""
    fix = _WRITE_FIXES.get(error.errno or 0, "check the path, the disk and the permissions")
    return SafeFileError(f"cannot write {os.fspath(path)}: {error.strerror or error}; {fix}")


def _writable_target(path: PathLike) -> Path:
    """Where to write ``path`` (a link is followed to its target), refused unless a regular file or absent."""
    target = Path(os.path.realpath(path))
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return target
    except OSError as error:
        raise write_failed(path, error) from None
    if not stat.S_ISREG(mode):
        raise SafeFileError(f"cannot write {os.fspath(path)}: it is {_kind(mode)}, and kdarena replaces only regular "
                            "files; give a file name")
    return target


def _mode_for(target: Path) -> int:
    """The mode the written file gets: the replaced file's, else what a plain ``open`` gives (mkstemp makes 0600)."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened or synced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_paths(*paths: PathLike) -> Iterator[list[str]]:
    """Temporary paths beside ``paths`` for writers that want names. When the block ends without an
    error, all are fsynced, then renamed over ``paths`` (a file and the cards that describe it are
    all replaced or none is, a rename aside); on an error every temporary file is removed."""
    targets = [_writable_target(path) for path in paths]
    temps: list[str] = []
    try:
        for path, target in zip(paths, targets):
            try:
                fd, temp = tempfile.mkstemp(prefix=f".{target.name[:100]}.", suffix=f".{os.getpid()}.tmp", dir=target.parent)
            except OSError as error:
                raise write_failed(path, error) from None
            os.close(fd)
            temps.append(temp)
        yield list(temps)
        for path, target, temp in zip(paths, targets, temps):
            _writable_target(path)  # still not swapped for a device or FIFO while it was written
            try:
                os.chmod(temp, _mode_for(target))
                fd = os.open(temp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as error:
                raise write_failed(path, error) from None
        for path, target, temp in zip(paths, targets, temps):
            try:
                os.replace(temp, target)
            except OSError as error:
                raise write_failed(path, error) from None
        for folder in {target.parent for target in targets}:
            _fsync_folder(folder)
    finally:
        for temp in temps:
            with contextlib.suppress(OSError):
                os.unlink(temp)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """A temporary path beside ``path`` for a writer that wants a name; when the block ends without an
    error it is fsynced and renamed over ``path``; otherwise it is removed. See :func:`atomic_paths`."""
    with atomic_paths(path) as (temp,):
        try:
            yield temp
        except SafeFileError:
            raise
        except OSError as error:  # the caller's write into the temporary file
            raise write_failed(path, error) from None


def write_atomic(path: PathLike, data: bytes | str) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` atomically: the whole new file or the old one, never part."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path) as temp:
        try:
            with open(temp, "wb") as handle:
                handle.write(payload)
        except OSError as error:
            raise write_failed(path, error) from None
