"""Damaged metrics.jsonl values never reach an export (issue 36: M2; checked by kdarena.records.read since issue 34):
a NaN elected the NaN network 'best' and wrote bare NaN into the card's JSON; a string crashed export."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kdarena.cli import main
from test_deploy import env, run, run_config, write_images  # noqa: F401  (module fixtures: one tiny run)
from test_deploy_errors import error_line


@pytest.mark.parametrize("value, fault", [("NaN", "input should be a finite number"), ('"71.3"', "valid number"),
                                          ("1e400", "finite number")])
def test_a_damaged_validation_value_is_one_line_and_writes_no_card(run, tmp_path, capsys, value, fault):
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    metrics = copy / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    record = json.loads(lines[-1])
    lines[-1] = lines[-1].replace(f'"net1/val_top1": {json.dumps(record["net1/val_top1"])}', f'"net1/val_top1": {value}')
    assert lines[-1] != json.dumps(record)
    metrics.write_text("\n".join(lines) + "\n")
    out = tmp_path / "net.safetensors"
    assert main(["export", str(copy), "--out", str(out)]) == 2
    error_line(capsys, f"{metrics} record", "net1/val_top1 is ")
    assert not out.exists() and not Path(f"{out}.card.json").exists()
