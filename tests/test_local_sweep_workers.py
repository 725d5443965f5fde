"""A ``--jobs 2`` sweep's workers die with its process (issue 36: M10).

Killing the driver (SIGKILL or SIGTERM) left orphaned workers that trained even the queued runs and
never exited (~480 MB each); an immediate rerun then marked those runs failed.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BASE = {"name": "jobs", "models": ["convnet", "convnet"], "data": {"name": "digits", "val_size": 200, "batch_size": 128},
        "perturb": {"enabled": False}, "optim": {"epochs": 200},
        "train": {"progress": False, "tensorboard": False, "threads": 1, "device": "cpu"}}


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_workers_stop_and_checkpoint_when_the_driver_is_killed(tmp_path, how):
    config = tmp_path / "jobs.yaml"
    config.write_text(yaml.safe_dump(BASE))
    exp = tmp_path / "exp"
    driver = subprocess.Popen([sys.executable, "-m", "kdarena.cli", "sweep", str(config), "--methods", "dml,independent,cd",
                               "--seeds", "0", "--jobs", "2", "--out", str(exp)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 180
        while not list(exp.glob("*/checkpoints/last.pt")):
            assert driver.poll() is None and time.monotonic() < deadline, "the sweep did not start training"
            time.sleep(0.2)
        workers = [pid for pid in _children(driver.pid) if "resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_text()]
        assert workers
        driver.send_signal(how)
        driver.wait(30)
        deadline = time.monotonic() + 60
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in workers), "workers outlived the sweep's process"
        trained = [run for run in exp.iterdir() if (run / "metrics.jsonl").is_file()]
        assert len(trained) <= 2  # the queued third run never started
        for run in trained:
            assert (run / "checkpoints" / "last.pt").is_file()
            assert not (run / "summary.json").exists()  # stopped, not trained to the end
            epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
            assert len(epochs) < BASE["optim"]["epochs"]
    finally:
        if driver.poll() is None:
            driver.kill()
        for pid in workers:  # on a failure: the orphans this test made
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_second_sweep_on_the_same_out_is_refused_and_the_first_finishes(tmp_path, capsys):
    """M12: two drivers on one --out both exited 2 and sweep.json called the other's finished runs failed."""
    from kdarena import cli

    config = tmp_path / "jobs.yaml"
    config.write_text(yaml.safe_dump({**BASE, "optim": {"epochs": 8}}))
    exp = tmp_path / "exp"
    first = subprocess.Popen([sys.executable, "-m", "kdarena.cli", "sweep", str(config), "--methods", "dml,independent",
                              "--seeds", "0", "--out", str(exp)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    try:
        deadline = time.monotonic() + 180
        while not list(exp.glob("*/metrics.jsonl")):
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
            time.sleep(0.2)
        index_before = (exp / "sweep.json").read_text()
        assert cli.main(["sweep", str(config), "--methods", "dml,independent", "--seeds", "0", "--out", str(exp)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"kdarena: error: run directory {exp} is in use by another kdarena run (PID {first.pid}); wait for it "
                       "to end, or choose another directory with --out"]
        assert first.poll() is None  # still training, untouched
        output = first.communicate(timeout=600)[0]
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, output
    runs = json.loads((exp / "sweep.json").read_text())["runs"]
    assert sorted(r["status"] for r in runs) == ["trained", "trained"], index_before
