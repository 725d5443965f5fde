"""kdarena.safe_files: the bounded regular-file reader and the atomic writer every output goes through."""
from __future__ import annotations

import errno
import os
import stat
import threading

import pytest

from kdarena.errors import UserError
from kdarena.safe_files import SafeFileError, atomic_path, read_bytes, read_text, write_atomic


def _one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text
    return text


def test_reads_a_regular_file_within_its_limit(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("héllo".encode())
    assert read_bytes(path, 6) == "héllo".encode()
    assert read_text(path, 6) == "héllo"


def test_a_file_over_the_limit_is_refused(tmp_path):
    path = tmp_path / "big.bin"
    path.write_bytes(b"x" * 101)
    with pytest.raises(SafeFileError) as caught:
        read_bytes(path, 100)
    assert _one_line(caught.value) == f"{path} is 101 bytes, over kdarena's limit of 100 bytes for this file; it is not a file kdarena wrote"
    assert isinstance(caught.value, UserError)


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "metrics.jsonl"
    os.mkfifo(fifo)
    result: list[BaseException] = []
    reader = threading.Thread(target=lambda: result.append(pytest.raises(SafeFileError, read_bytes, fifo, 10).value), daemon=True)
    reader.start()
    reader.join(5)
    assert not reader.is_alive(), "read_bytes blocked on a FIFO"
    assert _one_line(result[0]) == f"{fifo} is a FIFO, not a regular file; kdarena reads only regular files"


def test_a_link_to_dev_zero_and_a_folder_are_refused(tmp_path):
    link = tmp_path / "zero"
    link.symlink_to("/dev/zero")
    with pytest.raises(SafeFileError, match=r"zero is a device, not a regular file"):
        read_bytes(link, 1 << 30)
    with pytest.raises(SafeFileError, match=r"is a folder, not a regular file"):
        read_text(tmp_path, 10)
    with pytest.raises(SafeFileError, match=r"nothing does not exist"):
        read_text(tmp_path / "nothing", 10)


def test_text_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "x.json"
    path.write_bytes(b"ok\xff")
    with pytest.raises(SafeFileError, match=r"x.json is not UTF-8 text \(byte 2\)"):
        read_text(path, 10)


def test_write_atomic_replaces_a_regular_file_and_keeps_its_mode(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    path.chmod(0o640)
    write_atomic(path, "new")
    assert path.read_text() == "new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_write_atomic_never_replaces_a_fifo_or_a_device(tmp_path):
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    with pytest.raises(SafeFileError) as caught:
        write_atomic(fifo, b"data")
    assert _one_line(caught.value) == (f"cannot write {fifo}: it is a FIFO, and kdarena replaces only regular files; "
                                       "give a file name")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    link = tmp_path / "null"
    link.symlink_to("/dev/null")
    with pytest.raises(SafeFileError, match="it is a device"):
        write_atomic(link, b"data")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["null", "out.fifo"]


def test_a_name_too_long_and_a_read_only_folder_are_one_line(tmp_path):
    with pytest.raises(SafeFileError, match=r"File name too long; the name is too long for the file system"):
        write_atomic(tmp_path / ("n" * 300 + ".safetensors"), b"x")
    with pytest.raises(SafeFileError, match=r"its folder does not exist"):
        write_atomic(tmp_path / "no" / "such" / "f", b"x")


def test_a_full_disk_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "card.json"
    path.write_text("old")

    def full(*_args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(SafeFileError) as caught:
        with atomic_path(path) as temp:
            with open(temp, "w") as handle:
                handle.write("half")
            monkeypatch.setattr(os, "fsync", full)
    assert _one_line(caught.value) == f"cannot write {path}: No space left on device; free disk space and try again"
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["card.json"]


def test_an_error_inside_the_block_writes_nothing(tmp_path):
    path = tmp_path / "model.onnx"
    with pytest.raises(RuntimeError):
        with atomic_path(path) as temp:
            open(temp, "wb").write(b"partial")
            raise RuntimeError("exporter failed")
    assert list(tmp_path.iterdir()) == []
