"""Image data sets as folders or archives (``.tar``, ``.tar.gz``/``.tgz``, ``.zip``) of image files.

A source is scanned into relative POSIX paths (``train/cat/0001.jpg``); :func:`parse_layout` turns
them into classes and labelled file lists.  Layouts understood (a single top-level folder inside
an archive or folder, like ``cifar10-jpeg/``, is stepped into automatically):

* ``train/CLASS/**/*.jpg`` plus ``val/CLASS/...`` or ``test/CLASS/...`` (``val`` wins when both
  exist; it is the test set, the validation split is held out of ``train``);
* Tiny-ImageNet as downloaded: ``train/WNID/images/*.JPEG``, ``val/images/*.JPEG`` labelled by
  ``val/val_annotations.txt``; its unlabelled ``test/`` is ignored because ``val`` exists;
* ``wnids.txt`` at the top fixes the class order (else classes are sorted names); ``words.txt``
  gives readable class names (only for display).

Trust: archives are read member by member, never extracted.  A member whose path is absolute or
climbs out with ``..`` is refused (it would be mislabelled at best); links and devices are
ignored; files without an image extension (``*_boxes.txt``, ``.DS_Store``) are skipped.
"""
from __future__ import annotations

import os
import posixpath
import tarfile
import zipfile
from dataclasses import dataclass, field

from .imagefolder import IMG_EXTENSIONS

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
_TEXT_FILES = ("wnids.txt", "words.txt", "val_annotations.txt")


class ImageDataError(ValueError):
    """A problem with an image folder or archive; the message is one line naming it and the fix."""


def is_archive(path: str) -> bool:
    return os.path.isfile(path) and path.lower().endswith(ARCHIVE_SUFFIXES)


@dataclass
class Source:
    """The files of a folder or archive: ``sizes`` maps relative path -> (size, mtime_ns)."""

    path: str
    kind: str  # "folder", "tar" or "zip"
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)
    _blobs: dict[str, bytes] = field(default_factory=dict, repr=False)

    def describe(self, rel: str) -> str:
        """How a file is named in messages: a path, or ``archive:member``."""
        if self.kind == "folder":
            return os.path.join(self.path, *rel.split("/"))
        return f"{self.path}:{rel}"

    def read(self, rel: str) -> bytes:
        if self.kind == "folder":
            with open(self.describe(rel), "rb") as f:
                return f.read()
        if self.kind == "tar":
            return self._blobs[rel]
        with zipfile.ZipFile(self.path) as z:
            return z.read(rel)

    def read_many(self, rels: list[str]) -> list[bytes]:
        """Bytes of ``rels`` (a zip is opened once; a tar was read in one pass by :func:`open_source`)."""
        if self.kind == "zip":
            with zipfile.ZipFile(self.path) as z:
                return [z.read(r) for r in rels]
        return [self.read(r) for r in rels]

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


def _wanted(rel: str) -> bool:
    base = posixpath.basename(rel)
    return not base.startswith(".") and (base.lower().endswith(IMG_EXTENSIONS) or base in _TEXT_FILES)


def open_source(path: str, max_bytes: float = float("inf")) -> Source:
    """Scan a folder or archive.  A tar is read in one sequential pass (gzip cannot seek), keeping
    the bytes of image and index files; more than ``max_bytes`` of them is an error."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        src = Source(path, "folder")
        for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            reldir = os.path.relpath(dirpath, path).replace(os.sep, "/")
            reldir = "" if reldir == "." else reldir
            for d in dirnames:
                src.dirs.add(posixpath.join(reldir, d))
            for f in filenames:
                rel = posixpath.join(reldir, f)
                if _wanted(rel):
                    st = os.stat(os.path.join(dirpath, f))
                    src.sizes[rel] = (st.st_size, st.st_mtime_ns)
        return src
    if not os.path.isfile(path):
        raise ImageDataError(f"data root {path} does not exist; give a folder or a .tar/.tar.gz/.zip of one")
    if path.lower().endswith(".zip"):
        return _open_zip(path)
    if path.lower().endswith((".tar", ".tar.gz", ".tgz")):
        return _open_tar(path, max_bytes)
    raise ImageDataError(f"data root {path} is a file but not a .tar, .tar.gz, .tgz or .zip archive")


def _open_zip(path: str) -> Source:
    src = Source(path, "zip")
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                rel = _check_member(path, info.filename)
                if not rel or rel.startswith("__MACOSX/"):
                    continue
                if info.is_dir():
                    src.dirs.add(rel)
                elif _wanted(rel):
                    src.sizes[rel] = (info.file_size, 0)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ImageDataError(f"{path}: corrupt or truncated zip archive ({e}); download it again") from e
    return src


def _open_tar(path: str, max_bytes: float) -> Source:
    src = Source(path, "tar")
    total = 0
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                rel = _check_member(path, m.name)
                if not rel:
                    continue
                if m.isdir():
                    src.dirs.add(rel)
                    continue
                if not m.isfile() or not _wanted(rel):
                    continue  # links, devices and non-image files are never read
                total += m.size
                if total > max_bytes:
                    raise ImageDataError(
                        f"{path}: image files exceed the memory budget ({max_bytes / 1e9:.1f} GB); extract the "
                        "archive and point data.root at the folder (it is then streamed), or raise data.cache_max_gb"
                    )
                f = tar.extractfile(m)
                src._blobs[rel] = f.read() if f is not None else b""
                src.sizes[rel] = (m.size, 0)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ImageDataError(f"{path}: corrupt or truncated tar archive ({e}); download it again") from e
    return src


@dataclass
class Layout:
    """Classes and labelled files of a source, ``prefix`` (the stepped-into top folder) removed."""

    classes: list[str]
    class_names: list[str]
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]
    test_split: str
    prefix: str
    skipped: list[str]


def _top_prefix(src: Source) -> str:
    """Folders to step into: while everything sits in one folder that is not a split folder."""
    names = list(src.sizes) + list(src.dirs)
    prefix = ""
    while True:
        rest = [n[len(prefix):] for n in names if n.startswith(prefix) and n[len(prefix):]]
        firsts = {r.split("/", 1)[0] for r in rest}
        if len(firsts) != 1:
            return prefix
        only = firsts.pop()
        if only in ("train", "val", "test") or not any(r.startswith(only + "/") for r in rest):
            return prefix
        prefix += only + "/"


def _is_image(rel: str) -> bool:
    return rel.lower().endswith(IMG_EXTENSIONS)


def parse_layout(src: Source) -> Layout:
    """Classes and (file, label) lists of the train and test splits (see the module docstring)."""
    prefix = _top_prefix(src)
    files = {r[len(prefix):]: r for r in src.sizes if r.startswith(prefix)}
    dirs = {d[len(prefix):] for d in src.dirs if d.startswith(prefix)}
    has = lambda split: any(f.startswith(split + "/") for f in files) or split in dirs  # noqa: E731
    test_split = next((s for s in ("val", "test") if has(s)), None)
    if not has("train") or test_split is None:
        found = sorted({f.split("/", 1)[0] for f in files} | {d.split("/", 1)[0] for d in dirs})[:8]
        raise ImageDataError(
            f"{src.path}: expected train/ and val/ (or test/) folders of class folders{' under ' + prefix if prefix else ''}, "
            f"found {found}; arrange the images as train/CLASS/*.jpg and val/CLASS/*.jpg"
        )
    skipped: list[str] = []

    def split_files(split: str) -> dict[str, list[str]]:
        by_class: dict[str, list[str]] = {}
        for d in dirs:  # class folders, also empty ones
            parts = d.split("/")
            if len(parts) == 2 and parts[0] == split:
                by_class.setdefault(parts[1], [])
        ann = f"{split}/val_annotations.txt"
        labels: dict[str, str] = {}
        if ann in files:  # Tiny-ImageNet's val: images/NAME.JPEG with a label table
            for line in src.read_text(files[ann]).splitlines():
                cols = line.split("\t")
                if len(cols) >= 2 and cols[0].strip():
                    labels[cols[0].strip()] = cols[1].strip()
        for f in sorted(files):
            parts = f.split("/")
            if parts[0] != split or not _is_image(f):
                continue
            if labels and len(parts) == 3 and parts[1] == "images":
                if parts[2] not in labels:
                    skipped.append(files[f])
                    continue
                by_class.setdefault(labels[parts[2]], []).append(files[f])
            elif len(parts) >= 3:
                by_class.setdefault(parts[1], []).append(files[f])
            else:
                skipped.append(files[f])  # an image outside any class folder
        if labels:
            by_class.pop("images", None)  # the folder of the annotated images, not a class
        return by_class

    train, test = split_files("train"), split_files(test_split)
    if "wnids.txt" in files:
        classes = [w.strip() for w in src.read_text(files["wnids.txt"]).splitlines() if w.strip()]
        extra = sorted(set(train) - set(classes))
        if extra:
            raise ImageDataError(
                f"{src.path}: train/ has class folders {extra[:5]} that wnids.txt does not list; fix wnids.txt or remove them"
            )
    else:
        classes = sorted(train)
    empty = [c for c in classes if not train.get(c)]
    if empty:
        raise ImageDataError(
            f"{src.path}: class {empty[0]!r} has no training images in train/{empty[0]}/ ({len(empty)} such class(es)); "
            "add images or remove the class"
        )
    unknown = sorted(set(test) - set(classes))
    missing = sorted(c for c in classes if not test.get(c))
    if unknown or missing:
        what = f"has classes {unknown[:5]} that train/ lacks" if unknown else f"lacks classes {missing[:5]} that train/ has"
        raise ImageDataError(
            f"{src.path}: {test_split}/ {what}; train/ and {test_split}/ must hold the same class folders"
        )
    names = list(classes)
    if "words.txt" in files:
        words = {}
        for line in src.read_text(files["words.txt"]).splitlines():
            key, _, value = line.partition("\t")
            words[key.strip()] = value.split(",")[0].strip()
        names = [words.get(c) or c for c in classes]
    index = {c: i for i, c in enumerate(classes)}
    flat = lambda by: [(f, index[c]) for c in classes for f in by.get(c, [])]  # noqa: E731
    return Layout(classes, names, flat(train), flat(test), test_split, prefix, skipped)
