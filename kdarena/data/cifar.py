"""CIFAR-10 / CIFAR-100 from the standard "python version" pickle batches.

Layouts (as unpacked from ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``)::

    cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
        dict: b'data' uint8 (N, 3072), b'labels' list[int];  meta: b'label_names'
    cifar-100-python/{train, test, meta}
        dict: b'data' uint8 (N, 3072), b'fine_labels' list[int]; meta: b'fine_label_names'

Trust: the batches are pickles, and unpickling an untrusted file can run arbitrary code.  We
therefore unpickle with a restricted :class:`pickle.Unpickler` that only resolves the handful of
numpy globals a plain ``ndarray`` needs and refuses everything else, and we accept only a dict with
the expected keys and types.  A corrupt or truncated file is a :class:`~kdarena.errors.DataError` naming it.
"""
from __future__ import annotations

import importlib
import os
import pickle
import struct
import warnings
from typing import Any

import numpy as np
import torch

from ..errors import DataError, DataFilesNotFoundError
from .datasets import ArrayDataset, cache_dir, search_dirs
from .sources import ARCHIVE_SUFFIXES

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

_SPECS: dict[str, dict[str, Any]] = {
    "cifar10": dict(
        top="cifar-10-batches-py",
        train=[f"data_batch_{i}" for i in range(1, 6)],
        test=["test_batch"],
        meta="batches.meta",
        label_key="labels",
        names_key="label_names",
        num_classes=10,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
    ),
    "cifar100": dict(
        top="cifar-100-python",
        train=["train"],
        test=["test"],
        meta="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
        num_classes=100,
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
    ),
}


def _numpy_attr(modules: tuple[str, ...], name: str) -> Any:
    for m in modules:
        try:
            return getattr(importlib.import_module(m), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"numpy has no {name}")


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the numpy globals needed to rebuild a plain ndarray (see module docstring)."""

    _MULTIARRAY = ("numpy._core.multiarray", "numpy.core.multiarray")
    _NUMERIC = ("numpy._core.numeric", "numpy.core.numeric")

    def find_class(self, module: str, name: str) -> Any:
        if module in self._MULTIARRAY and name in ("_reconstruct", "scalar"):
            return _numpy_attr(self._MULTIARRAY, name)
        if module in self._NUMERIC and name == "_frombuffer":
            return _numpy_attr(self._NUMERIC, name)
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name} (not a CIFAR batch)")


def _unpickle(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, struct.error, UnicodeDecodeError, OverflowError, MemoryError) as e:
        raise DataError(f"{path}: corrupt or truncated CIFAR pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict in the CIFAR pickle, got {type(obj).__name__}")
    out: dict[str, Any] = {}
    for k, v in obj.items():
        if isinstance(k, bytes):
            k = k.decode("latin1")
        if not isinstance(k, str):
            raise DataError(f"{path}: unexpected key {k!r} in the CIFAR pickle")
        out[k] = v
    return out


def _read_batch(path: str, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    if "data" not in d or label_key not in d:
        raise DataError(f"{path}: CIFAR batch lacks key 'data' or {label_key!r} (keys: {sorted(d)})")
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {desc}")
    labels_raw = d[label_key]
    if not isinstance(labels_raw, (list, np.ndarray)):
        raise DataError(f"{path}: {label_key!r} must be a list of ints, got {type(labels_raw).__name__}")
    try:
        labels = np.asarray(labels_raw, dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: {label_key!r} must be a list of ints ({e})") from e
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise DataError(f"{path}: {data.shape[0]} images but labels of shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{path}: labels must lie in [0, {num_classes}), found [{labels.min()}, {labels.max()}]"
        )
    return data, labels


def _class_names(d: str, spec: dict[str, Any]) -> list[str]:
    path = os.path.join(d, spec["meta"])
    n = spec["num_classes"]
    if not os.path.isfile(path):
        warnings.warn(f"{path} missing: using class indices as class names", stacklevel=3)
        return [str(i) for i in range(n)]
    meta = _unpickle(path)
    names = meta.get(spec["names_key"])
    if not isinstance(names, list) or len(names) != n:
        raise DataError(f"{path}: expected {spec['names_key']!r} with {n} class names")
    return [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in names]


def find_dir(name: str, root: str | None = None) -> tuple[str | None, list[str]]:
    spec = _SPECS[name]
    searched = search_dirs(root, (spec["top"], os.path.join(name, spec["top"])))
    for d in searched:
        if all(os.path.isfile(os.path.join(d, f)) for f in spec["train"] + spec["test"]):
            return d, searched
    return None, searched


def _load(name: str, root: str | None, download: bool) -> tuple[ArrayDataset, ArrayDataset]:
    spec = _SPECS[name]
    d, searched = find_dir(name, root)
    if d is None and download:
        from .download import download_and_extract

        base = os.path.abspath(os.path.expanduser(root)) if root else cache_dir()
        d = download_and_extract(spec["url"], base, spec["top"], md5=spec["md5"])
    if d is None:
        lines = "\n  ".join(searched)
        raise DataFilesNotFoundError(
            f"{name} not found: no directory holds {', '.join(spec['train'] + spec['test'])}.\n"
            f"Searched:\n  {lines}\n"
            f"Fixes: unpack {spec['url'].rsplit('/', 1)[1]} into one of these (or point root / "
            "KDARENA_DATA at it), or allow downloading (load_arrays(..., download=True) / config "
            "`data.download=true`)."
        )
    classes = _class_names(d, spec)

    def build(files: list[str]) -> ArrayDataset:
        parts = [_read_batch(os.path.join(d, f), spec["label_key"], spec["num_classes"]) for f in files]
        data = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        data = data.reshape(-1, 3, 32, 32)
        if not data.flags.writeable or not data.flags.c_contiguous:
            data = np.array(data, order="C")
        return ArrayDataset(
            images=torch.from_numpy(data),
            labels=torch.from_numpy(np.ascontiguousarray(labels)),
            num_classes=spec["num_classes"],
            mean=spec["mean"],
            std=spec["std"],
            classes=list(classes),
            name=name,
        )

    return build(spec["train"]), build(spec["test"])


def stored_as_image_files(name: str, root: str | None) -> bool:
    """Whether ``data.root`` holds CIFAR as image files (an archive, or a folder with ``train/`` and ``test/`` class
    folders of JPEG/PNG files, as ``cifar10-jpeg.tar.gz`` or a CIFAR-100 re-split) rather than the pickle batches.
    Those go through :func:`kdarena.data.images.load_image_set` and get :func:`with_cifar_statistics`."""
    if not root:
        return False
    path = os.path.expanduser(root)
    if path.lower().endswith(ARCHIVE_SUFFIXES):  # the official pickles come extracted
        return True
    if not os.path.isdir(path) or find_dir(name, root)[0] is not None:
        return False
    tops = [path] + [os.path.join(path, e) for e in os.listdir(path) if os.path.isdir(os.path.join(path, e))]
    return any(os.path.isdir(os.path.join(top, "train")) for top in tops)


def with_cifar_statistics(name: str, sets: tuple[ArrayDataset, ArrayDataset], root: str) -> tuple[ArrayDataset, ArrayDataset]:
    """CIFAR read from image files, normalised with the data set's published statistics (as the pickles are), so a
    run on the JPEGs and one on the pickles preprocess alike; the class count must be the data set's."""
    spec = _SPECS[name]
    found = sets[0].num_classes
    if found != spec["num_classes"]:
        raise DataError(f"data.name={name} expects {spec['num_classes']} classes but {root} has {found}; "
                        "use data.name=imagefolder for another set of image folders")
    for ds in sets:
        ds.mean, ds.std = spec["mean"], spec["std"]
    return sets


def load_cifar10(root: str | None = None, download: bool = False) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, test) CIFAR-10: 50,000 / 10,000 images of 3x32x32."""
    return _load("cifar10", root, download)


def load_cifar100(root: str | None = None, download: bool = False) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, test) CIFAR-100 (fine labels): 50,000 / 10,000 images of 3x32x32."""
    return _load("cifar100", root, download)
