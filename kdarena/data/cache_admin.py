"""``kdarena data cache --list / --prune``: what the decoded-image cache holds, and removing what is stale.

An entry (a folder of :mod:`kdarena.data.image_cache`) is *stale* when its manifest is missing or
damaged (or of an older :data:`~kdarena.data.image_cache.FORMAT`), or when its source is gone or no
longer has the fingerprint the arrays were decoded from.  Size notes (``KEY.size.json``) follow
the same rule, and temporary files left by a killed writer are stale after an hour.  When a new
entry is written, the entries of the same source with another fingerprint are removed at once
(:func:`drop_superseded`): a changed data set never leaves its old arrays behind.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass

from . import image_cache

_TMP_AGE_S = 3600


@dataclass
class Entry:
    path: str
    bytes: int
    source: str | None  # None when the manifest or note cannot be read
    fingerprint: str | None
    what: str  # "3x32x32, 120 + 30 images" for a cache folder, "size note" for a note
    problem: str  # "" when valid and current, else why it is stale


def _disk_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, files in os.walk(path) for f in files)


def _current(source: str | None, fingerprint: str | None) -> str:
    """'' when ``source`` still has ``fingerprint``, else why not."""
    if not source or not os.path.exists(source):
        return f"source {source} is gone"
    mode = "content" if (fingerprint or "").startswith("folder-content:") else "stat"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the walk's note about skipped links belongs to a training run
            now = image_cache.source_fingerprint(source, mode=mode)
    except (OSError, ValueError) as e:
        return f"source {source} cannot be read ({e})"
    return "" if now == fingerprint else f"source {source} has changed"


def _folder_entry(path: str, check_sources: bool) -> Entry:
    try:
        m = image_cache.read_manifest(path)
    except (OSError, ValueError) as e:
        return Entry(path, _disk_bytes(path), None, None, "?", f"damaged or old manifest ({e})")
    n_train, n_test = m.arrays["train_x"].shape[0], m.arrays["test_x"].shape[0]
    what = f"{m.channels}x{m.image_size}x{m.image_size}, {n_train} + {n_test} images{', skip_bad' if m.skip_bad else ''}"
    problem = _current(m.source, m.fingerprint) if check_sources else ""
    return Entry(path, _disk_bytes(path), m.source, m.fingerprint, what, problem)


def _note_entry(path: str, check_sources: bool) -> Entry:
    try:
        with open(path, encoding="utf-8") as f:
            note = json.load(f)
        source, fingerprint = str(note["source"]), str(note["fingerprint"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return Entry(path, _disk_bytes(path), None, None, "size note", f"damaged or old note ({type(e).__name__})")
    problem = _current(source, fingerprint) if check_sources else ""
    return Entry(path, _disk_bytes(path), source, fingerprint, "size note", problem)


def entries(check_sources: bool = True) -> list[Entry]:
    """Every entry of the cache (``check_sources``: re-fingerprint each source to tell if it is current)."""
    root = image_cache.images_dir()
    if not os.path.isdir(root):
        return []
    out = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if os.path.isdir(path) and not os.path.islink(path):
            out.append(_folder_entry(path, check_sources))
        elif name.endswith(".size.json"):
            out.append(_note_entry(path, check_sources))
        elif name.endswith(".tmp") and time.time() - os.path.getmtime(path) > _TMP_AGE_S:
            out.append(Entry(path, _disk_bytes(path), None, None, "temporary file", "left by a killed writer"))
    return out


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def prune(everything: bool = False) -> list[Entry]:
    """Remove stale entries (or, with ``everything``, all of them); returns what was removed."""
    removed = [e for e in entries(check_sources=not everything) if everything or e.problem]
    for e in removed:
        _remove(e.path)
    return removed


def drop_superseded(source: str, fingerprint: str) -> None:
    """Remove the entries of ``source`` decoded from another fingerprint (the data set changed since)."""
    for e in entries(check_sources=False):
        if e.source == source and e.fingerprint not in (None, fingerprint):
            _remove(e.path)


def report(listing: list[Entry], removed: bool = False) -> str:
    """The text ``kdarena data cache`` prints."""
    if not listing:
        return f"{'nothing removed from' if removed else 'no entries in'} {image_cache.images_dir()}"
    mb = lambda n: f"{n / 1e6:9.1f} MB"  # noqa: E731
    lines = [f"{mb(e.bytes)}  {os.path.basename(e.path):<44} {e.what:<34} {e.source or '-'}"
             + (f"  [{'removed: ' if removed else 'stale: '}{e.problem}]" if e.problem else "") for e in listing]
    total = sum(e.bytes for e in listing)
    stale = sum(1 for e in listing if e.problem)
    tail = (f"removed {len(listing)} entr{'y' if len(listing) == 1 else 'ies'}, {total / 1e6:.1f} MB" if removed
            else f"{len(listing)} entries, {total / 1e6:.1f} MB in {image_cache.images_dir()}; {stale} stale "
            "(kdarena data cache --prune removes them)")
    return "\n".join(lines + [tail])
