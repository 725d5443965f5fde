"""Turn the ``data`` section of a :class:`~kdarena.config.Config` into train / val / test loaders."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import Config, ConfigError
from .cifar import stored_as_image_files, with_cifar_statistics
from .datasets import ArrayDataset
from .registry import IMAGE_SETS, load_arrays
from .sampling import grouped_length
from .split import holdout_size, split_validation
from .tensor_loader import TensorLoader

CIFAR_LIKE = ("cifar10", "cifar100")
log = logging.getLogger("kdarena")


@dataclass
class DataBundle:
    train: Any
    val: Any | None
    test: Any
    num_classes: int
    in_channels: int
    classes: list[str]


def validation_count(val_size: int | float, n: int) -> int:
    """Samples ``data.val_size`` holds out of ``n``; one line when that leaves none to train on (a count, or a
    fraction that rounds up to every sample: 0.9999999999999999 was a traceback)."""
    try:
        return holdout_size(val_size, n)
    except ValueError:
        raise ConfigError(f"data.val_size={val_size} leaves no training data ({n} samples); use a smaller value") from None


def _normalisation_override(config: Config, sets: list[ArrayDataset]) -> None:
    """Apply data.mean / data.std (one value per channel) to every split."""
    d = config.data
    channels = sets[0].channels
    for key, values in (("mean", d.mean), ("std", d.std)):
        if values is None:
            continue
        if len(values) != channels:
            raise ConfigError(f"data.{key}={values} has {len(values)} values for {channels}-channel images; give {channels}")
        if key == "std" and any(not v > 0 for v in values):
            raise ConfigError(f"data.std={values} must be > 0 everywhere")
        for ds in sets:
            setattr(ds, key, tuple(float(v) for v in values))


def first_classes(data: ArrayDataset, k: int) -> ArrayDataset:
    """The samples of the first ``k`` classes (labels unchanged: they are already 0..k-1)."""
    if k > data.num_classes:
        raise ConfigError(f"data.classes={k} but {data.name} has {data.num_classes} classes; use at most {data.num_classes}")
    keep = torch.nonzero(data.labels < k).flatten()
    return ArrayDataset(images=data.images[keep].contiguous(), labels=data.labels[keep].contiguous(), num_classes=k,
                        mean=data.mean, std=data.std, classes=list(data.classes)[:k], name=data.name)


def _array_loaders(config: Config, device: torch.device, rank: int, world: int, arrays=None) -> DataBundle:
    d = config.data
    train, test = arrays if arrays is not None else load_arrays(d.name, root=d.root, download=d.download)
    if d.classes is not None:
        train, test = first_classes(train, d.classes), first_classes(test, d.classes)
    _normalisation_override(config, [train, test])
    if d.train_subset is not None and d.train_subset < len(train):
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(d.val_seed))
        train = train.subset(order[: d.train_subset])
    val = None
    if d.val_size:
        validation_count(d.val_size, len(train))
        train, val = split_validation(train, d.val_size, d.val_seed)
    global_batch = d.batch_size * world
    if global_batch > len(train):
        raise ConfigError(
            f"data.batch_size={d.batch_size} (x {world} processes) is larger than the training set "
            f"({len(train)} samples); use a smaller batch size"
        )
    images = d.name in IMAGE_SETS  # decoded photos: CIFAR-style crop (1/8 of the side) and flip by default
    default_crop = 4 if d.name in CIFAR_LIKE else (train.image_shape[-1] // 8 if images else 0)
    crop = d.crop_padding if d.crop_padding is not None else default_crop
    flip = d.flip if d.flip is not None else (d.name in CIFAR_LIKE or images)
    channels_last = config.train.channels_last
    common = dict(device=device, rank=rank, world_size=world, channels_last=channels_last)
    augment = dict(rotation=d.rotation) if d.rotation else {}  # absent: the loader draws exactly as before
    if d.samples_per_class:
        visited = grouped_length(train.labels, d.samples_per_class)
        if visited < global_batch:
            raise ConfigError(f"data.samples_per_class={d.samples_per_class} leaves {visited} training samples in whole groups, "
                              f"fewer than one batch of {global_batch}; use a smaller data.batch_size")
        augment["per_class"] = d.samples_per_class
    train_loader = TensorLoader(train, d.batch_size, train=True, seed=config.seed, crop_padding=crop, flip=flip, **common, **augment)
    eval_loader = lambda ds: TensorLoader(ds, d.eval_batch_size, train=False, **common)  # noqa: E731
    return DataBundle(
        train_loader,
        eval_loader(val) if val is not None else None,
        eval_loader(test),
        train.num_classes,
        train.channels,
        list(train.classes),
    )


def _folder_loaders(config: Config, device: torch.device, rank: int, world: int) -> DataBundle:
    from .errors import ImageDataError
    from .folder_loader import FolderLoader
    from .imagefolder import ImageFolder
    from .walk import inside_root

    d = config.data
    if d.classes is not None:
        raise ConfigError("data.classes needs the data set decoded in memory; raise data.cache_max_gb or drop data.classes")
    if not d.root:
        raise ConfigError("data.name=imagefolder needs data.root: a folder with train/ and val/ (or test/) class folders")
    root = Path(d.root)
    test_dir = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise ConfigError(f"data.root={d.root!r} must contain train/ and val/ (or test/) folders of class sub-folders")
    for split_dir in (root / "train", test_dir):  # as the in-memory walk: never a link out of the data root
        if not inside_root(os.path.realpath(root), os.path.realpath(split_dir)):
            raise ImageDataError(f"{split_dir} is a link out of the data root {root}; kdarena reads only files inside it: "
                                 f"point data.root at the folder holding {os.path.realpath(split_dir)}, or copy it in")
    size = d.image_size or 224  # only folders too large to decode into memory come here
    train = ImageFolder(str(root / "train"), size, skip_bad=d.skip_bad_images)
    test = ImageFolder(str(test_dir), size, skip_bad=d.skip_bad_images)
    if test.classes != train.classes:
        raise ConfigError(f"{test_dir} has classes {test.classes[:5]}... but train/ has {train.classes[:5]}...; they must match")
    train_idx = list(range(len(train)))
    val_idx: list[int] = []
    if d.val_size:
        from .split import stratified_holdout
        import numpy as np

        labels = np.array([label for _, label in train.samples])
        k = validation_count(d.val_size, len(labels))
        keep, held = stratified_holdout(labels, k, d.val_seed)
        train_idx, val_idx = keep.tolist(), held.tolist()
    if d.train_subset is not None:
        train_idx = train_idx[: d.train_subset]
    if d.batch_size * world > len(train_idx):
        raise ConfigError(f"data.batch_size={d.batch_size} (x {world} processes) is larger than the training set ({len(train_idx)} images)")
    for key, value, off in (("rotation", d.rotation, 0), ("samples_per_class", d.samples_per_class, 0)):
        if value:
            raise ConfigError(f"data.{key}={value} works on in-memory data sets only; this folder is streamed "
                              f"(over data.cache_max_gb={d.cache_max_gb}): raise data.cache_max_gb or set data.{key}={off}")
    norm = dict(mean=d.mean, std=d.std)
    common = dict(device=device, rank=rank, world_size=world, num_workers=d.num_workers, channels_last=config.train.channels_last, **norm)
    subset = torch.utils.data.Subset
    train_loader = FolderLoader(subset(train, train_idx), d.batch_size, train=True, seed=config.seed, flip=d.flip is not False, **common)
    val_loader = FolderLoader(subset(train, val_idx), d.eval_batch_size, train=False, **common) if val_idx else None
    test_loader = FolderLoader(test, d.eval_batch_size, train=False, **common)
    return DataBundle(train_loader, val_loader, test_loader, train.num_classes, train.channels, list(train.classes))


def _image_arrays(config: Config, rank: int):
    """Decoded (train, test) of an image folder / archive, or None when it must be streamed."""
    from .images import load_image_set

    d = config.data
    workers = max(1, min(d.num_workers, os.cpu_count() or 1))
    got = load_image_set(d.root, d.name, d.image_size, cache_max_gb=d.cache_max_gb, workers=workers,
                         skip_bad=d.skip_bad_images, progress=config.train.progress and rank == 0, download=d.download,
                         fingerprint=d.folder_fingerprint)
    if got is None:
        return None
    train, test, info = got
    log.info("%s: %d train + %d %s images of %dx%d, %d classes (%s %.1fs; cache %s)", info.root, len(train), len(test),
             info.test_split, info.image_size, info.image_size, len(info.classes),
             "loaded in" if info.from_cache else "decoded in", info.seconds, info.cache)
    return train, test


def build_data(config: Config, device: torch.device, rank: int = 0, world: int = 1) -> DataBundle:
    d = config.data
    cifar_images = d.name in CIFAR_LIKE and stored_as_image_files(d.name, d.root)
    if d.name in IMAGE_SETS or cifar_images:
        arrays = _image_arrays(config, rank)
        if arrays is None:
            return _folder_loaders(config, device, rank, world)
        if cifar_images:
            arrays = with_cifar_statistics(d.name, arrays, d.root)
        return _array_loaders(config, device, rank, world, arrays)
    return _array_loaders(config, device, rank, world)
