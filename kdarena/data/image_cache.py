"""The decoded-image cache: plain ``.npy`` arrays plus a JSON manifest, never pickles.

Layout: ``cache_dir()/images/KEY/{manifest.json, train_x.npy, train_y.npy, test_x.npy, test_y.npy}``.
``KEY`` (:func:`cache_path`) hashes everything the arrays depend on: the source's fingerprint
(:func:`source_fingerprint`), the image size, the channels, ``data.skip_bad_images`` (a strict run
must never get the arrays a skipping run filtered), Pillow's version (its decoders change pixels)
and :data:`FORMAT` (bumped when decoding changes).

A folder's fingerprint is, by default, every file's relative path, size, mtime, ctime and inode:
a file replaced with its old size and mtime restored (``cp -p``, rsync) still has a new ctime (no
tool can set it) or inode.  ``content`` hashes every file's bytes instead (a full read per run).

Each array file is written to a temporary name and ``os.replace``-d into place; the manifest goes
last and records every file's shape, dtype, size and sha256.  :func:`load` validates the manifest
against :class:`Manifest` (a pydantic schema) and the arrays against it, so a truncated, corrupt,
half-written or edited cache is rebuilt (with a warning naming it), never trusted and never a
traceback.  Arrays are read with ``allow_pickle=False``: a tampered cache cannot run code.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .datasets import cache_dir
from .errors import ImageDataError
from .sources import Source
from .walk import sha256_regular

FORMAT = 2
ARRAYS = ("train_x", "train_y", "test_x", "test_y")
FINGERPRINTS = ("stat", "content")


class ArrayEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    shape: list[int]
    dtype: str
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern="^[0-9a-f]{64}$")


class Manifest(BaseModel):
    """What ``manifest.json`` must hold; anything else is a damaged cache."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    format: Literal[2]
    source: str
    fingerprint: str
    skip_bad: bool
    classes: list[str] = Field(min_length=1)
    class_names: list[str]
    image_size: int = Field(ge=1)
    channels: Literal[1, 3]
    mean: list[float]
    std: list[float]
    decode_seconds: float = Field(ge=0)
    test_split: str
    skipped: list[str]
    arrays: dict[str, ArrayEntry]

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        if len(self.class_names) != len(self.classes) or not len(self.mean) == len(self.std) == self.channels:
            raise ValueError("class_names, mean or std do not match classes / channels")
        if sorted(self.arrays) != sorted(ARRAYS):
            raise ValueError(f"arrays must be {list(ARRAYS)}")
        for split in ("train", "test"):
            x, y = self.arrays[f"{split}_x"], self.arrays[f"{split}_y"]
            if x.dtype != "uint8" or x.shape[1:] != [self.channels, self.image_size, self.image_size] or y.shape != x.shape[:1]:
                raise ValueError(f"{split} arrays have the wrong shape for {self.channels}x{self.image_size}x{self.image_size}")
        return self


def source_fingerprint(path: str, src: Source | None = None, mode: str = "stat") -> str:
    """sha256 of an archive file, or of a folder's files (``mode``: see the module docstring).

    ``src`` is the folder already scanned by :func:`~kdarena.data.sources.open_source` (else it is scanned).
    """
    if os.path.isfile(path):
        try:
            return "file:" + sha256_regular(path)
        except OSError as e:
            raise ImageDataError(f"cannot read {path}: {e.strerror or e}; check its permissions") from e
    if mode not in FINGERPRINTS:
        raise ValueError(f"fingerprint mode {mode!r} is not one of {FINGERPRINTS}")
    if src is None:
        from .sources import open_source

        src = open_source(path)
    h = hashlib.sha256()
    for rel in sorted(src.files):
        f = src.files[rel]
        what = sha256_regular(f.path) if mode == "content" else f"{f.size}\0{f.mtime_ns}\0{f.ctime_ns}\0{f.inode}"
        h.update(f"{rel}\0{what}\n".encode())
    for d in sorted(src.dirs):  # an added (empty) class folder changes the data set too
        h.update(f"{d}/\n".encode())
    return f"folder-{mode}:" + h.hexdigest()


def images_dir() -> str:
    return os.path.join(cache_dir(), "images")


def cache_path(fingerprint: str, size: int, channels: int, skip_bad: bool = False) -> str:
    from PIL import __version__ as pillow

    key = hashlib.sha256(f"{FORMAT}|{fingerprint}|{size}|{channels}|{bool(skip_bad)}|{pillow}".encode()).hexdigest()[:32]
    return os.path.join(images_dir(), key)


def _size_note(fingerprint: str) -> str:
    key = hashlib.sha256(f"{FORMAT}|{fingerprint}".encode()).hexdigest()[:32]
    return os.path.join(images_dir(), f"{key}.size.json")


def remembered_size(fingerprint: str) -> int | None:
    """The default image size found when this source was first decoded (saves reading every header)."""
    try:
        with open(_size_note(fingerprint), encoding="utf-8") as f:
            size = json.load(f)["image_size"]
        return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remember_size(fingerprint: str, size: int, source: str) -> None:
    text = json.dumps({"image_size": int(size), "source": source, "fingerprint": fingerprint}).encode()
    _atomic_write(_size_note(fingerprint), lambda f: f.write(text))


def read_manifest(path: str) -> Manifest:
    """The validated manifest of the cache folder ``path``; ``OSError`` / ``ValueError`` say why not."""
    with open(os.path.join(path, "manifest.json"), "rb") as f:
        raw = f.read(1 << 24)  # a manifest is a few kB; more is not ours
    try:
        return Manifest.model_validate_json(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "the file"
        raise ValueError(f"manifest.json: {where}: {first['msg']}") from None


def _check_arrays(path: str, manifest: Manifest) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for name in ARRAYS:
        meta = manifest.arrays[name]
        file = os.path.join(path, f"{name}.npy")
        if os.path.getsize(file) != meta.bytes or sha256_regular(file) != meta.sha256:
            raise ValueError(f"{name}.npy does not match its checksum")
        arr = np.load(file, allow_pickle=False)
        if list(arr.shape) != meta.shape or str(arr.dtype) != meta.dtype:
            raise ValueError(f"{name}.npy has shape {list(arr.shape)}, not {meta.shape}")
        arrays[name] = arr
    for split in ("train", "test"):
        y = arrays[f"{split}_y"]
        if y.size and (y.min() < 0 or y.max() >= len(manifest.classes)):
            raise ValueError(f"{split}_y.npy holds labels outside the {len(manifest.classes)} classes")
    return arrays


def load(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The cached arrays and manifest in ``path``, or None when absent or damaged (then rebuilt)."""
    if not os.path.exists(os.path.join(path, "manifest.json")):
        return None
    try:
        manifest = read_manifest(path)
        arrays = _check_arrays(path, manifest)
    except (OSError, ValueError, EOFError) as e:
        warnings.warn(f"decoded-image cache {path} is damaged ({e}); decoding the images again", stacklevel=3)
        return None
    return arrays, manifest.model_dump()


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
            "bytes": os.path.getsize(file), "sha256": sha256_regular(file),
        }
    text = Manifest.model_validate(manifest).model_dump_json(indent=1).encode()  # never write what load refuses
    _atomic_write(os.path.join(path, "manifest.json"), lambda f: f.write(text))
