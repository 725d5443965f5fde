"""Data sets and device-side loaders.

* :func:`load_arrays` -- Fashion-MNIST, CIFAR-10/100 and scikit-learn digits as in-memory
  :class:`ArrayDataset` (train, test) pairs; :func:`split_validation` holds out a validation set.
* :class:`TensorLoader` -- the whole data set resident on the device, batched augmentation.
* :func:`kdarena.data.images.load_image_set` -- folders and archives of images (``data.name=imagefolder``),
  decoded once into an :class:`ArrayDataset`; one too large for memory is streamed by :class:`ImageFolder`
  + :class:`FolderLoader` (worker-based, the same iteration interface).
"""
from __future__ import annotations

from .datasets import ArrayDataset, cache_dir, search_dirs
from .registry import DATASETS, load_arrays
from .folder_loader import FolderLoader
from .imagefolder import IMAGENET_MEAN, IMAGENET_STD, BadImageError, ImageFolder
from .split import split_validation
from .tensor_loader import TensorLoader

__all__ = [
    "ArrayDataset",
    "BadImageError",
    "DATASETS",
    "FolderLoader",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolder",
    "TensorLoader",
    "cache_dir",
    "load_arrays",
    "search_dirs",
    "split_validation",
]
