"""Image folders and archives (tar / tar.gz / zip), decode-once caching, Tiny-ImageNet layouts,
``kdarena data inspect``.  Every data set here is written by the test: a few tiny images."""
from __future__ import annotations

import io
import os
import re
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from kdarena.cli import main  # noqa: E402
from kdarena.data.decode import decode_bytes  # noqa: E402
from kdarena.data.imagefolder import BadImageError  # noqa: E402
from kdarena.data.images import load_image_set  # noqa: E402
from kdarena.data.sources import ImageDataError  # noqa: E402

CLASSES = ("cat", "dog", "owl")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A private decoded-image cache and no $KDARENA_DATA."""
    monkeypatch.setenv("KDARENA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("KDARENA_DATA", raising=False)
    return tmp_path / "cache"


def pixels(c: int, k: int, size: int = 8) -> np.ndarray:
    rng = np.random.default_rng(100 * c + k)
    arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    arr[..., c % 3] = 255  # a colour cue per class
    return arr


def write_folder(root: Path, classes=CLASSES, per_class=4, val_per_class=2, test_dir="val", ext="png") -> Path:
    for split, count in (("train", per_class), (test_dir, val_per_class)):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                Image.fromarray(pixels(c, k + (100 if split != "train" else 0))).save(d / f"{k}.{ext}")
    return root


def tar_of(folder: Path, out: Path, top: str | None = "ds") -> Path:
    with tarfile.open(out, "w:gz" if str(out).endswith("gz") else "w") as tar:
        tar.add(folder, arcname=top or ".")
    return out


def zip_of(folder: Path, out: Path, top: str = "ds") -> Path:
    with zipfile.ZipFile(out, "w") as z:
        for p in sorted(folder.rglob("*")):
            z.write(p, f"{top}/{p.relative_to(folder).as_posix()}" + ("/" if p.is_dir() else ""))
    return out


def load(root, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("workers", 1)
    return load_image_set(None if root is None else str(root), **kw)


# ------------------------------------------------------------------ folders and archives
def test_folder_tar_and_zip_give_the_same_arrays_and_the_second_load_is_cached(tmp_path):
    folder = write_folder(tmp_path / "ds")
    (tmp_path / "ds" / "train" / "cat" / "notes.txt").write_text("not an image")  # skipped: no image extension
    (tmp_path / "ds" / "train" / "dog" / ".DS_Store").write_bytes(b"\0\1")
    sources = [folder, tar_of(folder, tmp_path / "ds.tar.gz"), tar_of(folder, tmp_path / "ds.tar", top=None),
               zip_of(folder, tmp_path / "ds.zip")]
    first = load(sources[0], workers=2)
    tr, te, info = first
    assert info.classes == list(CLASSES) and len(tr) == 12 and len(te) == 6 and not info.from_cache
    assert tr.image_shape == (3, 8, 8) and info.counts == {"train": [4, 4, 4], "test": [2, 2, 2]}
    want = torch.from_numpy(pixels(1, 2).transpose(2, 0, 1).copy())
    assert torch.equal(tr.images[(tr.labels == 1).nonzero()[2, 0]], want)  # PNG is lossless: exact pixels
    for src in sources[1:]:
        tr2, te2, info2 = load(src)
        assert not info2.from_cache and info2.classes == info.classes
        assert torch.equal(tr2.images, tr.images) and torch.equal(te2.labels, te.labels)
    again = load(sources[1])
    assert again[2].from_cache and torch.equal(again[0].images, tr.images)


def test_wnids_fixes_the_class_order_and_test_dir_is_accepted(tmp_path):
    folder = write_folder(tmp_path / "ds", test_dir="test")
    (folder / "wnids.txt").write_text("owl\ncat\ndog\n")
    tr, te, info = load(folder)
    assert info.classes == ["owl", "cat", "dog"] and info.test_split == "test"
    owl = tr.images[tr.labels == 0]
    assert all(int(img[2].min()) == 255 for img in owl)  # owl (written as class 2) has the blue cue


def test_cache_rebuilt_when_a_file_changes(tmp_path):
    folder = write_folder(tmp_path / "ds")
    tr, _, info = load(folder)
    target = folder / "train" / "dog" / "0.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(target)
    os.utime(target, ns=(1, 1))  # a different mtime even on coarse clocks
    tr2, _, info2 = load(folder)
    assert not info2.from_cache and info2.cache != info.cache
    assert int(tr2.images[tr2.labels == 1][0].max()) == 0 and not torch.equal(tr2.images, tr.images)


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "drop_manifest"])
def test_damaged_cache_is_rebuilt_not_loaded(tmp_path, damage):
    archive = tar_of(write_folder(tmp_path / "ds"), tmp_path / "ds.tar.gz")
    tr, _, info = load(archive)
    f = Path(info.cache) / "train_x.npy"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:-40])
    elif damage == "flip_byte":
        raw = bytearray(f.read_bytes())
        raw[-1] ^= 0xFF  # same size and shape, different pixels: only the checksum can tell
        f.write_bytes(bytes(raw))
    else:
        (Path(info.cache) / "manifest.json").unlink()
    tr2, _, info2 = load(archive)
    assert not info2.from_cache and torch.equal(tr2.images, tr.images)
    assert load(archive)[2].from_cache  # repaired


def test_image_size_resizes_with_the_area_filter():
    img = np.kron(np.arange(16, dtype=np.uint8).reshape(4, 4) * 10, np.ones((2, 2), np.uint8))  # 8x8 of 2x2 blocks
    buf = io.BytesIO()
    Image.fromarray(np.stack([img] * 3, -1)).save(buf, format="PNG")
    out = decode_bytes(buf.getvalue(), 4)
    assert out.shape == (4, 4, 3) and np.array_equal(out[..., 0], np.arange(16).reshape(4, 4) * 10)
    wide = io.BytesIO()
    Image.fromarray(np.zeros((8, 16, 3), np.uint8)).save(wide, format="PNG")
    assert decode_bytes(wide.getvalue(), 4).shape == (4, 4, 3)  # shorter side to 4, centre crop


# ------------------------------------------------------------------ bad input: one-line errors
def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_corrupt_jpeg_names_the_file_or_is_skipped(tmp_path):
    folder = write_folder(tmp_path / "ds", ext="jpg")
    bad = folder / "train" / "owl" / "1.jpg"
    bad.write_bytes(bad.read_bytes()[:60])  # a truncated JPEG
    with pytest.raises(BadImageError) as e:
        load(folder)
    assert "1.jpg" in one_line(e) and "data.skip_bad_images=true" in str(e.value)
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        tr, _, info = load(folder, skip_bad=True)
    assert len(tr) == 11 and info.counts["train"] == [4, 4, 3]


def test_empty_class_is_an_error(tmp_path):
    folder = write_folder(tmp_path / "ds")
    (folder / "train" / "emu").mkdir()
    with pytest.raises(ImageDataError) as e:
        load(folder)
    assert "'emu' has no training images" in one_line(e)


def test_mismatched_train_and_val_classes(tmp_path):
    folder = write_folder(tmp_path / "ds")
    (folder / "val" / "owl").rename(folder / "val" / "bat")
    with pytest.raises(ImageDataError) as e:
        load(folder)
    assert "val/ has classes ['bat'] that train/ lacks" in one_line(e)


def test_no_split_folders(tmp_path):
    (tmp_path / "flat" / "cat").mkdir(parents=True)
    Image.fromarray(pixels(0, 0)).save(tmp_path / "flat" / "cat" / "a.png")
    with pytest.raises(ImageDataError, match="expected train/ and val/"):
        load(tmp_path / "flat")


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_member_climbing_out_of_the_archive_is_refused(tmp_path, kind):
    folder = write_folder(tmp_path / "ds")
    payload = (folder / "train" / "cat" / "0.png").read_bytes()
    if kind == "tar":
        archive = tar_of(folder, tmp_path / "evil.tar")
        with tarfile.open(archive, "a") as tar:
            info = tarfile.TarInfo("ds/train/cat/../../../evil.png")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    else:
        archive = zip_of(folder, tmp_path / "evil.zip")
        with zipfile.ZipFile(archive, "a") as z:
            z.writestr("../evil.png", payload)
    with pytest.raises(ImageDataError) as e:
        load(archive)
    assert "leaves the archive" in one_line(e) and not (tmp_path.parent / "evil.png").exists()


def bomb_png(width: int, height: int) -> bytes:
    """A ~60-byte PNG whose header claims width x height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [12000, 60000])  # over MAX_IMAGE_PIXELS (ours), and over 2x (Pillow's own error)
def test_decompression_bomb_is_refused_from_its_header(tmp_path, side):
    folder = write_folder(tmp_path / "ds")
    (folder / "train" / "dog" / "bomb.png").write_bytes(bomb_png(side, side))
    archive = zip_of(folder, tmp_path / "bomb.zip")
    with pytest.raises(BadImageError) as e:
        load(archive)
    msg = one_line(e)
    assert "bomb.png" in msg and ("decompression bomb" in msg or "DecompressionBomb" in msg)


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    folder = write_folder(tmp_path / "ds")
    (folder / "val" / "cat").rename(folder / "val" / "cow")
    assert main(["data", "inspect", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdarena: error:") and "\n" not in err and "cow" in err
    assert main(["data", "inspect", str(folder), "--name", "cifar10"]) == 2  # an in-memory set, not image files
    assert capsys.readouterr().err.strip() == ("kdarena: error: --name 'cifar10' names no image-set loader; "
                                               "give one of imagefolder, tiny_imagenet")


# ------------------------------------------------------------------ Tiny-ImageNet
def write_tiny_official(root: Path, wnids=("n01", "n02"), per_class=3, size=16) -> Path:
    top = root / "tiny-imagenet-200"
    (top / "val" / "images").mkdir(parents=True)
    (top / "test" / "images").mkdir(parents=True)
    (top / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (top / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\ttabby, tabby cat\n")
    rows = []
    for c, w in enumerate(wnids):
        d = top / "train" / w / "images"
        d.mkdir(parents=True)
        (top / "train" / w / f"{w}_boxes.txt").write_text("x\t0\t0\t1\t1\n")
        for k in range(per_class):
            Image.fromarray(pixels(c, k, size)).save(d / f"{w}_{k}.JPEG", format="JPEG", quality=95)
        for k in range(2):
            name = f"val_{c * 2 + k}.JPEG"
            Image.fromarray(pixels(c, 50 + k, size)).save(top / "val" / "images" / name, format="JPEG", quality=95)
            rows.append(f"{name}\t{w}\t0\t0\t{size}\t{size}")
    Image.fromarray(pixels(0, 99, size)).save(top / "test" / "images" / "test_0.JPEG", format="JPEG")
    (top / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")
    return top


def test_tiny_imagenet_official_layout_as_zip_with_resize(tmp_path):
    top = write_tiny_official(tmp_path / "raw")
    archive = zip_of(top, tmp_path / "tiny-imagenet-200.zip", top="tiny-imagenet-200")
    for root in (top, archive):
        tr, te, info = load(root, name="tiny_imagenet", image_size=8)
        assert info.classes == ["n01", "n02"] and info.class_names == ["goldfish", "tabby"]
        assert tr.image_shape == (3, 8, 8) and info.counts == {"train": [3, 3], "test": [2, 2]}  # test/ ignored
        assert te.labels.tolist() == [0, 0, 1, 1]  # from val_annotations.txt
    native = load(archive, name="tiny_imagenet")
    assert native[2].image_size == 16


def test_tiny_imagenet_download_is_read_from_the_cache(tmp_path, cache, monkeypatch):
    import kdarena.data.download as download

    zipped = zip_of(write_tiny_official(tmp_path / "raw"), tmp_path / "src.zip", top="tiny-imagenet-200")
    fetched = []

    def fake_fetch(url, out, timeout, progress):
        fetched.append(url)
        out.write(zipped.read_bytes())

    monkeypatch.setattr(download, "_fetch", fake_fetch)
    monkeypatch.setattr("kdarena.data.images.TINY_IMAGENET_MD5", download.md5sum(str(zipped)))
    with pytest.raises(ImageDataError, match="data.download=true"):
        load(None, name="tiny_imagenet")
    tr, _, info = load(None, name="tiny_imagenet", download=True, image_size=8)
    assert fetched == ["http://cs231n.stanford.edu/tiny-imagenet-200.zip"] and len(tr) == 6
    assert info.root == str(cache / "tiny-imagenet-200.zip")
    load(None, name="tiny_imagenet", image_size=8)  # found in the cache now: no second download
    assert len(fetched) == 1


# ------------------------------------------------------------------ training path and inspect
def test_build_data_trains_from_memory_with_cifar_style_defaults(tmp_path):
    from kdarena.config import ConfigError, load as load_config
    from kdarena.data.build import build_data
    from kdarena.data.tensor_loader import TensorLoader

    archive = tar_of(write_folder(tmp_path / "ds", per_class=6), tmp_path / "ds.tar.gz")
    base = ["data.name=imagefolder", f"data.root={archive}", "data.val_size=3", "data.batch_size=4",
            "data.num_workers=1", "train.progress=false"]
    bundle = build_data(load_config(None, base), torch.device("cpu"))
    assert isinstance(bundle.train, TensorLoader) and bundle.num_classes == 3 and bundle.classes == list(CLASSES)
    assert bundle.train.crop_padding == 1 and bundle.train.flip  # 8 px images: pad 8 // 8, flip on
    assert len(bundle.train.dataset) == 15 and len(bundle.val.dataset) == 3 and len(bundle.test.dataset) == 6
    custom = build_data(load_config(None, base + ["data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]"]), torch.device("cpu"))
    x, _ = next(iter(custom.test))
    raw = custom.test.dataset.images[: x.shape[0]].float() / 255
    assert torch.allclose(x, (raw - 0.5) / 0.25, atol=1e-5)
    with pytest.raises(ConfigError, match="data.mean=.*3-channel"):
        build_data(load_config(None, base + ["data.mean=[0.5]"]), torch.device("cpu"))
    streamed = build_data(load_config(None, base[:1] + [f"data.root={tmp_path / 'ds'}", "data.cache_max_gb=0"] + base[2:]),
                          torch.device("cpu"))
    assert type(streamed.train).__name__ == "FolderLoader"


def test_data_inspect_prints_the_summary_and_writes_the_grid(tmp_path, capsys):
    archive = zip_of(write_folder(tmp_path / "ds"), tmp_path / "ds.zip")
    png = tmp_path / "grid.png"
    assert main(["data", "inspect", str(archive), "--out", str(png), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "classes      3: cat, dog, owl" in out and "train        12 images, per class min 4 / median 4 / max 4" in out
    assert "3x8x8" in out and str(png) in out
    decode = lambda text: next(line for line in text.splitlines() if line.startswith("decode"))  # noqa: E731
    assert re.fullmatch(r"decode +\d+\.\d s \(decoded now\)", decode(out))  # one decode, one time (issue 37: two differed)
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] > 200
    assert main(["data", "inspect", str(archive), "--out", str(png)]) == 0
    assert re.fullmatch(r"decode +\d+\.\d s when first decoded; loaded from the cache in \d+\.\d s", decode(capsys.readouterr().out))


def test_root_found_through_kdarena_data(tmp_path, monkeypatch):
    (tmp_path / "store").mkdir()
    archive = tar_of(write_folder(tmp_path / "ds"), tmp_path / "store" / "mine.tar.gz")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDARENA_DATA", str(tmp_path / "store"))
    assert load("mine.tar.gz")[2].root == str(archive)  # a config's relative root, looked up in $KDARENA_DATA
    monkeypatch.setenv("KDARENA_DATA", str(archive))
    assert load(None)[2].root == str(archive)  # $KDARENA_DATA naming the data set itself
    with pytest.raises(ImageDataError, match="other.tar.gz not found"):
        load("other.tar.gz")
    tiny = zip_of(write_tiny_official(tmp_path / "raw"), tmp_path / "store" / "tiny-imagenet-200.zip", top="tiny-imagenet-200")
    monkeypatch.setenv("KDARENA_DATA", str(tmp_path / "store"))  # a folder of data sets: found by name
    assert load(None, name="tiny_imagenet", image_size=8)[2].root == str(tiny)
