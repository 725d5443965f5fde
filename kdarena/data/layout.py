"""Labelled file lists from the paths of an image folder or archive (:func:`parse_layout`).

Layouts understood (a single top-level folder, like ``cifar10-jpeg/``, is stepped into):

* ``train/CLASS/**/*.jpg`` plus ``val/CLASS/...`` or ``test/CLASS/...`` (``val`` wins when both
  exist; it is the test set, the validation split is held out of ``train``);
* Tiny-ImageNet as downloaded: ``train/WNID/images/*.JPEG``, ``val/images/*.JPEG`` labelled by
  ``val/val_annotations.txt``; its unlabelled ``test/`` is ignored because ``val`` exists;
* ``wnids.txt`` (Tiny-ImageNet) or ``classes.txt`` (the CIFAR archives: one class folder name a line)
  at the top fixes the class order, so labels keep their data set's numbering (else classes are
  sorted names); ``words.txt`` gives readable class names (only for display).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .errors import ImageDataError
from .imagefolder import IMG_EXTENSIONS


class Listing(Protocol):
    """What :func:`parse_layout` reads of a :class:`~kdarena.data.sources.Source`."""

    path: str
    sizes: dict[str, tuple[int, int]]
    dirs: set[str]

    def read_text(self, rel: str) -> str: ...


@dataclass
class Layout:
    """Classes and labelled files of a source, ``prefix`` (the stepped-into top folder) removed."""

    classes: list[str]
    class_names: list[str]
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]
    test_split: str
    prefix: str
    skipped: list[str]


def _top_prefix(src: Listing) -> str:
    """Folders to step into: while everything sits in one folder that is not a split folder."""
    names = list(src.sizes) + list(src.dirs)
    prefix = ""
    while True:
        rest = [n[len(prefix):] for n in names if n.startswith(prefix) and n[len(prefix):]]
        firsts = {r.split("/", 1)[0] for r in rest}
        if len(firsts) != 1:
            return prefix
        only = firsts.pop()
        if only in ("train", "val", "test") or not any(r.startswith(only + "/") for r in rest):
            return prefix
        prefix += only + "/"


def _is_image(rel: str) -> bool:
    return rel.lower().endswith(IMG_EXTENSIONS)


def parse_layout(src: Listing) -> Layout:
    """Classes and (file, label) lists of the train and test splits (see the module docstring)."""
    prefix = _top_prefix(src)
    files = {r[len(prefix):]: r for r in src.sizes if r.startswith(prefix)}
    dirs = {d[len(prefix):] for d in src.dirs if d.startswith(prefix)}
    has = lambda split: any(f.startswith(split + "/") for f in files) or split in dirs  # noqa: E731
    test_split = next((s for s in ("val", "test") if has(s)), None)
    if not has("train") or test_split is None:
        found = sorted({f.split("/", 1)[0] for f in files} | {d.split("/", 1)[0] for d in dirs})[:8]
        raise ImageDataError(
            f"{src.path}: expected train/ and val/ (or test/) folders of class folders{' under ' + prefix if prefix else ''}, "
            f"found {found}; arrange the images as train/CLASS/*.jpg and val/CLASS/*.jpg"
        )
    skipped: list[str] = []

    def split_files(split: str) -> dict[str, list[str]]:
        by_class: dict[str, list[str]] = {}
        for d in dirs:  # class folders, also empty ones
            parts = d.split("/")
            if len(parts) == 2 and parts[0] == split:
                by_class.setdefault(parts[1], [])
        ann = f"{split}/val_annotations.txt"
        labels: dict[str, str] = {}
        if ann in files:  # Tiny-ImageNet's val: images/NAME.JPEG with a label table
            for line in src.read_text(files[ann]).splitlines():
                cols = line.split("\t")
                if len(cols) >= 2 and cols[0].strip():
                    labels[cols[0].strip()] = cols[1].strip()
        for f in sorted(files):
            parts = f.split("/")
            if parts[0] != split or not _is_image(f):
                continue
            if labels and len(parts) == 3 and parts[1] == "images":
                if parts[2] not in labels:
                    skipped.append(files[f])
                    continue
                by_class.setdefault(labels[parts[2]], []).append(files[f])
            elif len(parts) >= 3:
                by_class.setdefault(parts[1], []).append(files[f])
            else:
                skipped.append(files[f])  # an image outside any class folder
        if labels:
            by_class.pop("images", None)  # the folder of the annotated images, not a class
        return by_class

    train, test = split_files("train"), split_files(test_split)
    order = next((name for name in ("wnids.txt", "classes.txt") if name in files), None)
    if order:
        classes = [w.strip() for w in src.read_text(files[order]).splitlines() if w.strip()]
        extra = sorted(set(train) - set(classes))
        if extra:
            raise ImageDataError(
                f"{src.path}: train/ has class folders {extra[:5]} that {order} does not list; fix {order} or remove them"
            )
        repeated = sorted({c for c in classes if classes.count(c) > 1})
        if repeated:
            raise ImageDataError(f"{src.path}: {order} lists {repeated[:5]} more than once; list each class once")
    else:
        classes = sorted(train)
    if not classes:
        raise ImageDataError(
            f"{src.path}: {prefix}train/ holds no class folders of images; arrange the images as train/CLASS/*.jpg "
            f"and {test_split}/CLASS/*.jpg"
        )
    empty = [c for c in classes if not train.get(c)]
    if empty:
        raise ImageDataError(
            f"{src.path}: class {empty[0]!r} has no training images in train/{empty[0]}/ ({len(empty)} such class(es)); "
            "add images or remove the class"
        )
    unknown = sorted(set(test) - set(classes))
    missing = sorted(c for c in classes if not test.get(c))
    if unknown or missing:
        what = f"has classes {unknown[:5]} that train/ lacks" if unknown else f"lacks classes {missing[:5]} that train/ has"
        raise ImageDataError(
            f"{src.path}: {test_split}/ {what}; train/ and {test_split}/ must hold the same class folders"
        )
    names = list(classes)
    if "words.txt" in files:
        words = {}
        for line in src.read_text(files["words.txt"]).splitlines():
            key, _, value = line.partition("\t")
            words[key.strip()] = value.split(",")[0].strip()
        names = [words.get(c) or c for c in classes]
    index = {c: i for i, c in enumerate(classes)}
    flat = lambda by: [(f, index[c]) for c in classes for f in by.get(c, [])]  # noqa: E731
    return Layout(classes, names, flat(train), flat(test), test_split, prefix, skipped)
