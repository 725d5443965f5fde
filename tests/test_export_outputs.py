"""Where ``kdarena export`` writes (issue 36: H5, H6, M3, M4): never over a device, a FIFO or a file of the
run; a full disk, a read-only folder or a name too long is one line and leaves nothing behind."""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from kdarena.cli import main
from test_deploy import env, run, run_config, write_images  # noqa: F401  (module fixtures: one tiny run)
from test_deploy_errors import error_line


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_device_node_named_by_out_stays_a_device(run, tmp_path, capsys):
    """H5: run as root, export --out /dev/null replaced the machine's /dev/null with a regular file."""
    node = tmp_path / "mynull.safetensors"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # what /dev/null is
    except PermissionError:
        pytest.skip("making a device node needs root")
    assert main(["export", str(run), "--out", str(node)]) == 2
    assert error_line(capsys) == (f"kdarena: error: cannot write {node}: it is a device, and kdarena replaces only "
                                  "regular files; give a file name")
    assert stat.S_ISCHR(os.lstat(node).st_mode)
    assert _listing(tmp_path) == ["mynull.safetensors"]


def test_a_fifo_named_by_out_stays_a_fifo(run, tmp_path, capsys):
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    assert main(["export", str(run), "--out", str(fifo)]) == 2
    error_line(capsys, f"cannot write {fifo}: it is a FIFO")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert _listing(tmp_path) == ["pipe.pt"]


@pytest.mark.parametrize("name", ["checkpoints/last.pt", "summary.json", "config.yaml", "metrics.jsonl"])
def test_out_never_replaces_a_file_of_the_run(run, capsys, name):
    """H6: --out R/checkpoints/last.pt overwrote the resume checkpoint; only the exported checkpoint was guarded."""
    target = run / name
    if not target.exists():
        pytest.skip(f"this run has no {name}")
    before = target.read_bytes()
    assert main(["export", str(run), "--out", str(target), "--format", "safetensors"]) == 2
    error_line(capsys, f"--out {target} would replace {target.resolve()}, a file of the run {run}")
    assert target.read_bytes() == before
    assert not Path(f"{target}.card.json").exists()


def test_an_earlier_export_inside_the_run_folder_may_be_replaced(run, capsys):
    out = run / "exported.safetensors"
    try:
        assert main(["export", str(run), "--out", str(out)]) == 0
        assert main(["export", str(run), "--out", str(out)]) == 0
    finally:
        for path in (out, Path(f"{out}.card.json"), Path(f"{out}.card.md")):
            path.unlink(missing_ok=True)


def test_a_name_too_long_and_a_missing_parent_file_are_one_line(run, tmp_path, capsys):
    """M3: a 240+ character --out was a traceback (the card's name, 10 characters longer, is over the limit)."""
    long_out = tmp_path / ("m" * 245 + ".safetensors")
    assert main(["export", str(run), "--out", str(long_out)]) == 2
    error_line(capsys, "File name too long; the name is too long for the file system; choose a shorter name")
    (tmp_path / "afile").write_text("x")
    assert main(["export", str(run), "--out", str(tmp_path / "afile" / "net.safetensors")]) == 2
    error_line(capsys, f"cannot write {tmp_path / 'afile'}: File exists; a file stands where a folder is needed")
    assert _listing(tmp_path) == ["afile"]


@pytest.fixture
def small_tmpfs(mount_tmpfs):
    return mount_tmpfs("64k")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_full_disk_is_one_line_and_leaves_no_file(run, small_tmpfs, capsys, suffix):
    """M3/M4: a full disk in the writer advised 'try another --format'; TorchScript aborted the process (exit 134)
    and left hidden temporaries. The 64 kB file system here cannot hold two ResNet-8s' weights (300 kB)."""
    out = small_tmpfs / f"net{suffix}"
    assert main(["export", str(run), "--out", str(out)]) == 2
    line = error_line(capsys, f"cannot write {out}: No space left on device; free disk space and try again")
    assert "another --format" not in line
    assert _listing(small_tmpfs) == []


def test_a_full_disk_while_writing_the_card_keeps_the_older_export(run, tmp_path, capsys, monkeypatch):
    """M3: a full disk while the card was written was a traceback."""
    out = tmp_path / "net.safetensors"
    assert main(["export", str(run), "--out", str(out)]) == 0
    before = {name: (tmp_path / name).read_bytes() for name in _listing(tmp_path)}
    real_fsync = os.fsync

    def fsync(fd):
        if ".card.json." in os.readlink(f"/proc/self/fd/{fd}"):  # the card's temporary file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert main(["export", str(run), "--out", str(out), "--network", "1"]) == 2
    error_line(capsys, f"cannot write {out}.card.json: No space left on device")
    assert {name: (tmp_path / name).read_bytes() for name in _listing(tmp_path)} == before


def test_a_read_only_folder_is_one_line(run, tmp_path, capsys, monkeypatch):
    """M3: a read-only folder was a traceback (simulated: root may write anywhere)."""
    def read_only(*_args, **_kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "replace", read_only)
    out = tmp_path / "net.safetensors"
    assert main(["export", str(run), "--out", str(out)]) == 2
    error_line(capsys, f"Read-only file system; the folder is on a read-only file system; choose a writable folder")
    assert _listing(tmp_path) == []
