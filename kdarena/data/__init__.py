"""Data sets and device-side loaders.

* :func:`load_arrays` -- Fashion-MNIST, CIFAR-10/100 and scikit-learn digits as in-memory
  :class:`ArrayDataset` (train, test) pairs; :func:`split_validation` holds out a validation set.
* :class:`TensorLoader` -- the whole data set resident on the device, batched augmentation.
* :class:`ImageFolder` / :func:`load_imagefolder` + :class:`FolderLoader` -- worker-based path for
  folders of images, with the same iteration interface.
"""
from __future__ import annotations

from .datasets import ArrayDataset, cache_dir, search_dirs
from .registry import DATASETS, load_arrays
from .folder_loader import FolderLoader
from .imagefolder import IMAGENET_MEAN, IMAGENET_STD, BadImageError, ImageFolder, load_imagefolder
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
    "load_imagefolder",
    "search_dirs",
    "split_validation",
]
