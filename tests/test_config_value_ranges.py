"""Config values that were tracebacks deep in training (issue 36: M13): each is one line, exit 2, no run folder."""
from __future__ import annotations

import pytest
import yaml

from kdarena.cli import main

BASE = {"name": "ranges", "models": ["convnet", "convnet"], "data": {"name": "digits", "val_size": 100, "batch_size": 64},
        "perturb": {"enabled": False}, "optim": {"epochs": 1},
        "train": {"progress": False, "tensorboard": False, "threads": 1, "device": "cpu"}}


@pytest.mark.parametrize("override, expected", [
    ("optim.lr=1.0e+308", "bad value for 'optim.lr' (got 1e+308): must be at most 1e+30 (the optimizer's step is taken "
                          "in float32)"),
    ("data.crop_padding=1000000", "bad value for 'data.crop_padding' (got 1000000): Input should be less than or equal to 256"),
    ("optim.betas=[1.5,0.9]", "bad value for 'optim.betas.0' (got 1.5): Input should be less than 1"),
    ("optim.betas=[0.9,1.0]", "bad value for 'optim.betas.1' (got 1.0): Input should be less than 1"),
    ("data.val_size=0.9999999999999999", "data.val_size=0.9999999999999999 leaves no training data (1437 samples); "
                                         "use a smaller value"),
])
def test_out_of_range_values_are_one_line(tmp_path, capsys, override, expected):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(BASE))
    extra = ["optim.name=adamw"] if "betas" in override else []
    assert main(["train", str(config), override, *extra, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"kdarena: error: {expected}"), err
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "run").exists()
