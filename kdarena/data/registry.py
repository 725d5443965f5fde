"""Named in-memory data sets: :func:`load_arrays` maps a name to its loader module.

The loader modules import :mod:`kdarena.data.datasets` (the base types); this module imports
them, never the other way round, so the package has no import cycle.
"""
from __future__ import annotations

from typing import Callable

from ..errors import ConfigError
from .cifar import load_cifar10, load_cifar100
from .datasets import ArrayDataset
from .digits import load_digits
from .fashion_mnist import load_fashion_mnist

_LOADERS: dict[str, Callable[..., tuple[ArrayDataset, ArrayDataset]]] = {
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "digits": load_digits,
}

#: Names accepted by :func:`load_arrays`.
DATASETS: tuple[str, ...] = tuple(_LOADERS)
#: folders / archives of image files (:mod:`kdarena.data.images`)
IMAGE_SETS: tuple[str, ...] = ("imagefolder", "tiny_imagenet")
#: every ``data.name`` a config may give
NAMES: tuple[str, ...] = DATASETS + IMAGE_SETS


def load_arrays(
    name: str, root: str | None = None, download: bool = False
) -> tuple[ArrayDataset, ArrayDataset]:
    """Load the (train, test) split of a small data set fully into memory.

    ``name`` is one of :data:`DATASETS`.  ``root`` is searched first; with ``download=True`` a
    missing data set is fetched (into ``root`` when given, else into :func:`cache_dir`).
    Folders and archives of image files go through :func:`kdarena.data.images.load_image_set`.
    """
    key = str(name).lower().replace("-", "_")
    aliases = {"fashionmnist": "fashion_mnist", "cifar_10": "cifar10", "cifar_100": "cifar100"}
    key = aliases.get(key, key)
    if key not in _LOADERS:
        hint = (
            " Folders and archives of images are data.name=imagefolder (kdarena.data.images.load_image_set), "
            "not load_arrays."
            if key == "imagefolder"
            else " (for a folder of images, use 'imagefolder')."
        )
        raise ConfigError(f"unknown data set {name!r}; valid names: {', '.join(DATASETS)}.{hint}")
    return _LOADERS[key](root=root, download=download)
