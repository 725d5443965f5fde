"""CPU threads on a shared machine (issue 36, "under load"): a passive OpenMP wait policy when the machine is busy,
and no more threads than the CPUs other work leaves free. Speed itself: benchmarks/cpu_threads_under_load.py."""
from __future__ import annotations

import logging
import os

import pytest
import torch

from kdarena import config as cfg, cpu_threads
from kdarena.engine.build import configure_torch


@pytest.mark.parametrize("load, user, expected", [(7.5, None, "PASSIVE"), (0.2, None, None), (7.5, "ACTIVE", "ACTIVE")])
def test_a_busy_machine_gets_a_passive_wait_policy_unless_the_user_chose(monkeypatch, load, user, expected):
    monkeypatch.setattr(cpu_threads, "usable_cpus", lambda: [0, 1])
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    if user:
        monkeypatch.setenv("OMP_WAIT_POLICY", user)
    cpu_threads.prefer_passive_waiting()
    assert os.environ.get("OMP_WAIT_POLICY") == expected


@pytest.mark.parametrize("busy, default, expected", [(1.9, 2, 1), (2.0, 2, 1), (0.1, 2, 2), (0.7, 4, 3), (None, 2, 2),
                                                     (0.0, 1, 1), (5.0, 8, 3)])
def test_threads_are_torchs_default_lowered_to_the_free_cpus(monkeypatch, busy, default, expected):
    cpus = list(range(max(default, 2) if busy is None or busy < 5 else 8))
    monkeypatch.setattr(cpu_threads, "usable_cpus", lambda: cpus)
    monkeypatch.setattr(cpu_threads, "busy_cpus", lambda cpus, seconds=0.25: busy)
    choice = cpu_threads.choose_threads(default)
    assert choice.threads == expected and choice.usable == len(cpus) and choice.busy == busy


def test_busy_cpus_reads_proc_stat_of_our_cpus_only():
    cpus = cpu_threads.usable_cpus()
    busy = cpu_threads.busy_cpus(cpus, 0.05)
    assert busy is None or 0.0 <= busy <= len(cpus)


def test_a_run_without_train_threads_says_what_it_chose(monkeypatch, caplog):
    """The run's header names the thread count, the CPUs, their load and the wait policy."""
    monkeypatch.setattr(cpu_threads, "usable_cpus", lambda: [0, 1])
    monkeypatch.setattr(cpu_threads, "busy_cpus", lambda cpus, seconds=0.25: 1.8)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    config = cfg.load(None, ["train.device=cpu"])
    with caplog.at_level(logging.INFO, logger="kdarena"):
        configure_torch(config, torch.device("cpu"))
    assert torch.get_num_threads() == 1
    assert any(r.getMessage().startswith("train.threads=auto: 1 CPU thread(s) (2 CPUs usable, 1.8 busy with other work; "
                                         "torch's default ") and r.getMessage().endswith(
        "OMP_WAIT_POLICY=PASSIVE); set train.threads to choose") for r in caplog.records), caplog.text
    config = cfg.load(None, ["train.device=cpu", "train.threads=2"])
    configure_torch(config, torch.device("cpu"))
    assert torch.get_num_threads() == 2  # the user's number, as given
