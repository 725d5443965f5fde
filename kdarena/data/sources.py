"""Image data sets as folders or archives (``.tar``, ``.tar.gz``/``.tgz``, ``.zip``) of image files.

A source is scanned into relative POSIX paths (``train/cat/0001.jpg``); :func:`parse_layout`
(:mod:`kdarena.data.layout`) turns them into classes and labelled file lists.

Trust: archives are read member by member, never extracted.  A member whose path is absolute or
climbs out with ``..`` is refused (it would be mislabelled at best); ``./a/0.png`` and
``a\\0.png`` (written so by some zip tools) are read as ``a/0.png``; links, devices and FIFOs are
skipped (tar and zip alike) and listed in one warning; files without an image extension
(``*_boxes.txt``, ``.DS_Store``) are skipped.  Folders are walked by :mod:`kdarena.data.walk`
(regular files inside the data root only, no loops).

Memory, one budget for every kind (``max_bytes``, from ``data.cache_max_gb``): what a source holds
in memory at once.  A tar (read in one sequential pass: gzip cannot seek) and a zip hold the bytes
of their image and index files; their total is checked against the budget from the member headers
(the tar header, the zip central directory) *before* a member is read, so a 1 GiB member of zeros
named ``.jpg`` costs nothing but the refusal.  A zip member is never read beyond the size its
directory states (:mod:`zipfile` stops there and checks the CRC).  A folder holds nothing: its images
are opened one at a time by the decoder, which reads only what Pillow needs; its index files
(``wnids.txt``...) are read whole and charged to the budget.
"""
from __future__ import annotations

import os
import posixpath
import stat
import tarfile
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field

from .errors import DataNotFoundError, ImageDataError
from .imagefolder import IMG_EXTENSIONS
from .layout import Layout, parse_layout
from .walk import FileEntry, read_regular, scan_folder, skipped_note

__all__ = ["ARCHIVE_SUFFIXES", "ImageDataError", "Layout", "Source", "is_archive", "open_source", "parse_layout"]

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
_TEXT_FILES = ("wnids.txt", "classes.txt", "words.txt", "val_annotations.txt")
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, NotImplementedError, ValueError)


def _why(e: BaseException) -> str:
    """An archive library's message on one line (tarfile's lists each method it tried on its own line)."""
    return " ".join(str(e).split()) or type(e).__name__


def is_archive(path: str) -> bool:
    return os.path.isfile(path) and path.lower().endswith(ARCHIVE_SUFFIXES)


class _Budget:
    """Bytes a source may hold in memory; refuses (one line) before the member that would exceed it."""

    def __init__(self, path: str, max_bytes: float) -> None:
        self.path, self.max_bytes, self.used = path, max_bytes, 0

    def take(self, name: str, size: int) -> None:
        self.used += size
        if self.used > self.max_bytes:
            raise ImageDataError(
                f"{self.path}: image files exceed the memory budget of data.cache_max_gb={self.max_bytes / 1e9:g} GB "
                f"at {name} ({size} bytes); extract the archive and point data.root at the folder (it is then "
                "streamed), or raise data.cache_max_gb"
            )


@dataclass
class Source:
    """The files of a folder or archive: ``sizes`` maps relative path -> (size, mtime_ns)."""

    path: str
    kind: str  # "folder", "tar" or "zip"
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, why it was not read)
    held_bytes: int = 0  # bytes this source holds (a tar) or will hold when read (a zip)
    files: dict[str, FileEntry] = field(default_factory=dict, repr=False)  # a folder's files
    _blobs: dict[str, bytes] = field(default_factory=dict, repr=False)  # a tar's members
    _members: dict[str, zipfile.ZipInfo] = field(default_factory=dict, repr=False)  # a zip's members
    _max_bytes: float = float("inf")

    def describe(self, rel: str) -> str:
        """How a file is named in messages: a path, or ``archive:member``."""
        if self.kind == "folder":
            return os.path.join(self.path, *rel.split("/"))
        return f"{self.path}:{rel}"

    def read(self, rel: str) -> bytes:
        return self.read_many([rel])[0]

    def read_many(self, rels: list[str]) -> list[bytes]:
        """Bytes of ``rels`` (a zip is opened once; a tar was read in one pass by :func:`open_source`)."""
        if self.kind == "tar":
            return [self._blobs[r] for r in rels]
        if self.kind == "folder":
            budget = _Budget(self.path, self._max_bytes)
            out = []
            for r in rels:
                budget.take(self.describe(r), self.files[r].size)
                try:
                    out.append(read_regular(self.files[r].path, self.files[r].size))
                except OSError as e:
                    raise ImageDataError(f"cannot read {self.describe(r)}: {e}; fix or remove it") from e
            return out
        out, rel = [], ""
        try:
            with zipfile.ZipFile(self.path) as z:
                for rel in rels:
                    out.append(z.read(self._members[rel]))
        except _READ_ERRORS as e:
            raise ImageDataError(f"{self.describe(rel)}: corrupt zip member ({type(e).__name__}: {_why(e)}); "
                                 "download or rebuild the archive") from e
        return out

    def items(self, rels: list[str]) -> list[bytes | str]:
        """What the decoder reads: a folder's file paths (opened one at a time), an archive's bytes."""
        if self.kind == "folder":
            return [self.files[r].path for r in rels]
        return list(self.read_many(rels))

    def read_text(self, rel: str) -> str:
        return self.read(rel).decode("utf-8", "replace")


def _check_member(archive: str, name: str) -> str:
    rel = name.replace("\\", "/")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if rel.startswith("/") or ".." in parts or (parts and ":" in parts[0]):
        raise ImageDataError(
            f"{archive}: refusing member {name!r}: its path leaves the archive; the archive is unsafe, "
            "rebuild it with relative paths"
        )
    return "/".join(parts)


def _hidden(rel: str) -> bool:
    """A name starting with a dot anywhere in the path (``.git/``, ``._x.jpg``): left out, as the folder walk does."""
    return any(part.startswith(".") for part in rel.split("/"))


def _wanted(rel: str) -> bool:
    base = posixpath.basename(rel)
    return not _hidden(rel) and (base.lower().endswith(IMG_EXTENSIONS) or base in _TEXT_FILES)


def open_source(path: str, max_bytes: float = float("inf")) -> Source:
    """Scan a folder or archive, holding at most ``max_bytes`` (see the module docstring)."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        src = _open_folder(path, max_bytes)
    elif not os.path.exists(path):
        raise DataNotFoundError(f"data root {path} does not exist; give a folder or a .tar/.tar.gz/.zip of one")
    elif not os.path.isfile(path):
        raise ImageDataError(f"data root {path} is not a regular file or folder (a FIFO, device or socket); "
                             "give a folder or a .tar/.tar.gz/.zip of one")
    elif path.lower().endswith(".zip"):
        src = _open_zip(path, max_bytes)
    elif path.lower().endswith((".tar", ".tar.gz", ".tgz")):
        src = _open_tar(path, max_bytes)
    else:
        raise ImageDataError(f"data root {path} is a file but not a .tar, .tar.gz, .tgz or .zip archive")
    if src.skipped:
        warnings.warn(skipped_note(path, src.skipped), stacklevel=2)
    return src


def _open_folder(path: str, max_bytes: float) -> Source:
    scan = scan_folder(path, _wanted)
    src = Source(path, "folder", dirs=scan.dirs, skipped=scan.skipped, files=scan.files, _max_bytes=max_bytes)
    src.sizes = {rel: (f.size, f.mtime_ns) for rel, f in scan.files.items()}
    return src


def _zip_kind(info: zipfile.ZipInfo) -> str:
    """'' for a file, else why a member is not read (links and devices, from its Unix mode)."""
    kind = stat.S_IFMT(info.external_attr >> 16)  # 0: no type recorded (DOS tools, ZipFile.open("w")): a file
    if info.create_system != 3 or kind in (0, stat.S_IFREG, stat.S_IFDIR):
        return "encrypted (kdarena reads unencrypted archives)" if info.flag_bits & 0x1 else ""
    return "a link" if kind == stat.S_IFLNK else "not a regular file (a FIFO, device or socket)"


def _open_zip(path: str, max_bytes: float) -> Source:
    src = Source(path, "zip")
    budget = _Budget(path, max_bytes)
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                rel = _check_member(path, info.filename)
                if not rel or rel.startswith("__MACOSX/") or _hidden(rel):
                    continue
                if info.is_dir():
                    src.dirs.add(rel)
                    continue
                if not _wanted(rel):
                    continue
                why = _zip_kind(info)
                if why:
                    src.skipped.append((rel, why))
                    continue
                budget.take(f"member {info.filename}", info.file_size)
                src.sizes[rel] = (info.file_size, 0)
                src._members[rel] = info
    except ImageDataError:
        raise
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as e:
        raise ImageDataError(f"{path}: corrupt or truncated zip archive ({_why(e)}); download it again") from e
    src.held_bytes = budget.used
    if src._members:  # zipfile holds a member twice while it reads it (measured): the largest one counts again
        largest = max(src._members.values(), key=lambda i: i.file_size)
        budget.take(f"member {largest.filename} (read, zipfile holds it twice)", largest.file_size)
    return src


def _open_tar(path: str, max_bytes: float) -> Source:
    src = Source(path, "tar")
    budget = _Budget(path, max_bytes)
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                rel = _check_member(path, m.name)
                if not rel or _hidden(rel):
                    continue
                if m.isdir():
                    src.dirs.add(rel)
                    continue
                if not _wanted(rel):
                    continue
                if not m.isfile():  # links and devices are never read
                    src.skipped.append((rel, "a link" if m.issym() or m.islnk() else "not a regular file"))
                    continue
                budget.take(f"member {m.name}", m.size)
                f = tar.extractfile(m)
                src._blobs[rel] = f.read() if f is not None else b""
                src.sizes[rel] = (m.size, 0)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise ImageDataError(f"{path}: corrupt or truncated tar archive ({_why(e)}); download it again") from e
    src.held_bytes = budget.used
    return src
