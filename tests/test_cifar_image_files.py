"""CIFAR-10 / CIFAR-100 stored as image files (``{train,test}/CLASS/*.jpg`` + ``classes.txt``, as the CIFAR-10 JPEG
archive and a CIFAR-100 re-split are shipped): ``data.name=cifar100 data.root=ARCHIVE`` reads them with the data
set's label order and statistics. Every archive here is written by the test."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from kdarena import config as cfg  # noqa: E402
from kdarena.cli import main  # noqa: E402
from kdarena.data.build import build_data  # noqa: E402
from kdarena.data.cifar import CIFAR100_MEAN, CIFAR100_STD, CIFAR10_MEAN  # noqa: E402
from kdarena.errors import DataError  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KDARENA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("KDARENA_DATA", raising=False)


def grey(k: int) -> int:
    """The flat grey level of class ``k``'s images (distinct per class, far apart for JPEG)."""
    return 10 + 2 * k


def write_archive(tmp_path: Path, classes: list[str], train_per_class=3, test_per_class=1, order: list[str] | None = None,
                  top="cifar100-resplit") -> Path:
    """A CIFAR-style archive: class ``c`` (index in ``classes``) holds flat grey images of level grey(c)."""
    folder = tmp_path / top
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for c, name in enumerate(classes):
            (folder / split / name).mkdir(parents=True, exist_ok=True)
            for k in range(count):
                Image.fromarray(np.full((32, 32, 3), grey(c), np.uint8)).save(folder / split / name / f"{k:05d}.jpg", quality=95)
    if order is not None:
        (folder / "classes.txt").write_text("\n".join(order) + "\n")
    (folder / "README.txt").write_text("not an image; ignored\n")
    archive = tmp_path / f"{top}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=top)
    return archive


def bundle(archive: Path, name="cifar100", *overrides: str):
    config = cfg.load(None, [f"data.name={name}", f"data.root={archive}", "data.batch_size=8", "data.val_size=0", "data.num_workers=1",
                             "train.progress=false", *overrides])
    return build_data(config, torch.device("cpu"))


CLASSES_100 = [f"c{i:03d}" for i in range(100)]
# classes.txt lists them in an order that is not the sorted one: labels must follow it
ORDER_100 = CLASSES_100[50:] + CLASSES_100[:50]


def test_cifar100_from_a_jpeg_archive_follows_classes_txt_and_uses_cifar100_statistics(tmp_path):
    data = bundle(write_archive(tmp_path, CLASSES_100, order=ORDER_100))
    assert data.num_classes == 100 and data.classes == ORDER_100
    test = data.test.dataset
    assert len(test) == 100 and len(data.train.dataset) == 300
    assert (test.mean, test.std) == (CIFAR100_MEAN, CIFAR100_STD)
    for image, label in zip(test.images, test.labels):  # each image's grey level says which folder it came from
        folder = int(ORDER_100[int(label)][1:])
        assert abs(float(image.float().mean()) - grey(folder)) < 2.0
    assert data.train.crop_padding == 4 and data.train.flip  # the CIFAR recipe, as for the pickles


def test_sorted_class_folders_without_classes_txt(tmp_path):
    data = bundle(write_archive(tmp_path, CLASSES_100[::-1], order=None))
    assert data.classes == CLASSES_100


def test_the_class_count_must_be_the_data_sets(tmp_path):
    archive = write_archive(tmp_path, CLASSES_100[:10], order=None, top="small")
    with pytest.raises(DataError, match=r"data.name=cifar100 expects 100 classes but .* has 10; use data.name=imagefolder"):
        bundle(archive)
    assert bundle(archive, "cifar10").test.dataset.mean == CIFAR10_MEAN  # ten classes are CIFAR-10's count


def test_classes_txt_listing_a_class_twice_is_refused(tmp_path):
    archive = write_archive(tmp_path, CLASSES_100, order=ORDER_100 + ["c001"])
    with pytest.raises(DataError, match="classes.txt lists \\['c001'\\] more than once"):
        bundle(archive)


def test_the_pickle_layout_still_wins_in_a_folder_that_has_it(tmp_path):
    from kdarena.data.cifar import stored_as_image_files

    (tmp_path / "cifar-100-python").mkdir()
    for f in ("train", "test"):
        (tmp_path / "cifar-100-python" / f).write_bytes(b"")
    assert not stored_as_image_files("cifar100", str(tmp_path))
    assert stored_as_image_files("cifar100", "anywhere/cifar100-resplit.tar.gz")
    assert not stored_as_image_files("cifar100", None)


@pytest.mark.slow
def test_one_epoch_with_the_shipped_config_reports_classes_and_test_images(tmp_path, capsys):
    archive = write_archive(tmp_path, CLASSES_100, train_per_class=2, test_per_class=1, order=ORDER_100)
    out = tmp_path / "run"
    code = main(["train", str(ROOT / "configs" / "data" / "cifar100_resplit.yaml"), f"data.root={archive}",
                 "models=[convnet,convnet]", "optim.epochs=1", "data.val_size=100", "data.batch_size=50",
                 "train.channels_last=false", "train.precision=fp32", "--out", str(out)])
    assert code in (0, None)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"] == {"name": "cifar100", "classes": 100, "train_images": 100, "val_images": 100, "test_images": 100}
    assert summary["precision"] == "fp32" and summary["device"] == "cpu" and summary["device_model"]
    assert summary["torch"] == torch.__version__
