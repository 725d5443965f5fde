"""The decoded-image cache: plain ``.npy`` arrays plus a JSON manifest, never pickles.

Layout: ``cache_dir()/images/KEY/{manifest.json, train_x.npy, train_y.npy, test_x.npy, test_y.npy}``.
``KEY`` hashes what the arrays depend on: the archive's content (sha256 of the file) or a folder's
file list with sizes and mtimes, the image size, the channels and :data:`FORMAT` (bumped when
decoding changes).  Each array file is written to a temporary name and ``os.replace``-d into
place; the manifest goes last and records every file's shape, dtype, size and sha256, so a
truncated, corrupt or half-written cache fails :func:`load` (and is rebuilt), never trusted.
Arrays are read with ``allow_pickle=False``: a tampered cache cannot run code.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

import numpy as np

from .datasets import cache_dir
from .download import file_digest
from .sources import Source

FORMAT = 1
ARRAYS = ("train_x", "train_y", "test_x", "test_y")


def sha256_file(path: str) -> str:
    return file_digest(path, "sha256")


def source_fingerprint(path: str) -> str:
    """sha256 of an archive file, or of a folder's (relative path, size, mtime) list."""
    if os.path.isfile(path):
        return "file:" + sha256_file(path)
    from .sources import open_source

    src: Source = open_source(path)
    h = hashlib.sha256()
    for rel in sorted(src.sizes):
        size, mtime = src.sizes[rel]
        h.update(f"{rel}\0{size}\0{mtime}\n".encode())
    for d in sorted(src.dirs):  # an added (empty) class folder changes the data set too
        h.update(f"{d}/\n".encode())
    return "folder:" + h.hexdigest()


def cache_path(fingerprint: str, size: int, channels: int) -> str:
    key = hashlib.sha256(f"{FORMAT}|{fingerprint}|{size}|{channels}".encode()).hexdigest()[:32]
    return os.path.join(cache_dir(), "images", key)


def _size_note(fingerprint: str) -> str:
    key = hashlib.sha256(f"{FORMAT}|{fingerprint}".encode()).hexdigest()[:32]
    return os.path.join(cache_dir(), "images", f"{key}.size.json")


def remembered_size(fingerprint: str) -> int | None:
    """The default image size found when this source was first decoded (saves re-reading it)."""
    try:
        with open(_size_note(fingerprint), encoding="utf-8") as f:
            size = json.load(f)["image_size"]
        return size if isinstance(size, int) and size > 0 else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remember_size(fingerprint: str, size: int) -> None:
    text = json.dumps({"image_size": int(size)}).encode()
    _atomic_write(_size_note(fingerprint), lambda f: f.write(text))


def load(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The cached arrays and manifest in ``path``, or None when absent, incomplete or corrupt."""
    mpath = os.path.join(path, "manifest.json")
    try:
        with open(mpath, encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest.get("format") != FORMAT:
            return None
        arrays: dict[str, np.ndarray] = {}
        for name in ARRAYS:
            meta = manifest["arrays"][name]
            file = os.path.join(path, f"{name}.npy")
            if os.path.getsize(file) != meta["bytes"] or sha256_file(file) != meta["sha256"]:
                return None
            arr = np.load(file, allow_pickle=False)
            if list(arr.shape) != meta["shape"] or str(arr.dtype) != meta["dtype"]:
                return None
            arrays[name] = arr
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        return None  # missing, truncated or not ours: the caller rebuilds
    return arrays, manifest


def _atomic_write(path: str, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(path: str, arrays: dict[str, np.ndarray], manifest: dict[str, Any]) -> None:
    """Write ``arrays`` and ``manifest`` atomically (arrays first, the manifest that vouches for them last)."""
    os.makedirs(path, exist_ok=True)
    try:
        os.unlink(os.path.join(path, "manifest.json"))  # stale while the arrays are replaced
    except FileNotFoundError:
        pass
    manifest = dict(manifest, format=FORMAT, arrays={})
    for name in ARRAYS:
        arr = np.ascontiguousarray(arrays[name])
        file = os.path.join(path, f"{name}.npy")
        _atomic_write(file, lambda f, a=arr: np.save(f, a, allow_pickle=False))
        manifest["arrays"][name] = {
            "shape": list(arr.shape), "dtype": str(arr.dtype),
            "bytes": os.path.getsize(file), "sha256": sha256_file(file),
        }
    text = json.dumps(manifest, indent=1, sort_keys=True).encode()
    _atomic_write(os.path.join(path, "manifest.json"), lambda f: f.write(text))
