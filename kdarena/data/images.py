"""Folders and archives of image files, decoded once into memory and cached.

:func:`load_image_set` returns (train, test) :class:`ArrayDataset` s for ``data.name=imagefolder``
and ``tiny_imagenet`` when the decoded set fits ``cache_max_gb``; the loaders then work exactly as
for CIFAR (tensor-resident, batch-wise crop/flip).  A folder that does not fit returns None and is
streamed by :class:`~kdarena.data.folder_loader.FolderLoader`; an archive that does not fit is an
error (a gzip stream cannot be read at random).

Cold: scan the source, decide the image size from every image's header (:func:`decide_size`),
decode in ``workers`` processes (progress bar), compute the per-channel mean/std of the training
images, write the cache (:mod:`kdarena.data.image_cache`) and drop the entries of this source's
older contents.  Warm: hash the archive (or walk the folder), verify and load the cached arrays.

Memory: an archive's bytes held in memory plus the decoded arrays stay within ``cache_max_gb``;
the archive's part is refused from the member headers before anything is read
(:mod:`kdarena.data.sources`).
"""
from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from . import image_cache
from .cache_admin import drop_superseded
from .datasets import ArrayDataset, cache_dir, search_dirs
from .decode import DecodeError, decode_all, item_header
from .errors import BadImageError, DataNotFoundError, ImageDataError
from .sources import Source, is_archive, open_source, parse_layout

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
#: Where ``tiny_imagenet`` is looked for (under data.root, $KDARENA_DATA, the cache, system dirs).
TINY_IMAGENET_NAMES = ("tiny-imagenet-200", "tiny-imagenet-200.zip", "tiny-imagenet-32", "tiny-imagenet-32.tar.gz")
#: Images whose shorter side is at most this are kept at their own size when no size is given.
NATIVE_MAX = 64
DEFAULT_SIZE = 224


@dataclass
class ImageSetInfo:
    """What :func:`load_image_set` found and did (printed by ``kdarena data inspect``)."""

    root: str
    kind: str
    image_size: int
    classes: list[str]
    class_names: list[str]
    counts: dict[str, list[int]]  # split -> images per class
    mean: tuple[float, ...]
    std: tuple[float, ...]
    cache: str | None
    from_cache: bool
    seconds: float
    decode_seconds: float
    test_split: str = "val"
    skipped: list[str] = field(default_factory=list)


def resolve_root(root: str | None, name: str, download: bool = False) -> str:
    """The folder or archive to read: ``root`` itself, else found under $KDARENA_DATA / the cache.

    A relative ``root`` that does not exist here is looked up in $KDARENA_DATA and the cache, so a
    config may say ``root: cifar10-jpeg.tar.gz``.  ``tiny_imagenet`` without a root searches its
    usual names and, with ``download``, fetches the official zip into the cache.
    """
    if root:
        full = os.path.abspath(os.path.expanduser(root))
        if os.path.exists(full):
            return full
        if os.path.isabs(os.path.expanduser(root)):
            raise DataNotFoundError(f"data.root={root} does not exist; give a folder or a .tar/.tar.gz/.zip of image folders")
        names: tuple[str, ...] = (root,)
        searched = [d for d in search_dirs(None, names) if d.endswith(root)]
    else:
        env = os.environ.get("KDARENA_DATA")
        if env and (is_archive(env) or os.path.isdir(os.path.join(env, "train"))):
            return os.path.abspath(env)  # $KDARENA_DATA names the data set itself
        if name != "tiny_imagenet":
            raise ImageDataError(
                f"data.name={name} needs data.root (a folder or .tar/.tar.gz/.zip with train/ and val/ or test/), "
                "or $KDARENA_DATA pointing at one"
            )
        names = TINY_IMAGENET_NAMES
        searched = [d for d in search_dirs(None, names) if os.path.basename(d) in names]
    for cand in searched:
        if os.path.isdir(cand) or is_archive(cand):
            return cand
    if name == "tiny_imagenet" and download and not root:
        from .download import download_file

        dest = os.path.join(cache_dir(), "tiny-imagenet-200.zip")
        return download_file(TINY_IMAGENET_URL, dest, md5=TINY_IMAGENET_MD5)
    hint = " or set data.download=true to fetch it" if name == "tiny_imagenet" else ""
    raise ImageDataError(f"{root or name} not found (searched {', '.join(searched[:6])}); pass data.root=PATH{hint}")


def decide_size(src: Source, rels: list[str], items: list) -> int:
    """The image size of the whole set: the median shorter side of every image's header when that
    is at most :data:`NATIVE_MAX` (small images keep their size), else :data:`DEFAULT_SIZE`.

    Warns, naming a file, when images disagree (one 1x1 file no longer makes a set of 48 px images
    decode at 1x1); unreadable headers are left to the decoder, which names them.
    """
    sides: list[tuple[int, str, tuple[int, int]]] = []
    first_error = ""
    for rel, item in zip(rels, items):
        try:
            w, h = item_header(item)
            sides.append((min(w, h), rel, (w, h)))
        except (DecodeError, OSError) as e:
            first_error = first_error or f"cannot read image {src.describe(rel)}: {e}"
    if not sides:
        raise BadImageError(f"{first_error}; no image of {src.path} could be read; remove or replace the files")
    median = sorted(s for s, _, _ in sides)[len(sides) // 2]
    size = median if median <= NATIVE_MAX else DEFAULT_SIZE
    odd = [(s, rel, wh) for s, rel, wh in sides if s != size and (s <= NATIVE_MAX or size <= NATIVE_MAX)]
    if odd:
        _, rel, (w, h) = odd[0]
        warnings.warn(
            f"{len(odd)} of {len(sides)} images of {src.path} have a shorter side other than {size} px (first: "
            f"{src.describe(rel)}, {w}x{h}); all are resized to {size}x{size}, the set's median; set data.image_size "
            "(--image-size) to choose the size", stacklevel=3)
    return size


def _check_options(image_size: int | None, cache_max_gb: float, fingerprint: str) -> None:
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ImageDataError(f"image size {image_size!r} must be a positive number of pixels (e.g. 32 or 224); "
                             "leave it unset to use the images' own size")
    if isinstance(cache_max_gb, bool) or not isinstance(cache_max_gb, (int, float)) or math.isnan(cache_max_gb) \
            or cache_max_gb < 0:
        raise ImageDataError(f"data.cache_max_gb={cache_max_gb!r} must be a number of GB >= 0 (0: stream a folder)")
    if fingerprint not in image_cache.FINGERPRINTS:
        raise ImageDataError(f"data.folder_fingerprint={fingerprint!r} must be one of {', '.join(image_cache.FINGERPRINTS)}")


def _channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std in [0, 1] of (N, C, H, W) uint8, in float64 blocks (exact, low memory)."""
    c = x.shape[1]
    s, ss, count = np.zeros(c), np.zeros(c), 0
    for i in range(0, x.shape[0], 4096):
        b = x[i: i + 4096].astype(np.float64)
        s += b.sum(axis=(0, 2, 3))
        ss += (b * b).sum(axis=(0, 2, 3))
        count += b.shape[0] * b.shape[2] * b.shape[3]
    mean = s / max(count, 1)
    std = np.sqrt(np.maximum(ss / max(count, 1) - mean * mean, 0.0))
    return tuple(float(m / 255) for m in mean), tuple(float(max(v, 1e-3) / 255) for v in std)


def _fits(src: Source, count: int, size: int, channels: int, cache_max_gb: float) -> bool:
    """Whether ``count`` decoded images and the archive's bytes fit the budget; an archive that does not raises."""
    need = count * channels * size * size
    if need + src.held_bytes <= cache_max_gb * 1e9:
        return True
    if src.kind == "folder":
        return False
    raise ImageDataError(
        f"{src.path}: the archive's {src.held_bytes / 1e9:.2f} GB of files and the {need / 1e9:.2f} GB of decoded images "
        f"exceed data.cache_max_gb={cache_max_gb:g}; raise it, or extract the archive and point data.root at the "
        "folder (it is then streamed)"
    )


def _decode_split(src: Source, rels: list[str], items: list, labels: list[int], size: int, channels: int, workers: int,
                  skip_bad: bool, progress: bool, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    x, errors = decode_all(items, size, channels, workers, progress, desc=f"decoding {split}")
    y = np.array(labels, dtype=np.int64)
    bad = [f"cannot read image {src.describe(rels[i])}: {why}" for i, why in errors]
    if bad and not skip_bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise BadImageError(f"{bad[0]}{more}; remove or replace it, or set data.skip_bad_images=true to skip unreadable images")
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable image(s), first: {bad[0]}", stacklevel=3)
        keep = np.ones(len(rels), dtype=bool)
        keep[[i for i, _ in errors]] = False
        x, y = x[keep], y[keep]
    return x, y, bad


def load_image_set(
    root: str | None,
    name: str = "imagefolder",
    image_size: int | None = None,
    channels: int = 3,
    cache_max_gb: float = 4.0,
    workers: int = 2,
    skip_bad: bool = False,
    progress: bool = True,
    download: bool = False,
    fingerprint: str = "stat",
) -> tuple[ArrayDataset, ArrayDataset, ImageSetInfo] | None:
    """(train, test, info) decoded into memory (cached), or None for a folder over ``cache_max_gb``.

    ``fingerprint``: how a folder is recognised in the cache, ``stat`` or ``content``
    (:mod:`kdarena.data.image_cache`); ``skip_bad`` is part of the cache key.
    """
    t0 = time.perf_counter()
    _check_options(image_size, cache_max_gb, fingerprint)
    path = resolve_root(root, name, download)
    if cache_max_gb <= 0 and not is_archive(path):
        return None
    budget = cache_max_gb * 1e9
    src = open_source(path, max_bytes=budget) if os.path.isdir(path) else None  # a folder's key needs its walk
    fp = image_cache.source_fingerprint(path, src, fingerprint)
    known = image_size or image_cache.remembered_size(fp)
    if known is not None:  # the key is known without reading any image: try the cache first
        cached = _from_cache(path, image_cache.cache_path(fp, known, channels, skip_bad), name, t0)
        if cached is not None:
            return cached
    src = src or open_source(path, max_bytes=budget)
    layout = parse_layout(src)
    rels = [f for f, _ in layout.train + layout.test]
    if image_size and not _fits(src, len(rels), image_size, channels, cache_max_gb):
        return None  # a folder to stream (an archive raised)
    items = src.items(rels)  # a zip is read here, within the budget its directory was checked against
    size = image_size or decide_size(src, rels, items)
    if not _fits(src, len(rels), size, channels, cache_max_gb):
        return None
    where = image_cache.cache_path(fp, size, channels, skip_bad)
    td = time.perf_counter()
    n = len(layout.train)
    labels = [label for _, label in layout.train + layout.test]
    train_x, train_y, bad = _decode_split(src, rels[:n], items[:n], labels[:n], size, channels, workers, skip_bad,
                                          progress, "train")
    test_x, test_y, bad_t = _decode_split(src, rels[n:], items[n:], labels[n:], size, channels, workers, skip_bad,
                                          progress, layout.test_split)
    del items
    decode_s = time.perf_counter() - td
    mean, std = _channel_stats(train_x)
    manifest = dict(
        source=path, fingerprint=fp, skip_bad=bool(skip_bad), classes=layout.classes, class_names=layout.class_names,
        image_size=size, channels=channels, mean=list(mean), std=list(std), decode_seconds=decode_s,
        test_split=layout.test_split, skipped=layout.skipped[:100] + bad[:100] + bad_t[:100],
    )
    arrays = dict(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)
    try:
        image_cache.save(where, arrays, manifest)
        if image_size is None:
            image_cache.remember_size(fp, size, path)
        drop_superseded(path, fp)
    except OSError as e:  # a read-only or full cache only costs the next run a decode
        warnings.warn(f"could not write the decoded-image cache {where}: {e}", stacklevel=2)
        where = None  # type: ignore[assignment]
    return _build(arrays, manifest, name, path, where, False, time.perf_counter() - t0)


def _from_cache(path: str, where: str, name: str, t0: float):
    got = image_cache.load(where)
    if got is None:
        return None
    arrays, manifest = got
    return _build(arrays, manifest, name, path, where, True, time.perf_counter() - t0)


def _build(arrays, manifest, name, path, where, from_cache, seconds):
    classes, mean, std = list(manifest["classes"]), tuple(manifest["mean"]), tuple(manifest["std"])
    sets = []
    for split in ("train", "test"):
        sets.append(ArrayDataset(
            images=torch.from_numpy(np.ascontiguousarray(arrays[f"{split}_x"])),
            labels=torch.from_numpy(np.ascontiguousarray(arrays[f"{split}_y"]).astype(np.int64)),
            num_classes=len(classes), mean=mean, std=std, classes=classes, name=name,
        ))
    counts = {s: np.bincount(arrays[f"{s}_y"], minlength=len(classes)).tolist() for s in ("train", "test")}
    info = ImageSetInfo(
        root=path, kind="archive" if os.path.isfile(path) else "folder", image_size=int(manifest["image_size"]),
        classes=classes, class_names=list(manifest.get("class_names", classes)), counts=counts, mean=mean, std=std,
        cache=where, from_cache=from_cache, seconds=seconds, decode_seconds=float(manifest["decode_seconds"]),
        test_split=manifest.get("test_split", "val"), skipped=list(manifest.get("skipped", [])),
    )
    return sets[0], sets[1], info
