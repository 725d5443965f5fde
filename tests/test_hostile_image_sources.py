"""Fault injection, round three (issue #27), the data side: image folders, zips, tars and the
decoded-image cache under hostile input.  Every data set is a few tiny images written by the test.

Each test is one case of the issue (numbered as there) and failed on the code before its fix:
links and special files in folders (1, 2), the zip byte budget and zip links (3), the cache key
(4), damaged manifests (5), ordinary archives that gave tracebacks (6), the image size (7), stale
folder caches and ``kdarena data cache`` (8), and the small messages of point 10.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tarfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_runs_survive_faults import _isolate, assert_one_line_error, cli, stopped_run  # noqa: E402
from test_image_archives import bomb_png, tar_of, write_folder, zip_of  # noqa: E402

from kdarena.data import cache_admin, image_cache  # noqa: E402
from kdarena.data.decode import MAX_PIXELS, decode_item  # noqa: E402
from kdarena.data.errors import BadImageError, ImageDataError  # noqa: E402
from kdarena.data.imagefolder import ImageFolder  # noqa: E402
from kdarena.data.images import load_image_set  # noqa: E402
from kdarena.errors import UserError  # noqa: E402

__all__ = ["_isolate"]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KDARENA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("KDARENA_DATA", raising=False)
    return tmp_path / "cache"


@contextmanager
def no_hang(seconds: int = 60):
    """Fail (instead of blocking the suite) if the body does not return in ``seconds``."""
    def stop(*_):
        raise AssertionError(f"blocked for {seconds} s")
    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def load(root, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("workers", 1)
    return load_image_set(str(root), **kw)


def solid(value: int, size: int = 8) -> Image.Image:
    return Image.fromarray(np.full((size, size, 3), value, np.uint8))


def two_classes(root: Path, per_split: int = 4) -> Path:
    """train/ and val/ with classes a (pixels 10) and b (pixels 200): a label is checkable from the pixels."""
    for split in ("train", "val"):
        for c, value in (("a", 10), ("b", 200)):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for k in range(per_split):
                solid(value).save(root / split / c / f"{k}.png")
    return root


def assert_labels_follow_pixels(train, classes=("a", "b"), values=(10, 200)):
    for img, y in zip(train.images, train.labels):
        assert int(img.float().mean()) == values[list(classes).index(train.classes[int(y)])]


# ============================================================================== 1. links in folders
def test_symlink_loop_neither_multiplies_nor_mislabels(tmp_path):
    root = two_classes(tmp_path / "f")
    os.symlink("..", root / "train" / "a" / "loop")  # train/a/loop -> train: was 328 images, all class a
    os.symlink("../b", root / "train" / "a" / "b_too")  # a link to another class's folder
    with pytest.warns(UserWarning, match=r"train/a/loop: a link to a folder.*copy the files in"):
        tr, te, info = load(root)
    assert len(tr) == 8 and info.counts == {"train": [4, 4], "test": [4, 4]}
    assert_labels_follow_pixels(tr)
    with pytest.warns(UserWarning, match="train: skipped 2 entries .*a/loop: a link to a folder"):  # streamed: the same walk
        streamed = ImageFolder(str(root / "train"), 8)
    assert len(streamed) == 8 and streamed.targets == [0] * 4 + [1] * 4


def test_file_links_count_inside_the_root_only(tmp_path):
    root = two_classes(tmp_path / "f")
    outside = tmp_path / "outside.png"
    solid(10).save(outside)
    os.symlink(outside, root / "train" / "a" / "out.png")
    os.symlink("0.png", root / "train" / "a" / "again.png")  # inside the root: an image of class a
    with pytest.warns(UserWarning, match="out.png: a link out of the data root"):
        tr, _, info = load(root)
    assert info.counts["train"] == [5, 4]
    assert_labels_follow_pixels(tr)


def test_a_split_folder_linked_from_outside_is_refused_when_streamed_too(tmp_path, capsys):
    elsewhere = two_classes(tmp_path / "elsewhere")
    root = tmp_path / "f"
    (root / "val").mkdir(parents=True)
    shutil.copytree(elsewhere / "val", root / "val", dirs_exist_ok=True)
    os.symlink(elsewhere / "train", root / "train")
    with pytest.warns(UserWarning, match="train: a link out of the data root"), pytest.raises(ImageDataError, match="expected train/"):
        load(root)  # in memory: the link is skipped
    from kdarena.config import load as load_config
    from kdarena.data.build import build_data
    config = load_config(None, ["data.name=imagefolder", f"data.root={root}", "data.cache_max_gb=0", "data.val_size=0",
                                "data.batch_size=2", "data.num_workers=0", "train.progress=false"])
    with pytest.raises(ImageDataError, match=r"train is a link out of the data root .*point data.root at"):
        build_data(config, torch.device("cpu"))  # streamed: refused too, not walked


# ============================================================================== 2. FIFOs and devices
def test_fifo_and_dev_zero_named_png_neither_hang_nor_exhaust_memory(tmp_path):
    root = two_classes(tmp_path / "f")
    os.mkfifo(root / "train" / "b" / "x.png")
    os.symlink("/dev/zero", root / "train" / "b" / "z.png")
    with no_hang(), pytest.warns(UserWarning) as caught:
        tr, _, info = load(root)
        ImageFolder(str(root / "train"), 8)
    note = str(caught[0].message)
    assert "x.png: not a regular file" in note and "z.png: a link out of the data root (to /dev/zero)" in note
    assert info.counts["train"] == [4, 4]


def test_a_file_swapped_for_a_fifo_after_the_walk_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "late.png"
    os.mkfifo(fifo)
    with no_hang(), pytest.raises(OSError, match="not a regular file"):
        decode_item(str(fifo), 8)


# ============================================================================== 3. the zip byte budget, zip links
class Zeros:
    """A file object of ``n`` zero bytes (an archive member that compresses to almost nothing)."""

    def __init__(self, n: int):
        self.left = n

    def read(self, k: int = -1) -> bytes:
        k = self.left if k < 0 else min(k, self.left)
        self.left -= k
        return bytes(k)


def with_zero_member(folder: Path, out: Path, n: int) -> Path:
    name = "ds/train/a/huge.jpg"
    if out.suffix == ".zip":
        zip_of(folder, out)
        with zipfile.ZipFile(out, "a", zipfile.ZIP_DEFLATED) as z, z.open(name, "w", force_zip64=True) as w:
            src = Zeros(n)
            while block := src.read(1 << 20):
                w.write(block)
    else:
        tar_of(folder, out)
        with tarfile.open(out, "a") as tar:
            info = tarfile.TarInfo(name)
            info.size = n
            tar.addfile(info, Zeros(n))
    return out


@pytest.mark.parametrize("suffix", [".zip", ".tar"])
def test_archive_member_over_the_budget_is_refused_before_it_is_read(tmp_path, suffix, monkeypatch):
    archive = with_zero_member(two_classes(tmp_path / "f"), tmp_path / f"big{suffix}", 50_000_000)
    reads = []
    monkeypatch.setattr(zipfile.ZipFile, "read", lambda self, *a: reads.append(a) or b"")
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda self, m: reads.append(m.name) or None)
    with pytest.raises(ImageDataError) as e:
        load(archive, cache_max_gb=0.01)
    msg = str(e.value)
    assert "\n" not in msg and "huge.jpg" in msg and "memory budget of data.cache_max_gb=0.01" in msg and "corrupt" not in msg
    assert not any("huge" in str(r) for r in reads)  # refused from the header: the 50 MB were never read


def test_zip_symlink_member_is_skipped_like_a_tar_link(tmp_path):
    folder = two_classes(tmp_path / "f")
    archive = zip_of(folder, tmp_path / "links.zip")
    link = zipfile.ZipInfo("ds/train/a/link.png")
    link.create_system, link.external_attr = 3, (0o120777 << 16)  # a Unix symlink, as `zip -y` writes it
    with zipfile.ZipFile(archive, "a") as z:
        z.writestr(link, "../../../../etc/passwd")
    with pytest.warns(UserWarning, match="link.png: a link"):
        tr, _, info = load(archive)
    assert info.counts["train"] == [4, 4]


# ============================================================================== 4. skip_bad_images in the key
def test_a_strict_run_never_gets_the_cache_a_skipping_run_filtered(tmp_path):
    root = two_classes(tmp_path / "f")
    (root / "train" / "a" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    archive = zip_of(root, tmp_path / "ds.zip")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        tr, _, info = load(archive, skip_bad=True)
    assert len(tr) == 8 and not info.from_cache
    with pytest.raises(BadImageError, match="bad.png.*data.skip_bad_images=true"):
        load(archive)
    assert load(archive, skip_bad=True)[2].from_cache


# ============================================================================== 5. damaged manifests
@pytest.mark.parametrize("damage", ["[]", "null", "no mean", "mean of text", "no classes", "labels out of range", "{"])
def test_damaged_manifest_is_rebuilt_with_a_warning(tmp_path, damage):
    archive = tar_of(two_classes(tmp_path / "f"), tmp_path / "ds.tar")
    tr, _, info = load(archive)
    mpath = Path(info.cache) / "manifest.json"
    manifest = json.loads(mpath.read_text())
    if damage == "no mean":
        del manifest["mean"]
    elif damage == "mean of text":
        manifest["mean"] = ["x", "y", "z"]
    elif damage == "no classes":
        manifest["classes"] = manifest["class_names"] = []
    elif damage == "labels out of range":
        manifest["classes"] = manifest["class_names"] = ["a"]  # the arrays hold label 1
    text = {"[]": "[]", "null": "null", "{": "{"}.get(damage, json.dumps(manifest))
    mpath.write_text(text)
    with pytest.warns(UserWarning, match=r"decoded-image cache .* is damaged"):
        tr2, _, info2 = load(archive)
    assert not info2.from_cache and torch.equal(tr2.images, tr.images) and info2.classes == ["a", "b"]
    assert load(archive)[2].from_cache  # repaired


# ============================================================================== 6. ordinary archives, tracebacks before
@pytest.mark.parametrize("style", ["./", "backslash"])
def test_zip_member_names_with_dot_slash_or_backslashes(tmp_path, style):
    folder = two_classes(tmp_path / "f")
    archive = tmp_path / f"{style[0]}.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted(folder.rglob("*.png")):
            rel = p.relative_to(folder).as_posix()
            z.write(p, "./" + rel if style == "./" else rel.replace("/", "\\"))
    tr, te, info = load(archive)
    assert info.counts == {"train": [4, 4], "test": [4, 4]}
    assert_labels_follow_pixels(tr)


def corrupt_crc(archive: Path, member_bytes: bytes) -> None:
    raw = bytearray(archive.read_bytes())
    at = raw.find(member_bytes)
    raw[at + len(member_bytes) // 2] ^= 0xFF  # a stored member's data: same size, wrong CRC
    archive.write_bytes(bytes(raw))


def test_zip_with_a_bad_crc_is_one_line_through_inspect_and_eval(tmp_path, capsys):
    folder = write_folder(tmp_path / "ds", per_class=6)
    archive = zip_of(folder, tmp_path / "ds.zip")
    run_dir = stopped_run(tmp_path, capsys, 1, "data.name=imagefolder", f"data.root={archive}", "data.train_subset=null",
                          "data.val_size=0", "data.batch_size=4", "data.num_workers=1", "method.name=independent",
                          "perturb.enabled=false")
    corrupt_crc(archive, (folder / "train" / "dog" / "3.png").read_bytes())
    code, err = cli(capsys, "data", "inspect", str(archive), "--out", str(tmp_path / "g.png"))
    assert_one_line_error(code, err, f"{archive}:ds/train/dog/3.png", "corrupt zip member", "Bad CRC-32")
    code, err = cli(capsys, "eval", str(run_dir / "checkpoints" / "last.pt"))
    assert_one_line_error(code, err, "ds/train/dog/3.png", "corrupt zip member")


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_split_folders_without_class_folders_are_one_line(tmp_path, kind):
    for split in ("train", "val"):
        (tmp_path / "f" / split).mkdir(parents=True)
        solid(10).save(tmp_path / "f" / split / "0.png")  # images, but no class folder
    root = tmp_path / "f" if kind == "folder" else zip_of(tmp_path / "f", tmp_path / "f.zip")
    with pytest.raises(ImageDataError) as e:
        load(root)
    assert "train/ holds no class folders" in str(e.value) and "train/CLASS/*.jpg" in str(e.value)


# ============================================================================== 7. the image size
def test_one_odd_image_does_not_set_the_size_of_the_set(tmp_path):
    root = tmp_path / "f"
    for split in ("train", "val"):
        for c, value in (("a", 10), ("b", 200)):
            (root / split / c).mkdir(parents=True)
            for k in range(6):
                solid(value, 48).save(root / split / c / f"{k}.png")
    solid(10, 1).save(root / "train" / "a" / "000.png")  # sorts first: the old probe read only this one
    with pytest.warns(UserWarning, match=r"1 of 25 images .* other than 48 px \(first: .*000.png, 1x1\).*data.image_size"):
        tr, _, info = load(root)
    assert info.image_size == 48 and tr.image_shape == (3, 48, 48)
    assert load(root)[2].image_size == 48  # and that is what is remembered
    assert load(root, image_size=16)[2].image_size == 16  # stated: no guess


# ============================================================================== 8. stale folder caches, kdarena data cache
def ppm(value: int) -> bytes:
    """A binary PPM: its size depends only on its dimensions, so a replacement can keep the old size."""
    return b"P6 8 8 255\n" + bytes([value]) * 192


def test_a_file_replaced_with_its_old_size_and_mtime_is_not_served_stale(tmp_path):
    root = two_classes(tmp_path / "f")
    target = root / "train" / "a" / "p.ppm"
    target.write_bytes(ppm(10))
    first = load(root)[2]
    st = target.stat()
    replacement = tmp_path / "new.ppm"
    replacement.write_bytes(ppm(99))
    os.utime(replacement, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(replacement, target)  # what cp -p / rsync do: same size, same mtime, new pixels
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns
    tr, _, info = load(root)
    assert not info.from_cache and 99 in [int(img[0, 0, 0]) for img in tr.images]
    assert not Path(first.cache).exists()  # the superseded entry is gone, not left behind


def test_content_fingerprint_ignores_metadata_and_sees_bytes(tmp_path):
    root = two_classes(tmp_path / "f")
    assert not load(root, fingerprint="content")[2].from_cache
    os.chmod(root / "train" / "a" / "0.png", 0o600)  # a new ctime, the same bytes
    assert load(root, fingerprint="content")[2].from_cache
    assert not load(root)[2].from_cache  # stat mode: a changed ctime is a changed file
    solid(11).save(root / "train" / "a" / "0.png")
    assert not load(root, fingerprint="content")[2].from_cache


def test_data_cache_lists_and_prunes_stale_entries(tmp_path, capsys, cache):
    kept = load(two_classes(tmp_path / "kept"))[2]
    gone = load(two_classes(tmp_path / "gone"))[2]
    damaged = load(tar_of(two_classes(tmp_path / "t"), tmp_path / "t.tar"))[2]
    (Path(damaged.cache) / "manifest.json").write_text("[]")
    shutil.rmtree(tmp_path / "gone")
    assert cli(capsys, "data", "cache", "--list")[0] == 0
    listing = cache_admin.entries()
    stale = {os.path.basename(e.path): e.problem for e in listing if e.problem}
    assert os.path.basename(gone.cache) in stale and "is gone" in stale[os.path.basename(gone.cache)]
    assert "damaged" in stale[os.path.basename(damaged.cache)]
    assert os.path.basename(kept.cache) not in stale
    code = cli(capsys, "data", "cache", "--prune")[0]
    assert code == 0 and Path(kept.cache).exists()
    assert not Path(gone.cache).exists() and not Path(damaged.cache).exists()
    assert all(not e.problem for e in cache_admin.entries())
    assert cli(capsys, "data", "cache", "--prune", "--all")[0] == 0 and not cache_admin.entries()


def test_data_cache_list_prints_each_entry(tmp_path, capsys):
    load(two_classes(tmp_path / "f"))
    capsys.readouterr()
    from kdarena.cli import main
    assert main(["data", "cache"]) == 0
    out = capsys.readouterr().out
    assert "3x8x8, 8 + 8 images" in out and str(tmp_path / "f") in out and "0 stale" in out


# ============================================================================== 10. small ones
def test_eval_of_a_folder_or_dev_null_says_what_it_is(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.pt").write_bytes(b"")
    code, err = cli(capsys, "eval", str(tmp_path / "run"))
    assert_one_line_error(code, err, "is a folder, not a checkpoint file", str(tmp_path / "run" / "checkpoints" / "last.pt"))
    code, err = cli(capsys, "eval", "/dev/null")
    assert_one_line_error(code, err, "/dev/null", "is not a regular file")
    fifo = tmp_path / "ckpt.pt"
    os.mkfifo(fifo)
    with no_hang():
        code, err = cli(capsys, "eval", str(fifo))
    assert_one_line_error(code, err, "is not a regular file")


@pytest.mark.parametrize("argv, needle", [
    (["--image-size", "-1"], "image size -1 must be a positive number of pixels"),
    (["--image-size", "0"], "image size 0 must be a positive number of pixels"),
    (["--cache-max-gb", "nan"], "data.cache_max_gb=nan must be a number of GB >= 0"),
    (["--cache-max-gb", "-1"], "data.cache_max_gb=-1.0 must be a number of GB >= 0"),
])
def test_bad_inspect_options_are_one_line(tmp_path, capsys, argv, needle):
    root = two_classes(tmp_path / "f")
    code, err = cli(capsys, "data", "inspect", str(root), *argv)
    assert_one_line_error(code, err, needle)


def test_cache_max_gb_nan_in_a_config_is_refused(tmp_path, capsys):
    from kdarena.config import ConfigError, load as load_config
    with pytest.raises(ConfigError, match="data.cache_max_gb"):
        load_config(None, ["data.cache_max_gb=nan"])


def test_messages_name_the_file_not_a_bytesio(tmp_path):
    root = two_classes(tmp_path / "f")
    (root / "train" / "b" / "noise.png").write_bytes(os.urandom(300))
    archive = zip_of(root, tmp_path / "ds.zip")
    for source in (root, archive):
        with pytest.raises(BadImageError) as e:
            load(source)
        msg = str(e.value)
        assert "noise.png" in msg and "<_io." not in msg and "not an image Pillow can read" in msg


@pytest.mark.parametrize("side", [12000, 60000])  # over kdarena's limit; over twice Pillow's (refused inside Pillow)
def test_pixel_bomb_message_quotes_kdarenas_limit(tmp_path, side):
    root = two_classes(tmp_path / "f")
    (root / "train" / "a" / "bomb.png").write_bytes(bomb_png(side, side))
    with pytest.raises(BadImageError) as e:
        load(zip_of(root, tmp_path / "b.zip"))
    msg = str(e.value)
    assert "bomb.png" in msg and f"kdarena's limit of {MAX_PIXELS:,} pixels" in msg and f"{side * side:,}" in msg
    with pytest.raises(BadImageError, match="kdarena's limit"):  # the streamed reader too
        streamed = ImageFolder(str(root / "train"), 8)
        streamed.load([p for p, _ in streamed.samples].index(str(root / "train" / "a" / "bomb.png")))


def test_every_error_here_is_a_user_error():
    assert issubclass(ImageDataError, UserError) and issubclass(BadImageError, UserError)
    assert issubclass(ImageDataError, ValueError)  # code catching the old type still catches it
