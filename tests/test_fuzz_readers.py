"""Property-based fuzz of the image readers (issue #27): random trees of files, folders, links,
FIFOs, damaged images and pixel bombs, read as a folder, a tar and a zip (with ``./``, ``\\``
and climbing member names, and truncated archives), under a tight and a loose memory budget.

The property: ``load_image_set`` returns within a bound, and either loads, or raises a
:class:`~kdarena.errors.UserError` whose message is one line.  When it loads, every image
carries the label of the class folder it was written in (its pixels encode where it was placed),
it appears no more often than it was placed, and an untruncated source loads exactly what was
placed (nothing more, nothing less).

In the suite it tries 40 trees per source kind; ``KDARENA_FUZZ_EXAMPLES=5000`` tries more (the
count tried is printed with ``-s``; see RELIABILITY.md).
"""
from __future__ import annotations

import io
import os
import signal
import sys
import tarfile
import tempfile
import warnings
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("PIL")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_image_archives import bomb_png  # noqa: E402

from kdarena.data.images import load_image_set  # noqa: E402
from kdarena.errors import UserError  # noqa: E402

EXAMPLES = int(os.environ.get("KDARENA_FUZZ_EXAMPLES", "40"))
TRIED = Counter()

SPLITS = ["train", "train", "val", "test", "junk", ".hid"]
CLASSES = ["a", "b", "ü", "c d", ".h", "a"]
NAMES = ["0.png", "1.PNG", "x.jpg", "n.txt", "noext", ".dot.png", "é.png", "wnids.txt"]
KINDS = ["image"] * 6 + ["bad", "empty", "bomb", "dir", "link_up", "link_file", "link_out", "link_dev", "link_broken", "fifo"]


def png(pixel_id: int) -> bytes:
    """An 8x8 PNG whose red channel is ``pixel_id`` (where it was placed is looked up from it)."""
    arr = np.zeros((8, 8, 3), np.uint8)
    arr[..., 0], arr[..., 1] = pixel_id, 77
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


entry = st.tuples(st.sampled_from(SPLITS), st.sampled_from(CLASSES), st.sampled_from(NAMES), st.sampled_from(KINDS),
                  st.booleans())  # (split, class, name, kind, one folder deeper)
tree = st.lists(entry, min_size=1, max_size=14)


def hidden(parts) -> bool:
    return any(p.startswith(".") for p in parts)


def is_image_name(name: str) -> bool:
    return name.lower().endswith((".png", ".jpg"))


def write_tree(root: Path, entries, kind: str) -> dict[str, Counter]:
    """Write ``entries`` under ``root``; returns, per image id, the (split, class) placements a reader must honour."""
    placed: dict[int, Counter] = {}
    written: list[tuple[Path, int]] = []  # (path, pixel id) of every image written
    next_id = 1
    root.mkdir()
    for split, cls, name, what, deeper in entries:
        folder = root / split / cls / ("sub" if deeper else "")
        if what == "dir":
            if not os.path.lexists(folder / name):  # a file, FIFO or link may hold the name already
                (folder / name).mkdir(parents=True)
            continue
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        if path.exists() or path.is_symlink():
            continue
        counted = not hidden([split, cls, name]) and is_image_name(name)
        if what == "image":
            pixel_id, next_id = next_id, next_id + 1
            path.write_bytes(png(pixel_id))
            written.append((path, pixel_id))
            if counted:
                placed.setdefault(pixel_id, Counter())[(split, cls)] += 1
        elif what in ("bad", "empty", "bomb"):
            path.write_bytes({"bad": b"\x89PNG\r\n\x1a\n damaged", "empty": b"", "bomb": bomb_png(30000, 30000)}[what])
        elif what == "fifo":
            if kind == "zip":
                continue  # a zip cannot hold one
            os.mkfifo(path)
        else:
            target = {"link_up": "..", "link_out": "/etc/hostname", "link_dev": "/dev/zero", "link_broken": "nowhere",
                      "link_file": None}[what]
            if what == "link_file":
                if not written:
                    continue
                image, pixel_id = written[len(written) // 2]
                target = os.path.relpath(image, folder)
                if kind == "folder" and counted:  # a link inside the root counts where it is (archives skip links)
                    placed.setdefault(pixel_id, Counter())[(split, cls)] += 1
            os.symlink(target, path)
    return placed


def pack(root: Path, out: Path, kind: str, mangle: str) -> Path:
    paths = sorted(root.rglob("*"))
    if kind == "tar":
        with tarfile.open(out, "w") as tar:
            for p in paths:
                info = tar.gettarinfo(p, mangle_name(p.relative_to(root).as_posix(), mangle))
                with (open(p, "rb") if info.isreg() else io.BytesIO()) as f:
                    tar.addfile(info, f if info.isreg() else None)
        return out
    with zipfile.ZipFile(out, "w") as z:
        for p in paths:
            name = mangle_name(p.relative_to(root).as_posix(), mangle)
            if p.is_symlink():
                info = zipfile.ZipInfo(name)
                info.create_system, info.external_attr = 3, (0o120777 << 16)
                z.writestr(info, os.readlink(p))
            elif p.is_dir():
                z.writestr(zipfile.ZipInfo(name + "/"), b"")
            else:
                z.writestr(name, p.read_bytes())
    return out


def mangle_name(rel: str, mangle: str) -> str:
    return {"": rel, "dot": "./" + rel, "backslash": rel.replace("/", "\\"), "climb": "x/../../" + rel,
            "absolute": "/" + rel}[mangle]


class Blocked(Exception):
    pass


def bounded_load(path: Path, budget: float):
    def stop(*_):
        raise Blocked(f"load of {path} did not return in 30 s")
    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(30)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load_image_set(str(path), image_size=8, cache_max_gb=budget, workers=1, progress=False)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def check_one(entries, kind: str, mangle: str, cut: float | None, budget: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["KDARENA_CACHE"] = os.path.join(tmp, "cache")
        root = Path(tmp) / "ds"
        placed = write_tree(root, entries, kind)
        source = root if kind == "folder" else pack(root, Path(tmp) / f"ds.{kind}", kind, mangle)
        if cut is not None and kind != "folder":
            raw = source.read_bytes()
            source.write_bytes(raw[: int(len(raw) * cut)])
        TRIED[kind] += 1
        try:
            got = bounded_load(source, budget)
        except UserError as e:
            assert "\n" not in str(e), repr(str(e))
            return
        if got is None:
            assert kind == "folder", "only a folder is streamed"
            return
        assert mangle not in ("climb", "absolute"), "a member leaving the archive was read"
        train, test, info = got
        loaded = Counter()
        for ds, split in ((train, "train"), (test, info.test_split)):
            for img, y in zip(ds.images, ds.labels):
                pixel_id = int(img[0, 0, 0])
                assert int(img[1, 0, 0]) == 77, "an image kdarena did not write"
                where = (split, info.classes[int(y)])
                assert where in placed.get(pixel_id, {}), f"image {pixel_id} labelled {where}, placed {placed.get(pixel_id)}"
                loaded[(pixel_id, *where)] += 1
        want = Counter({(i, *w): n for i, c in placed.items() for w, n in c.items() if w[0] in ("train", info.test_split)})
        assert all(loaded[k] <= want[k] for k in loaded), "an image read more often than it was placed"
        if cut is None:
            assert loaded == want, f"loaded {sorted(loaded)} but placed {sorted(want)}"


fuzz = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])


@pytest.fixture(autouse=True, scope="module")
def report_count():
    yield
    print(f"\nfuzzed trees tried: {dict(TRIED)} (KDARENA_FUZZ_EXAMPLES={EXAMPLES} per kind)")


@fuzz
@given(entries=tree, budget=st.sampled_from([1e-6, 1.0]))
def test_fuzz_folder_reader(entries, budget):
    check_one(entries, "folder", "", None, budget)


@pytest.mark.parametrize("kind", ["tar", "zip"])
@fuzz
@given(entries=tree, mangle=st.sampled_from(["", "", "dot", "backslash", "climb", "absolute"]),
       cut=st.one_of(st.none(), st.none(), st.floats(0.0, 1.0)), budget=st.sampled_from([1e-6, 1.0]))
def test_fuzz_archive_readers(kind, entries, mangle, cut, budget):
    check_one(entries, kind, mangle, cut, budget)
