"""Decoding image files into one ``uint8`` array, in parallel worker processes.

Every image is converted to RGB (or L), resized so its shorter side is ``size`` and centre-cropped
to ``size x size``.  Downscaling uses Pillow's BOX filter (the area average, as in
Downsampled-ImageNet), so 64 -> 32 averages 2x2 blocks exactly; upscaling (rare) uses BICUBIC.

Decompression bombs: a file whose header claims more than :data:`MAX_PIXELS` pixels (kdarena's
limit, Pillow's default) is refused from its header, before any pixel is decoded (Pillow itself only
refuses above twice its own limit, and warns below).  A folder's file is opened with
:func:`kdarena.data.walk.open_regular` (never a FIFO or device) and Pillow reads only what it needs.
"""
from __future__ import annotations

import contextlib
import io
import multiprocessing as mp
import os
import re
import sys
import warnings
from typing import BinaryIO, Callable, Iterator, Sequence

import numpy as np

from .walk import open_regular

_CHUNK = 512  # images per task: large enough to amortise the pickling, small enough for a smooth bar
#: kdarena's pixel limit (width x height) for one image: Pillow's default ``MAX_IMAGE_PIXELS``.
MAX_PIXELS = 89_478_485
_STREAM_REPR = re.compile(r"<_io\.\w+(?: name=[^>]*)?(?: object at 0x[0-9a-fA-F]+)?>")
_BOMB_SIZE = re.compile(r"Image size \((\d+) pixels\)")


class DecodeError(ValueError):
    """One image could not be decoded; the message says why."""


def _reason(e: BaseException) -> str:
    """Why Pillow failed, without the ``<_io.BytesIO object at 0x...>`` it puts in its messages."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):
        return "not an image Pillow can read (unknown format or damaged header)"
    if isinstance(e, Image.DecompressionBombError):  # over twice Pillow's limit: refused in Image.open
        found = _BOMB_SIZE.search(str(e))
        claims = f"{int(found.group(1)):,} pixels" if found else "more pixels than Pillow allows"
        return f"claims {claims}, over kdarena's limit of {MAX_PIXELS:,} pixels (a decompression bomb?); remove it"
    return f"{type(e).__name__}: {_STREAM_REPR.sub('the file', str(e))}"


@contextlib.contextmanager
def open_image(data: bytes | BinaryIO) -> Iterator:
    """A Pillow image of ``data`` (bytes or an open binary file), refused past :data:`MAX_PIXELS`.

    Every failure, also inside the ``with`` block, is a :class:`DecodeError` saying why.
    """
    from PIL import Image

    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        with warnings.catch_warnings():  # the size is checked here; Pillow's warning would only repeat it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(stream) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise DecodeError(f"claims {w}x{h} = {w * h:,} pixels, over kdarena's limit of {MAX_PIXELS:,} "
                                      "pixels (a decompression bomb?); remove it or shrink it")
                yield img
    except DecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - OSError, SyntaxError, DecompressionBombError, ...
        raise DecodeError(_reason(e)) from e


def image_header(data: bytes | BinaryIO) -> tuple[int, int]:
    """``(width, height)`` from the header alone."""
    with open_image(data) as img:
        return img.size


def decode_bytes(data: bytes | BinaryIO, size: int, channels: int = 3) -> np.ndarray:
    """Decode ``data`` into a ``(size, size, channels)`` uint8 array (see the module docstring)."""
    from PIL import Image

    mode = "RGB" if channels == 3 else "L"
    with open_image(data) as img:
        w, h = img.size
        img = img.convert(mode)
    if w < 1 or h < 1:
        raise DecodeError(f"empty image ({w}x{h})")
    if (w, h) != (size, size):
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        filt = Image.Resampling.BOX if min(w, h) >= size else Image.Resampling.BICUBIC
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), resample=filt)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def decode_item(item: bytes | str, size: int, channels: int = 3) -> np.ndarray:
    """:func:`decode_bytes` of bytes, or of a file path opened with :func:`open_regular`."""
    if isinstance(item, str):
        with open_regular(item) as f:
            return decode_bytes(f, size, channels)
    return decode_bytes(item, size, channels)


def item_header(item: bytes | str) -> tuple[int, int]:
    """:func:`image_header` of bytes or of a file path (only the header is read)."""
    if isinstance(item, str):
        with open_regular(item) as f:
            return image_header(f)
    return image_header(item)


def _decode_chunk(task: tuple) -> tuple[int, np.ndarray, list[tuple[int, str]]]:
    start, items, size, channels = task
    out = np.zeros((len(items), channels, size, size), dtype=np.uint8)
    errors: list[tuple[int, str]] = []
    for k, item in enumerate(items):
        try:
            out[k] = decode_item(item, size, channels).transpose(2, 0, 1)  # a path is opened in the worker
        except DecodeError as e:
            errors.append((start + k, str(e)))
        except OSError as e:
            errors.append((start + k, f"{e.strerror or e}"))
    return start, out, errors


def _context() -> mp.context.BaseContext:
    # fork starts workers in milliseconds and they only run Pillow/numpy; elsewhere spawn
    if sys.platform.startswith("linux"):
        return mp.get_context("fork")
    return mp.get_context("spawn")


def decode_all(
    items: Sequence[bytes | str],
    size: int,
    channels: int = 3,
    workers: int = 2,
    progress: bool = True,
    desc: str = "decoding",
    on_chunk: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Decode ``items`` (bytes, or file paths) into ``(N, channels, size, size)`` uint8.

    Returns the array and ``(index, reason)`` for every image that failed (its slot stays zero).
    ``workers`` processes (at most the CPU count; 1 decodes in this process).
    """
    from tqdm import tqdm

    n = len(items)
    out = np.zeros((n, channels, size, size), dtype=np.uint8)
    tasks = [(i, list(items[i: i + _CHUNK]), size, channels) for i in range(0, n, _CHUNK)]
    workers = max(1, min(int(workers), os.cpu_count() or 1, len(tasks)))
    errors: list[tuple[int, str]] = []
    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False, dynamic_ncols=True)
    try:
        if workers == 1:
            results = map(_decode_chunk, tasks)
            pool = None
        else:
            pool = _context().Pool(workers)
            results = pool.imap_unordered(_decode_chunk, tasks)
        try:
            for start, arr, errs in results:
                out[start: start + len(arr)] = arr
                errors.extend(errs)
                bar.update(len(arr))
                if on_chunk is not None:
                    on_chunk(len(arr))
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
    finally:
        bar.close()
    errors.sort()
    return out, errors
