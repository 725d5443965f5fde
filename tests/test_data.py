"""Tests of kdarena.data: on-disk formats, validation, splits and the device loaders."""
from __future__ import annotations

import gzip
import os
import pickle

import numpy as np
import pytest
import torch

import kdarena.data.datasets as datasets_mod
from kdarena.data import (
    DATASETS,
    ArrayDataset,
    FolderLoader,
    ImageFolder,
    TensorLoader,
    load_arrays,
    split_validation,
)
from kdarena.data.imagefolder import BadImageError

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


# ----------------------------------------------------------------------------- helpers
@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No KDARENA_DATA, a fake HOME and no system data directories."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("KDARENA_DATA", raising=False)
    monkeypatch.delenv("KDARENA_CACHE", raising=False)
    sysdir = tmp_path / "system"
    monkeypatch.setattr(datasets_mod, "SYSTEM_DATA_DIRS", [str(sysdir)])
    return tmp_path


def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.asarray(arr, dtype=np.uint8)
    head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return head + arr.tobytes()


def write_fashion(d, n_train=12, n_test=7, gz=True, seed=0):
    rng = np.random.RandomState(seed)
    d.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.randint(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.randint(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.randint(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.randint(0, 10, n_test),
    }
    for stem, arr in arrays.items():
        data = idx_bytes(arr)
        if gz:
            (d / (stem + ".gz")).write_bytes(gzip.compress(data))
        else:
            (d / stem).write_bytes(data)
    return arrays


def write_cifar10(d, per_batch=4, n_test=5, seed=0):
    rng = np.random.RandomState(seed)
    top = d / "cifar-10-batches-py"
    top.mkdir(parents=True)
    all_x, all_y = [], []
    for i in range(1, 6):
        x = rng.randint(0, 256, (per_batch, 3072)).astype(np.uint8)
        y = [int(v) for v in rng.randint(0, 10, per_batch)]
        all_x.append(x)
        all_y += y
        with open(top / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"batch_label": b"training batch", b"data": x, b"labels": y, b"filenames": []}, f)
    xt = rng.randint(0, 256, (n_test, 3072)).astype(np.uint8)
    with open(top / "test_batch", "wb") as f:
        pickle.dump({b"data": xt, b"labels": [int(v) for v in rng.randint(0, 10, n_test)]}, f)
    names = [f"c{i}".encode() for i in range(10)]
    with open(top / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, f)
    return top, np.concatenate(all_x), np.array(all_y)


def write_cifar100(d, n_train=9, n_test=4, seed=0):
    rng = np.random.RandomState(seed)
    top = d / "cifar-100-python"
    top.mkdir(parents=True)
    x = rng.randint(0, 256, (n_train, 3072)).astype(np.uint8)
    y = rng.randint(0, 100, n_train)
    for name, xx, yy in (("train", x, y), ("test", x[:n_test], y[:n_test])):
        with open(top / name, "wb") as f:
            pickle.dump({b"data": xx, b"fine_labels": [int(v) for v in yy], b"coarse_labels": [0] * len(yy)}, f)
    with open(top / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"f{i}".encode() for i in range(100)]}, f)
    return top, x, y


def indexed_dataset(n=203, c=3, h=8, w=8, num_classes=5):
    """Images whose first two pixels encode the sample index; mean 0 / std 1/255 => x == pixel."""
    rng = np.random.RandomState(1)
    imgs = rng.randint(0, 256, (n, c, h, w)).astype(np.uint8)
    imgs[:, 0, 0, 0] = np.arange(n) // 256
    imgs[:, 0, 0, 1] = np.arange(n) % 256
    return ArrayDataset(
        images=torch.from_numpy(imgs),
        labels=torch.arange(n) % num_classes,
        num_classes=num_classes,
        mean=(0.0,) * c,
        std=(1.0 / 255,) * c,
        name="indexed",
    )


def sample_ids(x: torch.Tensor) -> list[int]:
    px = x.round().long()
    return (px[:, 0, 0, 0] * 256 + px[:, 0, 0, 1]).tolist()


# ----------------------------------------------------------------------------- ArrayDataset
def test_arraydataset_validation():
    good = dict(images=torch.zeros(4, 1, 2, 2, dtype=torch.uint8), labels=torch.tensor([0, 1, 2, 1]),
                num_classes=3, mean=(0.5,), std=(0.5,), classes=["a", "b", "c"], name="toy")
    ds = ArrayDataset(**good)
    assert len(ds) == 4 and ds.image_shape == (1, 2, 2)
    bad_cases = [
        (dict(images=torch.zeros(4, 1, 2, 2)), "uint8"),
        (dict(images=torch.zeros(4, 2, 2, dtype=torch.uint8)), "shape"),
        (dict(labels=torch.tensor([0, 1, 2, 3])), "labels must lie"),
        (dict(labels=torch.tensor([0, 1, 2])), "4 images but 3 labels"),
        (dict(labels=torch.tensor([0, 1, 2, 1], dtype=torch.int32)), "int64"),
        (dict(mean=(0.5, 0.5)), "per channel"),
        (dict(classes=["a"]), "class names"),
    ]
    for change, msg in bad_cases:
        with pytest.raises(ValueError, match=msg) as info:
            ArrayDataset(**{**good, **change})
        assert "toy" in str(info.value)


def test_unknown_dataset_name():
    with pytest.raises(ValueError) as info:
        load_arrays("mnist_nope")
    msg = str(info.value)
    assert all(n in msg for n in DATASETS) and "imagefolder" in msg
    with pytest.raises(ValueError, match="load_image_set"):
        load_arrays("imagefolder")


# ----------------------------------------------------------------------------- Fashion-MNIST (idx)
@pytest.mark.parametrize("gz", [True, False])
def test_fashion_idx_formats(isolated, gz):
    arrays = write_fashion(isolated / "fm", gz=gz)
    train, test = load_arrays("fashion_mnist", root=str(isolated / "fm"))
    assert train.images.shape == (12, 1, 28, 28) and test.images.shape == (7, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    np.testing.assert_array_equal(train.images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(test.labels.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert train.mean == (0.2860,) and train.std == (0.3530,) and train.num_classes == 10
    assert train.classes[0] == "T-shirt/top"


def test_fashion_found_via_env(isolated, monkeypatch):
    write_fashion(isolated / "env" / "fashion-mnist")
    monkeypatch.setenv("KDARENA_DATA", str(isolated / "env"))
    train, _ = load_arrays("fashion_mnist")
    assert len(train) == 12


def test_fashion_missing_lists_searched_paths(isolated, monkeypatch):
    monkeypatch.setenv("KDARENA_DATA", str(isolated / "envdata"))
    with pytest.raises(FileNotFoundError) as info:
        load_arrays("fashion_mnist", root=str(isolated / "myroot"))
    msg = str(info.value)
    assert str(isolated / "myroot" / "fashion-mnist") in msg
    assert str(isolated / "envdata") not in msg  # a given root is the only place searched
    with pytest.raises(FileNotFoundError) as info:
        load_arrays("fashion_mnist")
    msg = str(info.value)
    for p in (isolated / "envdata", isolated / "envdata" / "fashion-mnist",
              isolated / "home" / ".cache" / "kdarena" / "fashion-mnist", isolated / "system" / "fashion-mnist"):
        assert str(p) in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "KDARENA_DATA" in msg and "data.download=true" in msg


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_truncated_file_names_it(isolated, gz):
    d = isolated / "fm"
    write_fashion(d, gz=gz)
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    p = d / name
    p.write_bytes(p.read_bytes()[:-50])
    with pytest.raises(ValueError) as info:
        load_arrays("fashion_mnist", root=str(d))
    assert name in str(info.value)
    assert ("truncated" in str(info.value)) or ("gzip" in str(info.value))


def test_fashion_trailing_bytes_and_wrong_magic(isolated):
    d = isolated / "fm"
    write_fashion(d, gz=False)
    p = d / "t10k-labels-idx1-ubyte"
    p.write_bytes(p.read_bytes() + b"\x00")
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.*trailing"):
        load_arrays("fashion_mnist", root=str(d))
    write_fashion(d, gz=False)
    p = d / "train-labels-idx1-ubyte"
    data = bytearray(p.read_bytes())
    data[3] = 3  # claims 3 dimensions
    p.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.*magic"):
        load_arrays("fashion_mnist", root=str(d))
    data[2:4] = bytes([0x0D, 1])  # float data
    p.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="magic"):
        load_arrays("fashion_mnist", root=str(d))


def test_fashion_labels_out_of_range(isolated):
    d = isolated / "fm"
    write_fashion(d)
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.array([1, 2, 12, 3, 0, 0, 0]))))
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.*out of range"):
        load_arrays("fashion_mnist", root=str(d))


REAL_FM = "/usr/share/datasets/fashion-mnist"


@pytest.mark.skipif(not os.path.isfile(os.path.join(REAL_FM, "train-images-idx3-ubyte.gz")),
                    reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    train, test = load_arrays("fashion_mnist", root=REAL_FM)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert abs(train.images.float().mean().item() / 255 - 0.2860) < 1e-3


# ----------------------------------------------------------------------------- CIFAR
def test_cifar10_layout(isolated):
    _, x, y = write_cifar10(isolated / "c")
    train, test = load_arrays("cifar10", root=str(isolated / "c"))
    assert train.images.shape == (20, 3, 32, 32) and len(test) == 5
    np.testing.assert_array_equal(train.images.numpy().reshape(20, -1), x)
    np.testing.assert_array_equal(train.labels.numpy(), y)
    assert train.classes == [f"c{i}" for i in range(10)] and train.mean == (0.4914, 0.4822, 0.4465)
    # the batches directory itself may also be given as root
    train2, _ = load_arrays("cifar10", root=str(isolated / "c" / "cifar-10-batches-py"))
    assert torch.equal(train2.images, train.images)


def test_cifar100_layout(isolated):
    _, x, y = write_cifar100(isolated / "c")
    train, test = load_arrays("cifar100", root=str(isolated / "c"))
    assert train.num_classes == 100 and len(train) == 9 and len(test) == 4
    np.testing.assert_array_equal(train.images[3].numpy(), x[3].reshape(3, 32, 32))
    np.testing.assert_array_equal(train.labels.numpy(), y)
    assert train.classes[5] == "f5"


def test_cifar_corrupt_and_untrusted_pickles(isolated):
    top, _, _ = write_cifar10(isolated / "c")
    p = top / "data_batch_3"
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(ValueError, match="data_batch_3"):
        load_arrays("cifar10", root=str(isolated / "c"))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    p.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ValueError, match="data_batch_3.*refusing"):
        load_arrays("cifar10", root=str(isolated / "c"))
    p.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(ValueError, match="data_batch_3.*dict"):
        load_arrays("cifar10", root=str(isolated / "c"))
    p.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}))
    with pytest.raises(ValueError, match="data_batch_3.*labels"):
        load_arrays("cifar10", root=str(isolated / "c"))


def test_cifar_missing(isolated):
    with pytest.raises(FileNotFoundError, match="cifar-100-python.tar.gz"):
        load_arrays("cifar100", root=str(isolated / "nothing"))


# ----------------------------------------------------------------------------- digits + split
def test_digits():
    pytest.importorskip("sklearn")
    train, test = load_arrays("digits")
    assert len(train) == 1437 and len(test) == 360 and train.images.shape[1:] == (1, 8, 8)
    assert train.images.max() == 255 and train.images.dtype == torch.uint8
    assert torch.bincount(test.labels, minlength=10).min() >= 35
    train2, test2 = load_arrays("digits")
    assert torch.equal(test.images, test2.images) and torch.equal(train.labels, train2.labels)
    assert 0.0 < train.mean[0] < 1.0 and 0.0 < train.std[0] < 1.0


def test_split_validation():
    ds = indexed_dataset(n=500, num_classes=5)
    rest, val = split_validation(ds, 100, seed=3)
    assert len(rest) == 400 and len(val) == 100
    ids_r, ids_v = set(sample_ids(rest.images.float())), set(sample_ids(val.images.float()))
    assert not ids_r & ids_v and len(ids_r | ids_v) == 500
    assert torch.bincount(val.labels).tolist() == [20] * 5  # stratified
    rest2, val2 = split_validation(ds, 100, seed=3)
    assert torch.equal(val.images, val2.images) and torch.equal(rest.labels, rest2.labels)
    _, val3 = split_validation(ds, 100, seed=4)
    assert not torch.equal(val.images, val3.images)
    _, valf = split_validation(ds, 0.1, seed=0)
    assert len(valf) == 50
    same, none = split_validation(ds, 0, seed=0)
    assert same is ds and none is None
    for bad in (500, 501, 1.0, 1.5, -1):
        with pytest.raises(ValueError):
            split_validation(ds, bad, seed=0)


# ----------------------------------------------------------------------------- ImageFolder
def make_folder(root, corrupt=False):
    rng = np.random.RandomState(0)
    spec = {"cat": [(20, 30, "png", "RGB"), (40, 17, "jpg", "RGB"), (16, 16, "png", "L")],
            "dog": [(33, 33, "jpeg", "RGB"), (25, 50, "png", "RGBA"), (18, 22, "bmp", "RGB")]}
    for cls, items in spec.items():
        (root / cls).mkdir(parents=True)
        for i, (w, h, ext, mode) in enumerate(items):
            ch = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
            arr = rng.randint(0, 256, (h, w, ch)).astype(np.uint8)
            img = Image.fromarray(arr[:, :, 0] if ch == 1 else arr, mode)
            img.save(root / cls / f"img{i}.{ext}")
    (root / "dog" / "notes.txt").write_text("not an image")
    if corrupt:
        (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)


def test_imagefolder_decodes_formats(tmp_path):
    make_folder(tmp_path / "f")
    ds = ImageFolder(str(tmp_path / "f"), image_size=16)
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2 and len(ds) == 6
    assert len(ds.samples) == 6 and ds.targets == [0, 0, 0, 1, 1, 1]
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 16, 16) and x.dtype == torch.uint8 and y == ds.samples[i][1]
    g = ImageFolder(str(tmp_path / "f"), image_size=8, channels=1)
    assert g[1][0].shape == (1, 8, 8)
    assert ds.verify() == []


def test_imagefolder_bad_images(tmp_path):
    make_folder(tmp_path / "f", corrupt=True)
    ds = ImageFolder(str(tmp_path / "f"), image_size=16)
    bad = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("broken.png")][0]
    with pytest.raises(BadImageError, match="broken.png"):
        ds[bad]
    with pytest.raises(BadImageError, match="broken.png"):
        ds.verify()
    skip = ImageFolder(str(tmp_path / "f"), image_size=16, skip_bad=True)
    with pytest.warns(UserWarning, match="broken.png"):
        x, y = skip[bad]
    assert x.shape == (3, 16, 16)
    with pytest.warns(UserWarning, match="broken.png"):
        assert [os.path.basename(p) for p in skip.verify()] == ["broken.png"]
    assert len(skip) == 6


def test_imagefolder_empty_and_split_dirs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-directories"):
        ImageFolder(str(tmp_path / "empty"), 8)
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(str(tmp_path / "noimg"), 8)
    with pytest.raises(FileNotFoundError):
        ImageFolder(str(tmp_path / "missing"), 8)
    make_folder(tmp_path / "ds" / "train")
    make_folder(tmp_path / "ds" / "val")
    train = ImageFolder(str(tmp_path / "ds" / "train"), 12)
    val = ImageFolder(str(tmp_path / "ds" / "val"), 12, classes=train.classes)
    assert val.classes == train.classes and len(val) == 6


# ----------------------------------------------------------------------------- TensorLoader
def collect(loader, epoch, start=0):
    return [(x.clone(), y.clone()) for x, y in loader.iterate(epoch, start)]


def test_tensorloader_output_and_determinism():
    ds = indexed_dataset()
    mk = lambda **kw: TensorLoader(ds, 16, "cpu", train=True, seed=7, crop_padding=2, flip=True, **kw)
    a, b = mk(), mk()
    assert len(a) == 203 // 16
    ea, eb = collect(a, 3), collect(b, 3)
    assert len(ea) == len(a)
    for (xa, ya), (xb, yb) in zip(ea, eb):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.shape == (16, 3, 8, 8) and xa.dtype == torch.float32 and ya.dtype == torch.int64
        assert xa.device.type == "cpu"
    e4 = collect(a, 4)
    assert not all(torch.equal(p[1], q[1]) for p, q in zip(ea, e4))
    # __iter__ follows set_epoch
    a.set_epoch(3)
    assert all(torch.equal(x, p[0]) for x, p in zip((x for x, _ in a), ea))
    # resume mid-epoch == tail of the full epoch
    tail = collect(b, 3, start=5)
    assert len(tail) == len(ea) - 5
    assert all(torch.equal(x, p[0]) and torch.equal(y, p[1]) for (x, y), p in zip(tail, ea[5:]))
    assert list(a.iterate(3, len(a))) == []


def test_tensorloader_normalisation_dtype_layout():
    ds = indexed_dataset()
    ds.mean, ds.std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    ev = TensorLoader(ds, 50, "cpu", train=False)
    x, y = next(iter(ev))
    ref = (ds.images[:50].float() / 255 - torch.tensor(ds.mean).view(1, 3, 1, 1)) / torch.tensor(ds.std).view(1, 3, 1, 1)
    torch.testing.assert_close(x, ref)
    assert torch.equal(y, ds.labels[:50])
    bf = TensorLoader(ds, 50, torch.device("cpu"), train=True, dtype=torch.bfloat16, channels_last=True, flip=True)
    xb, _ = next(iter(bf))
    assert xb.dtype == torch.bfloat16 and xb.is_contiguous(memory_format=torch.channels_last)


def test_tensorloader_crop_flip_matches_reference():
    ds = indexed_dataset()
    ld = TensorLoader(ds, 32, "cpu", train=True, seed=1, crop_padding=3, flip=True)
    order, offsets, flips = ld.epoch_plan(0)
    (x, y), = collect(ld, 0)[:1]
    raw = ds.images[order[:32]]
    assert x.shape == (32, 3, 8, 8) and torch.equal(y, ds.labels[order[:32]])
    assert not torch.equal(x.round().to(torch.uint8), raw)  # augmentation changed images
    assert 0 < int(flips[:32].sum()) < 32 and len(set(map(tuple, offsets[:32].tolist()))) > 1
    padded = torch.nn.functional.pad(raw, (3, 3, 3, 3))
    for i in range(32):
        dy, dx = offsets[i].tolist()
        ref = padded[i, :, dy:dy + 8, dx:dx + 8]
        if flips[i]:
            ref = ref.flip(2)
        assert torch.equal(x[i].round().to(torch.uint8), ref), i


@pytest.mark.parametrize("drop_last", [True, False])
def test_tensorloader_two_ranks_equal_one_rank_double_batch(drop_last):
    ds = indexed_dataset(n=203)
    kw = dict(train=True, seed=11, crop_padding=2, flip=True, drop_last=drop_last)
    one = TensorLoader(ds, 20, "cpu", world_size=1, rank=0, **kw)
    r0 = TensorLoader(ds, 10, "cpu", world_size=2, rank=0, **kw)
    r1 = TensorLoader(ds, 10, "cpu", world_size=2, rank=1, **kw)
    assert len(one) == len(r0) == len(r1) == (10 if drop_last else 11)
    for epoch in (0, 5):
        for (x, y), (x0, y0), (x1, y1) in zip(one.iterate(epoch), r0.iterate(epoch), r1.iterate(epoch)):
            assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(y, torch.cat([y0, y1]))


def test_tensorloader_eval_covers_every_sample_once():
    ds = indexed_dataset(n=203)
    seen = []
    lens = []
    for r in range(2):
        ld = TensorLoader(ds, 16, "cpu", train=False, rank=r, world_size=2, drop_last=True, flip=True, crop_padding=4)
        batches = list(ld)
        lens.append(len(batches))
        assert len(batches) == len(ld)
        for x, y in batches:
            ids = sample_ids(x)
            assert torch.equal(y, ds.labels[ids])
            assert torch.equal(x.round().to(torch.uint8), ds.images[ids])  # no augmentation
            seen += ids
    assert sorted(seen) == list(range(203)) and lens == [7, 7]
    single = [i for x, _ in TensorLoader(ds, 64, "cpu", train=False) for i in sample_ids(x)]
    assert single == list(range(203))


def test_tensorloader_rejects_bad_args():
    ds = indexed_dataset(n=20)
    with pytest.raises(ValueError, match="global batch"):
        TensorLoader(ds, 16, "cpu", train=True, world_size=2)
    with pytest.raises(ValueError):
        TensorLoader(ds, 4, "cpu", rank=2, world_size=2)
    with pytest.raises(ValueError):
        TensorLoader(ds, 0, "cpu")


# ----------------------------------------------------------------------------- FolderLoader
def test_folderloader_interface(tmp_path):
    make_folder(tmp_path / "f")
    ds = ImageFolder(str(tmp_path / "f"), image_size=16)
    kw = dict(train=True, seed=2, num_workers=0)
    one = FolderLoader(ds, 4, "cpu", **kw, drop_last=False)
    r0 = FolderLoader(ds, 2, "cpu", rank=0, world_size=2, drop_last=False, **kw)
    r1 = FolderLoader(ds, 2, "cpu", rank=1, world_size=2, drop_last=False, **kw)
    assert len(one) == len(r0) == len(r1) == 2
    full = [(x.clone(), y.clone()) for x, y in one.iterate(1)]
    assert full[0][0].shape == (4, 3, 16, 16) and full[0][0].dtype == torch.float32
    assert full[1][0].shape == (2, 3, 16, 16)
    for (x, y), (x0, y0), (x1, y1) in zip(full, r0.iterate(1), r1.iterate(1)):
        torch.testing.assert_close(x, torch.cat([x0, x1]))
        assert torch.equal(y, torch.cat([y0, y1]))
    tail = list(one.iterate(1, start_batch=1))
    assert len(tail) == 1 and torch.equal(tail[0][0], full[1][0])
    other = [x for x, _ in one.iterate(2)]
    assert not torch.equal(other[0], full[0][0])
    # eval: natural order, exact normalisation of the decoded images
    ev = FolderLoader(ds, 4, "cpu", train=False, num_workers=0)
    xs, ys = zip(*ev)
    assert torch.cat(ys).tolist() == ds.targets
    raw = torch.stack([ds[i][0] for i in range(len(ds))]).float() / 255
    mean, std = torch.tensor(ds.mean).view(1, 3, 1, 1), torch.tensor(ds.std).view(1, 3, 1, 1)
    torch.testing.assert_close(torch.cat(xs), (raw - mean) / std)


def test_folderloader_workers(tmp_path):
    make_folder(tmp_path / "f")
    ds = ImageFolder(str(tmp_path / "f"), image_size=16)
    ld = FolderLoader(ds, 3, "cpu", train=True, seed=0, num_workers=2)
    ref = FolderLoader(ds, 3, "cpu", train=True, seed=0, num_workers=0)
    for epoch in (0, 1):
        got = list(ld.iterate(epoch))
        exp = list(ref.iterate(epoch))
        assert len(got) == len(exp) == 2
        for (x, y), (xe, ye) in zip(got, exp):
            torch.testing.assert_close(x, xe)
            assert torch.equal(y, ye)
    # an abandoned pass must not leak into the next one
    next(iter(ld.iterate(0)))
    again = list(ld.iterate(0, start_batch=1))
    torch.testing.assert_close(again[0][0], list(ref.iterate(0))[1][0])


def test_folderloader_rrc_geometry(tmp_path):
    make_folder(tmp_path / "f")
    ds = ImageFolder(str(tmp_path / "f"), image_size=16)
    raw = torch.stack([ds[i][0] for i in range(len(ds))]).float()
    mean, std = torch.tensor(ds.mean).view(1, 3, 1, 1), torch.tensor(ds.std).view(1, 3, 1, 1)
    # full-image box: identity (no flip) or an exact mirror image (flip)
    for flip in (False, True):
        ld = FolderLoader(ds, 6, "cpu", train=True, seed=3, num_workers=0, flip=flip,
                          scale=(1.0, 1.0), ratio=(1.0, 1.0))
        order, _, flips = ld.epoch_plan(0)
        (x, y), = list(ld.iterate(0))
        exp = raw[order]
        if flip:
            exp = torch.where(flips.view(-1, 1, 1, 1), exp.flip(3), exp)
            assert 0 < int(flips.sum()) < 6
        torch.testing.assert_close(x * std * 255 + mean * 255, exp, atol=1e-3, rtol=0)
    # small boxes really crop (outputs differ from the full images) and keep the shape
    ld = FolderLoader(ds, 6, "cpu", train=True, seed=3, num_workers=0, flip=False, scale=(0.1, 0.3))
    order, _, _ = ld.epoch_plan(0)
    (x, _), = list(ld.iterate(0))
    assert x.shape == (6, 3, 16, 16)
    assert (x * std * 255 + mean * 255 - raw[order]).abs().amax() > 10


# ----------------------------------------------------------------------------- download code, offline
def test_download_paths_with_file_urls(isolated, monkeypatch):
    """The real download/extract code, fed file:// URLs (no network)."""
    import hashlib
    import tarfile

    import kdarena.data.cifar as cifar_mod
    import kdarena.data.fashion_mnist as fm_mod

    # CIFAR-10: tar.gz -> checksum -> atomic extraction into the cache
    write_cifar10(isolated / "src")
    archive = isolated / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(isolated / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    spec = dict(cifar_mod._SPECS["cifar10"], url=archive.as_uri(),
                md5=hashlib.md5(archive.read_bytes()).hexdigest())
    monkeypatch.setitem(cifar_mod._SPECS, "cifar10", spec)
    with pytest.raises(FileNotFoundError):
        load_arrays("cifar10")
    train, test = load_arrays("cifar10", download=True)
    assert len(train) == 20 and len(test) == 5
    cache = isolated / "home" / ".cache" / "kdarena"
    assert (cache / "cifar-10-batches-py" / "test_batch").is_file()
    assert not [p for p in os.listdir(cache) if p.startswith(".") or p.endswith(".part")]

    # a wrong checksum leaves nothing behind
    monkeypatch.setitem(cifar_mod._SPECS, "cifar100", dict(cifar_mod._SPECS["cifar100"], url=archive.as_uri(), md5="0" * 32))
    with pytest.raises(RuntimeError, match="MD5 mismatch"):
        load_arrays("cifar100", download=True)
    assert sorted(os.listdir(cache)) == ["cifar-10-batches-py"]

    # Fashion-MNIST: four .gz files into <cache>/fashion-mnist
    write_fashion(isolated / "fmsrc")
    monkeypatch.setattr(fm_mod, "URLS", ("file:///nonexistent/", (isolated / "fmsrc").as_uri() + "/"))
    monkeypatch.setattr(fm_mod, "MD5", {p.name: hashlib.md5(p.read_bytes()).hexdigest()
                                        for p in (isolated / "fmsrc").iterdir()})
    train, _ = load_arrays("fashion_mnist", download=True)
    assert len(train) == 12 and (cache / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").is_file()


def test_extract_tar_refuses_escaping_members(tmp_path):
    import io
    import tarfile

    from kdarena.data.download import extract_tar

    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("top/../../escape.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(ValueError, match="leaves the target"):
        extract_tar(str(archive), str(tmp_path / "out"), "top")
    assert not (tmp_path / "escape.txt").exists()


# ----------------------------------------------------------------------------- iterate_batches, rotation
def test_iterate_batches_indices_and_extra_views():
    from kdarena.data.tensor_loader import Batch

    ds = indexed_dataset()
    plain = TensorLoader(ds, 16, "cpu", train=True, seed=3, flip=True)  # no crop: pixel (0, 0..1) keeps the id
    ld = TensorLoader(ds, 16, "cpu", train=True, seed=3, flip=True)
    reference = list(plain.iterate(2, 1))
    batches = list(ld.iterate_batches(2, 1, views=3))
    assert len(batches) == len(reference) == len(ld) - 1 and isinstance(batches[0], Batch)
    for b, (x, y) in zip(batches, reference):
        assert torch.equal(b.x, x) and torch.equal(b.y, y)  # view 0 is iterate's batch, bit for bit
        assert b.index.dtype == torch.int64 and torch.equal(ds.labels[b.index], b.y)
        unflipped = [i for i in range(len(b.index)) if sample_ids(b.x[i:i + 1]) == b.index[i:i + 1].tolist()]
        assert len(unflipped) > 0  # images that were not flipped show their own id at (0, 0..1)
        assert len(b.views) == 2 and all(v.shape == b.x.shape for v in b.views)
        for v in b.views:  # the same images, each flipped or not independently
            same = v.eq(b.x).flatten(1).all(1)
            mirror = v.flip(3).eq(b.x).flatten(1).all(1)
            assert bool((same | mirror).all())
    assert any(not torch.equal(b.views[0], b.x) for b in batches) and any(not torch.equal(b.views[0], b.views[1]) for b in batches)
    again = list(TensorLoader(ds, 16, "cpu", train=True, seed=3, flip=True).iterate_batches(2, 1, views=3))
    assert all(torch.equal(a.views[1], b.views[1]) for a, b in zip(again, batches))  # deterministic
    assert torch.equal(list(ld.iterate(2, 1))[0][0], reference[0][0])  # asking for views changed nothing
    with pytest.raises(ValueError, match="views must be an int >= 1"):
        next(ld.iterate_batches(0, 0, views=0))


def test_rotation():
    from kdarena.data.tensor_loader import rotate_nearest

    x = torch.randint(0, 256, (3, 2, 7, 7), dtype=torch.uint8)
    assert torch.equal(rotate_nearest(x, torch.zeros(3)), x)
    quarter = rotate_nearest(x, torch.full((3,), 90.0))
    assert torch.equal(quarter, torch.rot90(x, 1, (2, 3))) or torch.equal(quarter, torch.rot90(x, -1, (2, 3)))
    corners = rotate_nearest(torch.full((1, 1, 8, 8), 9, dtype=torch.uint8), torch.tensor([45.0]))
    assert corners[0, 0, 0, 0] == 0 and corners[0, 0, 4, 4] == 9  # zero fill outside the rotated square
    ds = indexed_dataset(h=12, w=12)
    base = TensorLoader(ds, 20, "cpu", train=True, seed=1, crop_padding=2, flip=True)
    rot = TensorLoader(ds, 20, "cpu", train=True, seed=1, crop_padding=2, flip=True, rotation=15)
    order, offsets, flips = rot.epoch_plan(0)
    b_order, b_offsets, b_flips = base.epoch_plan(0)
    assert torch.equal(order, b_order) and torch.equal(offsets, b_offsets) and torch.equal(flips, b_flips)
    angles = rot._plan(0)[3]
    assert float(angles.abs().max()) <= 15 and float(angles.std()) > 3
    for (xb, yb), (xr, yr), (a, b) in zip(base.iterate(0), rot.iterate(0), rot._spans):
        assert torch.equal(yb, yr)
        assert torch.equal(xr, rotate_nearest(xb, angles[a:b]))  # rotation comes after crop and flip
    zero = TensorLoader(ds, 20, "cpu", train=True, seed=1, crop_padding=2, flip=True, rotation=0)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(zero.iterate(0), base.iterate(0)))
    with pytest.raises(ValueError, match="rotation"):
        TensorLoader(ds, 20, "cpu", rotation=200)


def test_folderloader_iterate_batches(tmp_path):
    make_folder(tmp_path / "f")
    ds = ImageFolder(str(tmp_path / "f"), image_size=16)
    ld = FolderLoader(ds, 2, "cpu", train=True, seed=4, num_workers=0)
    for b, (x, y) in zip(ld.iterate_batches(1), ld.iterate(1)):
        assert torch.equal(b.x, x) and torch.equal(b.y, y) and b.views == []
        assert [ds.targets[i] for i in b.index.tolist()] == y.tolist()
    with pytest.raises(ValueError, match="one view per image"):
        next(ld.iterate_batches(0, 0, views=2))
