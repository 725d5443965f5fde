"""Fashion-MNIST from its IDX files (``train-images-idx3-ubyte.gz`` and friends).

The files may be gzip-compressed (``.gz``) or raw.  Parsing is strict: the magic number (uint8
data, expected number of dimensions), the dimensions and the exact payload size must all agree,
and any problem -- including gzip/CRC errors from a truncated download -- is a
:class:`~kdarena.errors.DataError` naming the file.
"""
from __future__ import annotations

import gzip
import os
import zlib

import numpy as np
import torch

from ..errors import DataError, DataFilesNotFoundError
from .datasets import ArrayDataset, cache_dir, search_dirs

NAME = "fashion_mnist"
SUBDIRS = ("fashion-mnist", "fashion_mnist", os.path.join("FashionMNIST", "raw"))
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# Official files and their MD5 sums (identical to the ones torchvision checks).
URLS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
MEAN = (0.2860,)
STD = (0.3530,)

_IDX_UINT8 = 0x08


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt or truncated gzip data ({e})") from e
    if path.endswith(".gz"):
        raise DataError(f"{path}: not a gzip file (bad gzip magic number)")
    return raw


def read_idx(path: str, ndim: int) -> np.ndarray:
    """Parse an IDX file of uint8 values with ``ndim`` dimensions, strictly."""
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"{path}: truncated IDX file ({len(data)} bytes, no complete header)")
    if data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: bad IDX magic number {data[:4].hex()} (must start with 0000)")
    if data[2] != _IDX_UINT8:
        raise DataError(f"{path}: bad IDX magic number {data[:4].hex()}: data type 0x{data[2]:02x}, expected 0x08 (uint8)")
    if data[3] != ndim:
        raise DataError(f"{path}: bad IDX magic number {data[:4].hex()}: {data[3]} dimensions, expected {ndim}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header ({len(data)} of {header} bytes)")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(dims, dtype=np.int64))
    if len(data) - header != size:
        what = "truncated" if len(data) - header < size else "trailing bytes after the data"
        raise DataError(
            f"{path}: {what}: dimensions {dims} need {size} data bytes, file has {len(data) - header}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def _find(path_dir: str, stem: str) -> str | None:
    for name in (stem + ".gz", stem):
        p = os.path.join(path_dir, name)
        if os.path.isfile(p):
            return p
    return None


def find_dir(root: str | None = None) -> tuple[str | None, list[str]]:
    """First searched directory holding all four files, and the list of directories searched."""
    searched = search_dirs(root, SUBDIRS)
    for d in searched:
        if all(_find(d, stem) for stem in FILES.values()):
            return d, searched
    return None, searched


def download_fashion_mnist(dest: str) -> str:
    """Fetch the four official ``.gz`` files into ``dest`` (each written atomically)."""
    from .download import download_file

    for stem in FILES.values():
        name = stem + ".gz"
        download_file([u + name for u in URLS], os.path.join(dest, name), md5=MD5[name])
    return dest


def _load_split(d: str, split: str) -> ArrayDataset:
    ipath = _find(d, FILES[f"{split}_images"])
    lpath = _find(d, FILES[f"{split}_labels"])
    assert ipath is not None and lpath is not None
    images = read_idx(ipath, 3)
    labels = read_idx(lpath, 1)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{ipath} has {images.shape[0]} images but {lpath} has {labels.shape[0]} labels")
    if labels.size and int(labels.max()) >= len(CLASSES):
        raise DataError(f"{lpath}: label {int(labels.max())} out of range [0, {len(CLASSES)})")
    return ArrayDataset(
        images=torch.from_numpy(images).unsqueeze(1).contiguous(),
        labels=torch.from_numpy(labels.astype(np.int64)),
        num_classes=len(CLASSES),
        mean=MEAN,
        std=STD,
        classes=list(CLASSES),
        name=NAME,
    )


def load_fashion_mnist(root: str | None = None, download: bool = False) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, test) Fashion-MNIST: 60,000 / 10,000 images of 1x28x28."""
    d, searched = find_dir(root)
    if d is None and download:
        target = os.path.join(os.path.abspath(os.path.expanduser(root)) if root else cache_dir(), "fashion-mnist")
        download_fashion_mnist(target)
        d = target
    if d is None:
        lines = "\n  ".join(searched)
        raise DataFilesNotFoundError(
            "Fashion-MNIST not found: no directory holds all of "
            f"{', '.join(s + '[.gz]' for s in FILES.values())}.\nSearched:\n  {lines}\n"
            "Fixes: `apt-get install dataset-fashion-mnist` (installs /usr/share/datasets/fashion-mnist), "
            "set KDARENA_DATA to a directory holding the files, pass root=..., "
            "or allow downloading (load_arrays(..., download=True) / config `data.download=true`)."
        )
    return _load_split(d, "train"), _load_split(d, "test")
