"""Walking an image folder: regular files only, never out of the data root, never round a loop.

Why each rule (found with hostile folders, see RELIABILITY.md):

* a symbolic link to a folder is never entered: ``ln -s .. train/a/loop`` walked with links
  followed turned 8 images into 328, every class counted as class ``a``; a real folder is
  entered once per (device, inode), so a bind mount cannot loop either;
* a symbolic link to a file is read only when it resolves to a regular file inside the data root
  (it then counts in the folder where the link is); one pointing out (``z.png -> /dev/zero``) is not;
* FIFOs, devices and sockets are never opened (a FIFO named ``x.png`` blocked decoding forever);
  :func:`open_regular` opens with ``O_NONBLOCK | O_NOFOLLOW`` and checks ``fstat`` again, so a
  file swapped for a FIFO or a link after the walk is refused instead of blocking.

What is left out is listed in :attr:`FolderScan.skipped` (path, why) for one warning.  Hidden
names (``.git``, ``.DS_Store``) are left out silently.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import stat
from dataclasses import dataclass, field
from typing import BinaryIO, Callable

from .. import safe_files

_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileEntry:
    """A regular file found by the walk; ``path`` is what to open (a link's resolved target)."""

    path: str
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int


@dataclass
class FolderScan:
    root: str  # resolved (realpath)
    files: dict[str, FileEntry] = field(default_factory=dict)  # relative POSIX path -> file
    dirs: set[str] = field(default_factory=set)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, why)


def _entry(path: str, st: os.stat_result) -> FileEntry:
    return FileEntry(path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def inside_root(root: str, target: str) -> bool:
    """Whether the resolved path ``target`` is ``root`` (resolved) or lies under it."""
    return target == root or target.startswith(root.rstrip(os.sep) + os.sep)


def _follow(root: str, link: str) -> tuple[FileEntry | None, str]:
    """The file a link stands for, or (None, why it is not read)."""
    target = os.path.realpath(link)
    if not inside_root(root, target):
        return None, f"a link out of the data root (to {target})"
    try:
        st = os.stat(target)
    except OSError as e:
        return None, f"a broken link ({e.strerror})"
    if stat.S_ISDIR(st.st_mode):
        return None, "a link to a folder (never followed: it would count another folder's images here)"
    if not stat.S_ISREG(st.st_mode):
        return None, "a link to a FIFO, device or socket"
    return _entry(target, st), ""


def scan_folder(root: str, wanted: Callable[[str], bool]) -> FolderScan:
    """Every regular file under ``root`` whose relative path is ``wanted`` (see the module docstring)."""
    scan = FolderScan(os.path.realpath(root))
    seen: set[tuple[int, int]] = set()
    stack = [("", scan.root)]
    while stack:
        reldir, full = stack.pop()
        try:
            st = os.stat(full)
            if (st.st_dev, st.st_ino) in seen:
                scan.skipped.append((reldir, "a folder already walked (a bind mount loop)"))
                continue
            seen.add((st.st_dev, st.st_ino))
            entries = sorted(os.scandir(full), key=lambda e: e.name)
        except OSError as e:
            scan.skipped.append((reldir or ".", f"unreadable ({e.strerror})"))
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            rel = posixpath.join(reldir, e.name)
            try:
                st = e.stat(follow_symlinks=False)
            except OSError as err:
                scan.skipped.append((rel, f"unreadable ({err.strerror})"))
                continue
            if stat.S_ISDIR(st.st_mode):
                scan.dirs.add(rel)
                stack.append((rel, e.path))
                continue
            if stat.S_ISLNK(st.st_mode):
                found, why = _follow(scan.root, e.path)
            elif stat.S_ISREG(st.st_mode):
                found, why = _entry(e.path, st), ""
            else:
                found, why = None, "not a regular file (a FIFO, device or socket)"
            if found is None:
                if wanted(rel) or os.path.isdir(e.path):  # a skipped folder is named whatever its name
                    scan.skipped.append((rel, why))
            elif wanted(rel):
                scan.files[rel] = found
    return scan


def skipped_note(root: str, skipped: list[tuple[str, str]]) -> str:
    """One line for a warning about what a walk or an archive scan left out."""
    named = "; ".join(f"{rel}: {why}" for rel, why in skipped[:3])
    more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    return (f"{root}: skipped {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} ({named}{more}); kdarena reads "
            "only regular files inside the data root: copy the files in instead of linking them")


def walk_order(rel: str) -> list[tuple[int, str]]:
    """Sort key giving ``os.walk``'s top-down order: a folder's files before its sub-folders."""
    parts = rel.split("/")
    return [(1, p) for p in parts[:-1]] + [(0, parts[-1])]


def open_regular(path: str) -> BinaryIO:
    """``path`` opened for reading, refused (``OSError``) unless it is a regular file; never blocks, never follows a link."""
    return safe_files.open_regular(path, follow_links=False)


def read_regular(path: str, limit: int) -> bytes:
    """All bytes of a regular file of at most ``limit`` bytes (``OSError`` beyond: never read unbounded)."""
    return safe_files.read_bytes(path, limit, follow_links=False)


def sha256_regular(path: str) -> str:
    """sha256 of a regular file, read in 1 MiB blocks (memory stays flat whatever its size)."""
    h = hashlib.sha256()
    with open_regular(path) as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()
