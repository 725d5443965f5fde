"""A folder of images, one sub-directory per class (``root/CLASS/**/*.jpg``), decoded with Pillow.

Images are converted to RGB (``channels=3``) or grayscale (``channels=1``), resized so the shorter
side is ``image_size`` and centre-cropped to ``image_size x image_size`` on the CPU (in the loader
workers); random-resized-crop / flip augmentation then runs batch-wise on the device in
:class:`kdarena.data.folder_loader.FolderLoader`.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import MissingExtraError
from .decode import DecodeError, open_image
from .errors import BadImageError, DataNotFoundError, ImageDataError
from .walk import open_regular, scan_folder, skipped_note, walk_order

IMG_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm",
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingExtraError("image folders need Pillow: pip install pillow (or pip install 'kdarena[data]')") from e
    return Image


def decode_image(path: str | BinaryIO, image_size: int, channels: int = 3) -> torch.Tensor:
    """Decode ``path`` (or an open binary file) into a uint8 (C, image_size, image_size) tensor
    (resize shorter side + centre crop).

    A path is opened only if it is a regular file (:func:`~kdarena.data.walk.open_regular`), and an
    image claiming more than :data:`~kdarena.data.decode.MAX_PIXELS` is refused from its header.
    """
    Image = _pil()
    mode = "RGB" if channels == 3 else "L"
    with (open_regular(path) if isinstance(path, str) else contextlib.nullcontext(path)) as f, open_image(f) as img:
        if img.format == "JPEG":
            img.draft(mode, (image_size, image_size))  # DCT-domain downscale, never below the size
        img = img.convert(mode)
    w, h = img.size
    if w < 1 or h < 1:
        raise DecodeError(f"empty image ({w}x{h})")
    s = image_size / min(w, h)
    nw, nh = max(image_size, round(w * s)), max(image_size, round(h * s))
    if (nw, nh) != (w, h):
        resample = getattr(Image, "Resampling", Image).BILINEAR
        img = img.resize((nw, nh), resample=resample)
    left, top = (nw - image_size) // 2, (nh - image_size) // 2
    img = img.crop((left, top, left + image_size, top + image_size))
    arr = np.array(img, dtype=np.uint8)  # a writable copy
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


class ImageFolder(Dataset):
    """``root/CLASS/...`` images as (uint8 tensor (C, image_size, image_size), label) pairs.

    Classes are the sorted sub-directory names of ``root`` (or ``classes`` when given, e.g. the
    training classes for a validation folder; then missing class directories are allowed).  Files
    are found recursively and kept if their extension is in ``extensions`` (case-insensitive); the
    folder is walked by :func:`~kdarena.data.walk.scan_folder` (regular files inside ``root``, links
    to folders never followed; what is left out is named in one warning).

    An unreadable image raises :class:`BadImageError` naming the file, or, with
    ``skip_bad=True``, is reported once with a warning and replaced by the next readable sample.
    :meth:`verify` decodes every file up front.

    Attributes: ``classes``, ``num_classes``, ``samples`` (list of (path, label)), ``targets``,
    ``mean``/``std`` (ImageNet constants), ``image_size``, ``channels``.
    """

    def __init__(
        self,
        root: str,
        image_size: int,
        channels: int = 3,
        skip_bad: bool = False,
        classes: Sequence[str] | None = None,
        extensions: Sequence[str] = IMG_EXTENSIONS,
    ) -> None:
        if channels not in (1, 3):
            raise ImageDataError(f"channels must be 1 or 3, got {channels}")
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
            raise ImageDataError(f"image size must be a positive number of pixels (e.g. 32 or 224), got {image_size!r}")
        self.root = os.path.abspath(os.path.expanduser(root))
        self.image_size = image_size
        self.channels = channels
        self.skip_bad = bool(skip_bad)
        self.extensions = tuple(e.lower() for e in extensions)
        self.name = os.path.basename(self.root.rstrip(os.sep)) or self.root
        if not os.path.isdir(self.root):
            raise DataNotFoundError(f"image folder {self.root} does not exist or is not a directory")
        scan = scan_folder(self.root, self._wanted)
        if scan.skipped:
            warnings.warn(skipped_note(self.root, scan.skipped), stacklevel=2)
        found = sorted(d for d in scan.dirs if "/" not in d)
        if classes is None:
            if not found:
                raise ImageDataError(
                    f"image folder {self.root} has no class sub-directories (expected root/CLASS/image.jpg)"
                )
            self.classes = found
        else:
            self.classes = [str(c) for c in classes]
            extra = sorted(set(found) - set(self.classes))
            if extra:
                raise ImageDataError(f"image folder {self.root}: class directories {extra} are not among the known classes")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        by_class: dict[str, list[str]] = {c: [] for c in self.classes}
        for rel in sorted(scan.files, key=walk_order):
            top, sep, _ = rel.partition("/")
            if sep and top in by_class:
                by_class[top].append(os.path.join(self.root, *rel.split("/")))
        self._open = {os.path.join(self.root, *rel.split("/")): f.path for rel, f in scan.files.items()}
        self.samples: list[tuple[str, int]] = []
        empty = [c for c in self.classes if not by_class[c]] if classes is None else []
        for c in self.classes:
            self.samples.extend((f, self.class_to_idx[c]) for f in by_class[c])
        if empty:
            raise ImageDataError(
                f"image folder {self.root}: no images with extensions {', '.join(self.extensions)} "
                f"in class directories {empty[:10]}{' ...' if len(empty) > 10 else ''}"
            )
        if not self.samples:
            raise ImageDataError(f"image folder {self.root} contains no images")
        self._bad: set[int] = set()

    def _wanted(self, rel: str) -> bool:
        base = rel.rsplit("/", 1)[-1]
        return not base.startswith(".") and base.lower().endswith(self.extensions)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def targets(self) -> list[int]:
        return [y for _, y in self.samples]

    @property
    def mean(self) -> tuple[float, ...]:
        return IMAGENET_MEAN if self.channels == 3 else (0.449,)

    @property
    def std(self) -> tuple[float, ...]:
        return IMAGENET_STD if self.channels == 3 else (0.226,)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> torch.Tensor:
        """Decode sample ``index``; raises :class:`BadImageError` naming the file on failure."""
        path = self.samples[index][0]
        try:
            return decode_image(self._open.get(path, path), self.image_size, self.channels)
        except DecodeError as e:
            raise BadImageError(f"cannot read image {path}: {e}") from e
        except OSError as e:  # gone, or swapped for a FIFO / link since the walk
            raise BadImageError(f"cannot read image {path}: {e.strerror or e}") from e

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self.samples)
        for k in range(n):
            i = (index + k) % n
            try:
                return self.load(i), self.samples[i][1]
            except BadImageError as e:
                if not self.skip_bad:
                    raise
                if i not in self._bad:
                    self._bad.add(i)
                    warnings.warn(f"{e}; skipped (using the next readable image)", stacklevel=2)
        raise BadImageError(f"image folder {self.root}: no readable image at all")

    def verify(self, num_threads: int = 8) -> list[str]:
        """Decode every image; return the unreadable paths.

        With ``skip_bad=True`` they are removed from :attr:`samples` (with one warning); otherwise a
        :class:`BadImageError` lists them.
        """
        def check(i: int) -> str | None:
            try:
                self.load(i)
                return None
            except BadImageError as e:
                return str(e)

        with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
            results = list(pool.map(check, range(len(self.samples))))
        bad_idx = [i for i, r in enumerate(results) if r is not None]
        bad = [self.samples[i][0] for i in bad_idx]
        if bad:
            detail = "\n  ".join(results[i] for i in bad_idx[:20])  # type: ignore[misc]
            more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
            if not self.skip_bad:
                raise BadImageError(f"{len(bad)} unreadable image(s) in {self.root}:\n  {detail}{more}")
            warnings.warn(f"skipping {len(bad)} unreadable image(s) in {self.root}:\n  {detail}{more}", stacklevel=2)
            drop = set(bad_idx)
            self.samples = [s for i, s in enumerate(self.samples) if i not in drop]
            self._bad = set()
            if not self.samples:
                raise BadImageError(f"image folder {self.root}: no readable image at all")
        return bad
