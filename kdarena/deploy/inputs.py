"""The images ``kdarena predict`` is given, labelled where their place says so, decoded as the card says.

Each input is an image file, a folder or an archive (.tar, .tar.gz, .zip), read by kdarena's own
data readers (:mod:`kdarena.data.sources` and :mod:`kdarena.data.decode`, the code that builds the
training cache, so the pixels are the ones ``kdarena eval`` scores):

* a folder or archive in kdarena's data layout (``train/CLASS/...`` plus ``val/`` or ``test/``):
  its test split (``val`` when both exist), the images ``kdarena eval`` scores, labelled by class;
* any other folder or archive: every image in it; one inside a folder named after a class of the
  model is labelled with that class;
* an image file: unlabelled.

A path that does not exist stops with an error; a file that is not an image, or an image that
cannot be decoded, is skipped (one warning per chunk of images names the first and the count; the
summary counts every skipped file).
"""
from __future__ import annotations

import io
import logging
import os
import posixpath
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from ..data.decode import decode_all
from ..data.imagefolder import IMG_EXTENSIONS, decode_image
from ..data.sources import ImageDataError, is_archive, open_source, parse_layout
from ..data.tensor_loader import normalisation
from .errors import PredictError

log = logging.getLogger("kdarena")
CHUNK = 2048  # images decoded at a time: bounded memory on any input size
# Bytes of one input archive held in memory at once (a tar is read in one pass; a folder is streamed).
# A 14 MB tar.gz holding a 3 GiB member once peaked at 3.4 GB here; now it is refused at the member's header.
ARCHIVE_MAX_GB = 1.0


@dataclass
class Images:
    """What to predict on: display names, what the decoder reads (bytes or paths) and labels (-1: none)."""

    names: list[str]
    items: list[bytes | str]
    labels: list[int]
    skipped: list[str]
    notes: list[str]


def _from_source(path: str, classes: Sequence[str], out: Images, max_gb: float) -> None:
    src = open_source(path, max_gb * 1e9)
    index = {c: i for i, c in enumerate(classes)}
    try:
        layout = parse_layout(src)
    except ImageDataError:
        if any("train" in rel.split("/")[:2] for rel in src.sizes):
            raise  # a data set's layout that is broken: its own message says how
        rels = sorted(r for r in src.sizes if r.lower().endswith(IMG_EXTENSIONS))
        labels = [index.get(posixpath.basename(posixpath.dirname(r)), -1) for r in rels]
    else:
        rels = [rel for rel, _ in layout.test]
        labels = [index.get(layout.classes[label], -1) for _, label in layout.test]
        out.notes.append(f"{path}: its {layout.test_split}/ split ({len(rels)} images), as kdarena eval scores it")
    if not rels:
        raise PredictError(f"{path} holds no image files ({', '.join(IMG_EXTENSIONS[:4])}, ...)")
    out.names.extend(src.describe(r) for r in rels)
    out.items.extend(src.items(rels))
    out.labels.extend(labels)


def gather(inputs: Sequence[str], classes: Sequence[str], max_gb: float | None = None) -> Images:
    """The images of ``inputs``; an archive holds at most ``max_gb`` GB of member bytes (default
    :data:`ARCHIVE_MAX_GB`; a member over it is refused at its header, before it is read)."""
    max_gb = ARCHIVE_MAX_GB if max_gb is None else max_gb
    if isinstance(max_gb, bool) or not isinstance(max_gb, (int, float)) or not 0 < max_gb < float("inf"):
        raise PredictError(f"--cache-max-gb {max_gb}: give a number of GB above 0, e.g. 1")
    out = Images([], [], [], [], [])
    for path in inputs:
        if not os.path.exists(path):
            raise PredictError(f"input {path} does not exist; give image files, folders or .tar/.tar.gz/.zip archives")
        if os.path.isdir(path) or is_archive(path):
            _from_source(path, classes, out, max_gb)
        elif path.lower().endswith(IMG_EXTENSIONS):
            out.names.append(path)
            out.items.append(os.path.realpath(path))  # a link the user gave is theirs to follow (the decoder does not)
            out.labels.append(-1)
        else:
            out.skipped.append(f"{path}: not an image file")
    if out.skipped:
        log.warning("skipped %d input(s) that are not images, first: %s", len(out.skipped), out.skipped[0])
    return out


def _decode_bilinear(items: list[bytes | str], size: int, channels: int) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Streamed-folder runs decode with :func:`decode_image` (see the card's ``resize``)."""
    arrays, errors = np.zeros((len(items), channels, size, size), dtype=np.uint8), []
    for i, item in enumerate(items):
        try:
            arrays[i] = decode_image(io.BytesIO(item) if isinstance(item, bytes) else item, size, channels).numpy()
        except Exception as error:  # Pillow raises many types for bad files
            errors.append((i, f"{type(error).__name__}: {error}"))
    return arrays, errors


def batches(images: Images, card: dict, batch_size: int, workers: int = 1) -> Iterator[tuple[torch.Tensor, list[int], list[int]]]:
    """(normalised float32 batch, indices into ``images``, labels) in input order; bad images skipped with a warning."""
    prep = card["preprocessing"]
    size, channels = prep["size"][0], card["input"]["shape"][0]
    scale, bias = normalisation(prep["mean"], prep["std"], torch.device("cpu"))
    for start in range(0, len(images.items), CHUNK):
        chunk = images.items[start:start + CHUNK]
        if prep["resize"] == "bilinear":
            arrays, errors = _decode_bilinear(chunk, size, channels)
        else:
            arrays, errors = decode_all(chunk, size, channels, workers=workers, progress=False)
        bad = {i for i, _ in errors}
        for i, why in errors:
            images.skipped.append(f"{images.names[start + i]}: {why}")
        if errors:  # one line per chunk, not per file (a 100k-member archive of non-images printed 100k lines)
            first = images.names[start + errors[0][0]]
            log.warning("skipped %d image(s) that cannot be decoded; first: %s: cannot decode it (%s)", len(errors), first, errors[0][1])
        keep = [i for i in range(len(chunk)) if i not in bad]
        x = torch.from_numpy(arrays[keep]) if bad else torch.from_numpy(arrays)
        for a in range(0, len(keep), batch_size):
            idx = [start + i for i in keep[a:a + batch_size]]
            # exactly the eval loaders' normalisation (TensorLoader._normalise)
            yield x[a:a + batch_size].float().mul_(scale).add_(bias), idx, [images.labels[i] for i in idx]

