"""Checkpoints whose bytes changed, TorchScript programs and non-finite weights (issue 36: H7, M1, a low)."""
from __future__ import annotations

import os
import pickle
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from kdarena.cli import main
from kdarena.engine import checkpoint as ckpt
from test_deploy import env, run, run_config, write_images  # noqa: F401  (module fixtures: one tiny run)
from test_deploy_errors import error_line


def flip_bytes_inside_a_tensor(path: Path, count: int = 16) -> str:
    """Invert ``count`` bytes in the middle of the largest tensor record (what a bad disk or a bad copy does)."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as handle:
        handle.seek(info.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", handle.read(4))
        start = info.header_offset + 30 + name_length + extra_length + info.file_size // 2
        handle.seek(start)
        flipped = bytes(b ^ 0xFF for b in handle.read(count))
        handle.seek(start)
        handle.write(flipped)
    return info.filename


@pytest.fixture
def damaged_run(run, tmp_path):
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    record = flip_bytes_inside_a_tensor(copy / "checkpoints" / "best.pt")
    return copy, record


def test_flipped_bytes_in_a_tensor_are_refused_by_eval_and_export(damaged_run, tmp_path, capsys):
    """H7: eval exited 0 with a loss of 2e24; export wrote weights of ~1e24 under a card claiming the run's top-1."""
    copy, record = damaged_run
    best = copy / "checkpoints" / "best.pt"
    assert main(["eval", str(best)]) == 2
    assert error_line(capsys) == (f"kdarena: error: checkpoint {str(best)!r} is damaged: its record {record} fails its "
                                  "CRC-32 check (the bytes changed after kdarena wrote them); use another copy, or "
                                  "RUN_DIR/checkpoints/last.prev.pt")
    out = tmp_path / "net.safetensors"
    assert main(["export", str(copy), "--out", str(out)]) == 2
    error_line(capsys, "fails its CRC-32 check")
    assert not out.exists() and not Path(f"{out}.card.json").exists()


def test_an_undamaged_checkpoint_still_loads(run):
    state = ckpt.load(run / "checkpoints" / "best.pt", required=ckpt.EVAL_KEYS)
    assert state["format"] == ckpt.FORMAT


def test_a_torchscript_file_given_as_a_checkpoint_is_named_so(run, tmp_path, capsys):
    """M1: 'truncated or corrupt?' plus torch's advice to retry with weights_only=False (which would run it)."""
    script = tmp_path / "net.pt"
    assert main(["export", str(run), "--out", str(script)]) == 0
    capsys.readouterr()
    assert main(["eval", str(script)]) == 2
    line = error_line(capsys, f"{str(script)!r} is a TorchScript program", "not a checkpoint")
    assert "weights_only" not in line


def test_torchs_retry_advice_is_never_passed_on():
    """M1: whatever torch refuses, its advice to retry with weights_only=False (which runs the file) is dropped."""
    error = pickle.UnpicklingError("Weights only load failed. This file can still be loaded, to do so you have two options\n"
                                   "(1) Re-running `torch.load` with `weights_only` set to `False` will likely succeed\n"
                                   "WeightsUnpickler error: Unsupported operand 149")
    assert ckpt._detail(error) == "UnpicklingError: WeightsUnpickler error: Unsupported operand 149"
    assert ckpt._detail(RuntimeError("Re-running with weights_only=False")) == "RuntimeError: "


def test_non_finite_weights_are_not_exported(run, tmp_path, capsys):
    """H7: a checkpoint that is intact but holds NaN weights is not exported under the run's accuracy."""
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    best = copy / "checkpoints" / "best.pt"
    state = ckpt.load(best, required=ckpt.EVAL_KEYS)
    key = next(k for k in state["group"] if k.startswith("networks.0.") and k.endswith("weight"))
    state["group"][key] = torch.full_like(state["group"][key], float("nan"))
    ckpt.save_atomic(state, best, keep_previous=False)
    out = tmp_path / "net.safetensors"
    assert main(["export", str(copy), "--out", str(out), "--network", "0"]) == 2
    error_line(capsys, "has non-finite weights (", f"first {key.removeprefix('networks.0.')}")
    assert not out.exists()


def test_a_fifo_given_as_teacher_weights_is_named_so(tmp_path):
    """Low: a FIFO given as weights was 'does not exist'."""
    fifo = tmp_path / "teacher.pt"
    os.mkfifo(fifo)
    with pytest.raises(ckpt.CheckpointError, match="is not a regular file"):
        ckpt.load_network_state(fifo, 0)
