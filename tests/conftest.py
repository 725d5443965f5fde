"""Shared fixtures."""
from __future__ import annotations

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
