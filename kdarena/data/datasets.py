"""In-memory data sets (:class:`ArrayDataset`) and where data files are searched.

Every small data set (Fashion-MNIST, CIFAR-10/100, scikit-learn digits) is held as one
``uint8`` tensor of shape ``(N, C, H, W)`` plus ``int64`` labels; the loaders in
:mod:`kdarena.data.tensor_loader` move that tensor to the training device once and do all
augmentation there.  Folders and archives of images go through :func:`kdarena.data.images.load_image_set`
(and are streamed from disk when they do not fit in memory).

Where files are searched (:func:`search_dirs`), in order:

1. ``root`` when given to :func:`load_arrays` (then only there: a ``root`` without the data is an error);
2. ``$KDARENA_DATA``;
3. the cache ``~/.cache/kdarena`` (``$KDARENA_CACHE`` overrides it), which is also where
   ``download=True`` writes when no ``root`` is given;
4. the system directories in :data:`SYSTEM_DATA_DIRS` (``/usr/share/datasets``, where the Debian
   package ``dataset-fashion-mnist`` installs its files).

The registry of named data sets (:func:`~kdarena.data.registry.load_arrays`) lives in
:mod:`kdarena.data.registry`, which imports the loader modules; they import only this module,
so there is no import cycle.

Tests override the last two by setting ``HOME``/``KDARENA_CACHE`` and monkeypatching
:data:`SYSTEM_DATA_DIRS`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import torch

#: System-wide directories searched last (each data set looks in its own sub-directory).
SYSTEM_DATA_DIRS: list[str] = ["/usr/share/datasets"]


@dataclass
class ArrayDataset:
    """A whole labelled image data set held in memory.

    ``images`` is ``uint8`` ``(N, C, H, W)``, contiguous, on the CPU; ``labels`` is ``int64``
    ``(N,)`` with values in ``[0, num_classes)``.  ``mean``/``std`` are per-channel statistics in the
    ``[0, 1]`` pixel scale used for normalisation.  Construction validates all of this and raises
    :class:`ValueError` naming the data set and the problem.
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str] = field(default_factory=list)
    name: str = "dataset"

    def __post_init__(self) -> None:
        where = f"data set {self.name!r}"
        if not isinstance(self.images, torch.Tensor) or not isinstance(self.labels, torch.Tensor):
            raise ValueError(f"{where}: images and labels must be torch tensors")
        if self.images.dtype != torch.uint8:
            raise ValueError(f"{where}: images must be uint8, got {self.images.dtype}")
        if self.images.dim() != 4:
            raise ValueError(
                f"{where}: images must have shape (N, C, H, W), got {tuple(self.images.shape)}"
            )
        if self.images.device.type != "cpu" or self.labels.device.type != "cpu":
            raise ValueError(f"{where}: images and labels must be on the CPU")
        if self.labels.dtype != torch.int64:
            raise ValueError(f"{where}: labels must be int64, got {self.labels.dtype}")
        if self.labels.dim() != 1:
            raise ValueError(f"{where}: labels must have shape (N,), got {tuple(self.labels.shape)}")
        n, c = self.images.shape[0], self.images.shape[1]
        if self.labels.shape[0] != n:
            raise ValueError(f"{where}: {n} images but {self.labels.shape[0]} labels")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"{where}: num_classes must be a positive int, got {self.num_classes!r}")
        if n > 0:
            lo, hi = int(self.labels.min()), int(self.labels.max())
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(
                    f"{where}: labels must lie in [0, {self.num_classes}), found values in [{lo}, {hi}]"
                )
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if len(self.mean) != c or len(self.std) != c:
            raise ValueError(
                f"{where}: mean/std need one value per channel ({c}), got {len(self.mean)}/{len(self.std)}"
            )
        if any(not (s > 0) for s in self.std):
            raise ValueError(f"{where}: std values must be > 0, got {self.std}")
        self.classes = [str(x) for x in self.classes] or [str(i) for i in range(self.num_classes)]
        if len(self.classes) != self.num_classes:
            raise ValueError(
                f"{where}: {len(self.classes)} class names for num_classes={self.num_classes}"
            )
        if not self.images.is_contiguous():
            self.images = self.images.contiguous()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    def subset(self, indices: torch.Tensor | Sequence[int], name: str | None = None) -> "ArrayDataset":
        """A new data set holding ``indices`` (copied; same classes and statistics)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return ArrayDataset(
            images=self.images[idx].contiguous(),
            labels=self.labels[idx].contiguous(),
            num_classes=self.num_classes,
            mean=self.mean,
            std=self.std,
            classes=list(self.classes),
            name=self.name if name is None else name,
        )

    def __repr__(self) -> str:
        return (
            f"ArrayDataset(name={self.name!r}, n={len(self)}, shape={tuple(self.images.shape[1:])}, "
            f"num_classes={self.num_classes})"
        )


def cache_dir() -> str:
    """The per-user download cache: ``$KDARENA_CACHE`` or ``~/.cache/kdarena``."""
    env = os.environ.get("KDARENA_CACHE")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    return os.path.join(os.path.expanduser("~"), ".cache", "kdarena")


def search_dirs(root: str | None, subdirs: Sequence[str]) -> list[str]:
    """Candidate directories, in search order, for a data set kept in one of ``subdirs``.

    Each base directory (``root``, ``$KDARENA_DATA``, the cache, the system directories) is tried
    itself and with each of ``subdirs`` appended; duplicates are removed, order is kept. A given
    ``root`` is the only base: data found elsewhere would silently be other data than asked for.
    """
    bases: list[tuple[str, bool]] = []  # (directory, try the directory itself too)
    if root:
        base = os.path.abspath(os.path.expanduser(root))
        return list(dict.fromkeys([base] + [os.path.join(base, s) for s in subdirs]))
    env = os.environ.get("KDARENA_DATA")
    if env:
        bases.append((os.path.abspath(os.path.expanduser(env)), True))
    bases.append((cache_dir(), False))
    for d in SYSTEM_DATA_DIRS:
        bases.append((d, False))
    out: list[str] = []
    for base, itself in bases:
        cands = ([base] if itself else []) + [os.path.join(base, s) for s in subdirs]
        for c in cands:
            if c not in out:
                out.append(c)
    return out
