"""Pinned 20-step runs: the refactors since f71953f change no loss, teacher, perturbation or weight (CPU fp32)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))
from cases import BASE, CASES, summarize  # noqa: E402

from kdarena.config import load  # noqa: E402
from kdarena.trainer import Trainer  # noqa: E402

GOLDEN = json.loads((Path(__file__).parent / "golden" / "steps.json").read_text())



@pytest.mark.parametrize("name", sorted(CASES))
def test_twenty_steps_match_the_recorded_run_bit_for_bit(tmp_path, name):
    trainer = Trainer(load(None, BASE + CASES[name]), run_dir=tmp_path / name)
    trainer.fit()
    got = summarize(tmp_path / name, trainer.group.state_dict())
    want = GOLDEN[name]
    assert got["teachers"] == want["teachers"]
    assert got["perturbations"] == want["perturbations"]
    assert got["losses"] == want["losses"]  # floats compared exactly
    assert got["weights"] == want["weights"]
