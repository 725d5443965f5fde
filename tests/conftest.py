"""Shared fixtures."""
from __future__ import annotations

import subprocess

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """A Trainer sets process-wide torch switches (threads, deterministic algorithms): undo them after each test."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


@pytest.fixture
def one_thread():
    """One intra-op thread: small CPU tests are faster and steadier without OpenMP spinning."""
    torch.set_num_threads(1)  # restored by _restore_torch_globals


@pytest.fixture
def mount_tmpfs(tmp_path):
    """``mount_tmpfs("64k")``: a folder on a fresh tmpfs of that size, for real full-disk errors (root only: the
    test is skipped elsewhere); unmounted after the test."""
    mounted = []

    def mount(size: str):
        folder = tmp_path / f"tmpfs{len(mounted)}"
        folder.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)
