"""Decoding image files into one ``uint8`` array, in parallel worker processes.

Every image is converted to RGB (or L), resized so its shorter side is ``size`` and centre-cropped
to ``size x size``.  Downscaling uses Pillow's BOX filter (the area average, as in
Downsampled-ImageNet), so 64 -> 32 averages 2x2 blocks exactly; upscaling (rare) uses BICUBIC.

Decompression bombs: a file that claims more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels is
refused from its header, before any pixel is decoded (Pillow itself only refuses above twice that).
"""
from __future__ import annotations

import contextlib
import io
import multiprocessing as mp
import os
import sys
import warnings
from typing import Callable, Sequence

import numpy as np

_CHUNK = 512  # images per task: large enough to amortise the pickling, small enough for a smooth bar


class DecodeError(ValueError):
    """One image could not be decoded; the message says why."""


@contextlib.contextmanager
def _no_bomb_warning(Image):
    # decode_bytes checks the size against the limit Pillow only warns about, and refuses
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def image_header(data: bytes) -> tuple[int, int]:
    """``(width, height)`` from the header alone."""
    from PIL import Image

    try:
        with _no_bomb_warning(Image), Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad files
        raise DecodeError(f"{type(e).__name__}: {e}") from e


def decode_bytes(data: bytes, size: int, channels: int = 3) -> np.ndarray:
    """Decode ``data`` into a ``(size, size, channels)`` uint8 array (see the module docstring)."""
    from PIL import Image

    mode = "RGB" if channels == 3 else "L"
    try:
        with _no_bomb_warning(Image), Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            limit = Image.MAX_IMAGE_PIXELS
            if limit and w * h > limit:
                raise DecodeError(
                    f"claims {w}x{h} pixels, over PIL.Image.MAX_IMAGE_PIXELS={limit} (a decompression bomb?)"
                )
            img = img.convert(mode)
    except DecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - OSError, SyntaxError, DecompressionBombError, ...
        raise DecodeError(f"{type(e).__name__}: {e}") from e
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


def _decode_chunk(task: tuple) -> tuple[int, np.ndarray, list[tuple[int, str]]]:
    start, items, size, channels = task
    out = np.zeros((len(items), channels, size, size), dtype=np.uint8)
    errors: list[tuple[int, str]] = []
    for k, item in enumerate(items):
        try:
            if isinstance(item, str):  # a file path: read in the worker
                with open(item, "rb") as f:
                    item = f.read()
            out[k] = decode_bytes(item, size, channels).transpose(2, 0, 1)
        except (DecodeError, OSError) as e:
            errors.append((start + k, str(e)))
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
