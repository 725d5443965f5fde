"""``torchrun --nproc_per_node=2 -m kdarena train`` on CPU with gloo.

(a) every step, both ranks choose the same teacher and the same perturbation;
(b) 2 processes with batch B end with the same weights as 1 process with batch 2B (competitive
    distillation; BatchNorm-free ``mlp`` models and only deterministic perturbations, hflip/vflip,
    so the two runs compute the same thing up to float rounding);
(c) stop (train.stop_after_steps) and ``--resume`` under torchrun ends bitwise equal to an
    uninterrupted torchrun run (with the paper's random perturbations).

Each run is tiny: 256 8x8 digits, 2 epochs of 8 steps, one thread per process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from kdarena.engine import checkpoint as ckpt
from kdarena.config import dump, load

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"),
]

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 120
STEPS = 16  # 320 - 64 val = 256 samples / global batch 32 = 8 steps per epoch, 2 epochs
BASE = [
    "models=[mlp,mlp]",
    "data.name=digits",
    "data.train_subset=320",
    "data.val_size=64",
    "data.batch_size=16",
    "data.eval_batch_size=128",
    "method.name=cd",
    "perturb.enabled=true",
    "perturb.every=1",
    "optim.epochs=2",
    "optim.lr=0.05",
    "train.device=cpu",
    "train.threads=1",
    "train.precision=fp32",
    "train.channels_last=false",
    "train.progress=false",
    "train.tensorboard=false",
    "train.step_log=true",
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = "1"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def kdarena(args: list[str], processes: int) -> None:
    """``python -m kdarena ARGS`` (1 process) or ``torchrun --standalone --nproc_per_node=N -m kdarena ARGS``."""
    launcher = [sys.executable, "-m", "kdarena"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m", "kdarena"]
    done = subprocess.run(launcher + args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


def train(tmp: Path, name: str, *overrides: str, processes: int = 2) -> Path:
    config = tmp / f"{name}.yaml"
    config.write_text(dump(load(None, BASE + list(overrides))))
    run_dir = tmp / name
    kdarena(["train", str(config), "--out", str(run_dir)], processes)
    return run_dir


def steps(run_dir: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (run_dir / f"steps.rank{rank}.jsonl").read_text().splitlines()]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return ckpt.load(run_dir / "checkpoints" / "last.pt")["group"]


def decisions(records: list[dict]) -> list[tuple]:
    return [(r["step"], r["teacher"], None if r["perturbation"] is None else tuple(r["perturbation"])) for r in records]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            if name == "flip2":  # 2 processes x batch 16, deterministic perturbations only
                cache[name] = train(tmp, name, "perturb.ops=[hflip,vflip]")
            elif name == "flip1":  # 1 process x batch 32, otherwise the same
                cache[name] = train(tmp, name, "perturb.ops=[hflip,vflip]", "data.batch_size=32", processes=1)
            elif name == "paper2":  # 2 processes, the paper's random perturbation pool, uninterrupted
                cache[name] = train(tmp, name, "perturb.ops=paper")
            elif name == "resumed2":  # the same, stopped mid-epoch 2 and resumed under torchrun
                run_dir = train(tmp, name, "perturb.ops=paper", "train.stop_after_steps=11")
                assert len(steps(run_dir, 0)) == 11 and not (run_dir / "summary.json").exists()
                kdarena(["train", "--resume", str(run_dir), "train.stop_after_steps=null"], 2)
                cache[name] = run_dir
        return cache[name]

    return get


@pytest.mark.parametrize("name", ["flip2", "paper2"])
def test_ranks_choose_the_same_teacher_and_perturbation_every_step(runs, name):
    run_dir = runs(name)
    rank0, rank1 = steps(run_dir, 0), steps(run_dir, 1)
    assert [r["step"] for r in rank0] == list(range(STEPS))
    assert decisions(rank0) == decisions(rank1)
    assert all(r["perturbation"] is not None for r in rank0)  # perturb.every=1
    assert len({r["teacher"] for r in rank0}) == 2, "the test should see both networks teach"
    assert rank0 == rank1  # logged losses are global-batch means, identical on every rank
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert not (run_dir / "steps.rank2.jsonl").exists()


def test_two_processes_match_one_process_with_twice_the_batch(runs):
    two, one = runs("flip2"), runs("flip1")
    assert decisions(steps(two, 0)) == decisions(steps(one, 0))
    for a, b in zip(steps(two, 0), steps(one, 0)):
        assert a["losses"] == pytest.approx(b["losses"], abs=1e-5)
    w2, w1 = weights(two), weights(one)
    assert w2.keys() == w1.keys()
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=0, atol=1e-6, msg=lambda m: f"{key}: {m}")
    # evaluation covers the whole validation/test sets on both: same metrics up to rounding
    m2 = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    m1 = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    for r2, r1 in zip(m2, m1):
        for key in ("net0/test_top1", "net1/test_top1", "ensemble/test_top1", "net0/val_top1", "net0/train_top1"):
            assert r2[key] == pytest.approx(r1[key], abs=1e-9), key


def test_stop_and_resume_under_torchrun_is_exact(runs):
    full, resumed = runs("paper2"), runs("resumed2")
    for rank in (0, 1):
        assert steps(resumed, rank) == steps(full, rank)
    a, b = weights(resumed), weights(full)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ after resume: {different}"
    metrics = lambda d: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["net0/test_top1"] for r in metrics(resumed)] == [r["net0/test_top1"] for r in metrics(full)]


def test_resume_refuses_another_global_batch(runs, capsys):
    from kdarena.cli import main

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:  # one process with batch 16: a global batch of 16, not the checkpoint's 16 x 2
        assert main(["train", "--resume", str(runs("resumed2")), "data.batch_size=16"]) == 2
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    assert "global batch of 16 x 2 process(es)" in capsys.readouterr().err


def test_sync_batchnorm_is_refused_on_cpu(tmp_path, monkeypatch):
    """torch's SyncBatchNorm raises on CPU tensors: a 2-process CPU run stops with a config error up front."""
    from kdarena.engine import distributed as dist_utils
    from kdarena.config import ConfigError
    from kdarena.trainer import Trainer

    monkeypatch.setattr(dist_utils, "from_environment", lambda: dist_utils.DistInfo(rank=0, world_size=2, local_rank=0))
    monkeypatch.setattr(dist_utils, "init", lambda info, device: None)  # no process group: collectives are no-ops
    threads = torch.get_num_threads()
    try:
        with pytest.raises(ConfigError, match="sync_batchnorm"):
            Trainer(load(None, BASE + ["models=[convnet,convnet]", "train.sync_batchnorm=true"]), tmp_path / "run")
    finally:
        torch.set_num_threads(threads)
