"""Downloading and unpacking data sets, atomically.

Files are fetched into a temporary name next to the destination, checked (MD5 when known) and
only then renamed into place, so an interrupted download never leaves a file that looks complete.
Archives are extracted into a temporary directory beside the target and renamed into place.
Nothing here is called by the tests (no network access is assumed).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from typing import Sequence

from ..errors import DataError


class DownloadError(DataError, RuntimeError):
    """No URL gave the file (network error or checksum mismatch); the message lists every URL tried."""

_CHUNK = 1 << 22


def file_digest(path: str, algorithm: str = "md5") -> str:
    """Hex digest of a file, read in 4 MiB blocks (md5 for the published checksums, sha256 for cache keys)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def md5sum(path: str) -> str:
    return file_digest(path, "md5")


def download_file(
    urls: str | Sequence[str],
    dest: str,
    md5: str | None = None,
    timeout: float = 60.0,
    progress: bool = True,
) -> str:
    """Download the first working URL of ``urls`` to ``dest`` atomically and return ``dest``.

    An existing ``dest`` with the right checksum is kept.  Raises :class:`DownloadError` listing
    every URL tried when all fail (network error or checksum mismatch).
    """
    if isinstance(urls, str):
        urls = [urls]
    if os.path.isfile(dest) and (md5 is None or md5sum(dest) == md5):
        return dest
    d = os.path.dirname(os.path.abspath(dest))
    os.makedirs(d, exist_ok=True)
    errors: list[str] = []
    for url in urls:
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(dest) + ".", suffix=".part", dir=d)
        try:
            with os.fdopen(fd, "wb") as out:
                _fetch(url, out, timeout, progress)
            if md5 is not None:
                got = md5sum(tmp)
                if got != md5:
                    raise ValueError(f"MD5 mismatch: expected {md5}, got {got}")
            os.replace(tmp, dest)
            return dest
        except (urllib.error.URLError, OSError, ValueError) as e:
            errors.append(f"{url}: {e}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise DownloadError(f"could not download {os.path.basename(dest)}:\n  " + "\n  ".join(errors))


def _fetch(url: str, out, timeout: float, progress: bool) -> None:
    req = urllib.request.Request(url, headers={"User-Agent": "kdarena"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        total = int(resp.headers.get("Content-Length") or 0)
        done = 0
        show = progress and sys.stderr.isatty()
        while True:
            block = resp.read(_CHUNK)
            if not block:
                break
            out.write(block)
            done += len(block)
            if show and total:
                sys.stderr.write(f"\rdownloading {url}: {100 * done / total:5.1f}%")
                sys.stderr.flush()
        if show and total:
            sys.stderr.write("\n")
        if total and done != total:
            raise OSError(f"connection closed after {done} of {total} bytes")


def _safe_members(tar: tarfile.TarFile, dest: str) -> list[tarfile.TarInfo]:
    dest = os.path.realpath(dest)
    members = []
    for m in tar.getmembers():
        target = os.path.realpath(os.path.join(dest, m.name))
        if os.path.isabs(m.name) or not (target == dest or target.startswith(dest + os.sep)):
            raise DataError(f"refusing to extract {m.name!r}: path leaves the target directory")
        if not (m.isfile() or m.isdir()):
            raise DataError(f"refusing to extract {m.name!r}: not a regular file or directory")
        members.append(m)
    return members


def extract_tar(archive: str, dest_dir: str, top: str) -> str:
    """Extract ``archive`` (whose contents live under the directory ``top``) into ``dest_dir``.

    Extraction happens in a temporary directory inside ``dest_dir``; ``top`` is renamed into
    place at the end, so ``dest_dir/top`` either is complete or does not exist.  Members with
    absolute paths, ``..`` or links are refused.  Returns ``dest_dir/top``.
    """
    os.makedirs(dest_dir, exist_ok=True)
    final = os.path.join(dest_dir, top)
    tmp = tempfile.mkdtemp(prefix=".extract-", dir=dest_dir)
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = _safe_members(tar, tmp)
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(tmp, members=members, filter="data")
                else:  # pragma: no cover - Python without extraction filters
                    tar.extractall(tmp, members=members)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DataError(f"{archive}: corrupt or truncated archive ({e})") from e
        src = os.path.join(tmp, top)
        if not os.path.isdir(src):
            raise DataError(f"{archive}: expected a top-level directory {top!r} in the archive")
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(src, final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download_and_extract(
    urls: str | Sequence[str], dest_dir: str, top: str, md5: str | None = None, keep_archive: bool = False
) -> str:
    """Download a tar archive into ``dest_dir``, extract its ``top`` directory, return its path."""
    first = urls if isinstance(urls, str) else urls[0]
    archive = os.path.join(dest_dir, os.path.basename(first.split("?")[0]))
    download_file(urls, archive, md5=md5)
    out = extract_tar(archive, dest_dir, top)
    if not keep_archive:
        try:
            os.unlink(archive)
        except OSError:
            pass
    return out
