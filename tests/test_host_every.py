"""Non-finite batches and the deferred host read (train.host_every).

* A NaN/Inf batch leaves every BatchNorm statistic and every parameter of the diverged networks
  untouched, and is counted (``net{i}/skipped_steps``), whichever path reads the losses.
* Reading the step's numbers every k steps (no device sync in between) gives the same losses,
  teachers, perturbations, skipped steps and final weights as reading every step, bit for bit (fp32).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))
from cases import BASE, CASES, summarize  # noqa: E402

from kdarena.config import ConfigError, load  # noqa: E402
from kdarena.engine.recovery import NonFiniteLossError  # noqa: E402
from kdarena.trainer import Trainer  # noqa: E402

GOLDEN = json.loads((Path(__file__).parent / "golden" / "steps.json").read_text())
BAD_STEP = 3



def _poison(trainer: Trainer, at: int = BAD_STEP) -> Trainer:
    """Put an Inf pixel into the batch of global step ``at`` (every network sees it)."""
    step = trainer.train_step

    def poisoned(x, y, index=None, views=None):
        if trainer.loop.global_step == at:
            x = x.clone()
            x[0, 0, 0, 0] = float("inf")
        return step(x, y, index, views)

    trainer.train_step = poisoned
    return trainer


def _bn_buffers(trainer: Trainer) -> list[torch.Tensor]:
    return [b.detach().clone() for name, b in trainer.group.named_buffers() if "running" in name or "num_batches" in name]


@pytest.mark.parametrize("host_every", [1, 4])
def test_a_nonfinite_batch_leaves_batchnorm_and_weights_untouched_and_is_counted(tmp_path, host_every):
    config = load(None, BASE + CASES["dml"] + [f"train.host_every={host_every}"])
    trainer = _poison(Trainer(config, run_dir=tmp_path / "run"))
    snapshots = {}
    step = trainer.train_step

    def watch(x, y, index=None, views=None):
        if trainer.loop.global_step == BAD_STEP:
            snapshots["before"] = (_bn_buffers(trainer), [p.detach().clone() for p in trainer.group.parameters()])
            out = step(x, y, index, views)
            snapshots["after"] = (_bn_buffers(trainer), [p.detach().clone() for p in trainer.group.parameters()])
            return out
        return step(x, y, index, views)

    trainer.train_step = watch
    trainer.fit()
    (bn_before, w_before), (bn_after, w_after) = snapshots["before"], snapshots["after"]
    assert all(torch.equal(a, b) for a, b in zip(bn_before, bn_after)), "a non-finite batch moved BatchNorm statistics"
    assert all(torch.equal(a, b) for a, b in zip(w_before, w_after)), "a non-finite step changed weights"
    assert all(torch.isfinite(b).all() for b in trainer.group.buffers())
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["net0/skipped_steps"] == 1 and record["net1/skipped_steps"] == 1
    assert record["net0/val_top1"] > 25 and record["net1/val_top1"] > 25  # not at chance (10 %; NaN statistics gave 9.4)


@pytest.mark.parametrize("name", ["ind", "dml", "cd", "cd-code", "kd"])
def test_reading_every_k_steps_gives_the_same_run_bit_for_bit(tmp_path, name):
    """Against a run that reads every step on the same machine (the golden numbers hold bit for bit only on
    CPUs whose float32 kernels round as the recording machine's; see tests/golden/cases.py)."""
    runs = {}
    for k in (1, 3):
        trainer = Trainer(load(None, BASE + CASES[name] + [f"train.host_every={k}"]), run_dir=tmp_path / f"{name}-k{k}")
        assert trainer.host_every == k
        trainer.fit()
        runs[k] = summarize(tmp_path / f"{name}-k{k}", trainer.group.state_dict())
    assert runs[3] == runs[1]
    assert runs[1]["teachers"] == GOLDEN[name]["teachers"]  # and it is the pinned run


def test_a_skipped_step_read_late_matches_one_read_at_once(tmp_path):
    runs = {}
    for k in (1, 5):
        trainer = _poison(Trainer(load(None, BASE + CASES["cd"] + [f"train.host_every={k}"]), run_dir=tmp_path / f"k{k}"))
        trainer.fit()
        runs[k] = (summarize(tmp_path / f"k{k}", trainer.group.state_dict()),
                   json.loads((tmp_path / f"k{k}" / "metrics.jsonl").read_text())["net0/skipped_steps"])
    assert runs[1] == runs[5]
    assert runs[1][1] == 1


def test_stop_is_raised_when_the_late_read_sees_the_nonfinite_step(tmp_path):
    config = load(None, BASE + CASES["dml"] + ["train.host_every=4", "train.nonfinite=stop"])
    trainer = _poison(Trainer(config, run_dir=tmp_path / "r"), at=1)
    with pytest.raises(NonFiniteLossError, match=r"network\(s\) \[0, 1\] produced a non-finite loss at step 1 "):
        trainer.fit()
    assert trainer.loop.global_step == 3  # raised while step 3 ran: steps 0-3 are read together after it


@pytest.mark.parametrize("extra", [["train.nonfinite=rebirth"], ["perturb.parameters.enabled=true"]])
def test_deferred_reads_refuse_what_acts_on_the_host_every_step(tmp_path, extra):
    with pytest.raises(ConfigError, match="train.host_every=2 cannot be combined with"):
        Trainer(load(None, BASE + CASES["dml"] + ["train.host_every=2"] + extra), run_dir=tmp_path / "r")
    assert load(None, BASE + CASES["dml"] + extra).host_every("cuda") == 1  # the default falls back to 1
    assert load(None, BASE + CASES["dml"]).host_every("cuda") == 8 and load(None, BASE + CASES["dml"]).host_every("cpu") == 1
