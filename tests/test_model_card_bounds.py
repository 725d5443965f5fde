"""A tampered model card cannot set the memory predict and load_model use (issue 36: H3, M6): sizes, ensemble
size, class count and std are bounded before anything is built from the card."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdarena import models
from kdarena.cli import main
from test_deploy import env, run, run_config, write_images  # noqa: F401  (module fixtures: one tiny run)
from test_deploy_errors import error_line


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("card") / "net.safetensors"
    assert main(["export", str(run), "--out", str(out)]) == 0
    return out


def _edit(exported: Path, tmp_path: Path, edit) -> Path:
    out = tmp_path / exported.name
    out.write_bytes(exported.read_bytes())
    card = json.loads(Path(f"{exported}.card.json").read_text())
    edit(card)
    Path(f"{out}.card.json").write_text(json.dumps(card))
    return out


def _image_size(card, side=8000):
    card["input"]["shape"][1:] = [side, side]
    card["preprocessing"]["size"] = [side, side]


def _ensemble(card, count=200):
    card["network"], card["architecture"], card["networks"] = "ensemble", ["wrn28_10"] * count, list(range(count))


def _std(card):
    card["preprocessing"]["std"] = [1e-310] * len(card["preprocessing"]["std"])


def _classes(card):
    card["num_classes"], card["classes"] = 10**9, ["x"]


@pytest.mark.parametrize("edit, fragment", [
    (_image_size, "input.shape.1 is 8000: input should be less than or equal to 1024"),
    (_ensemble, "networks is list: list should have at most 16 items after validation, not 200"),
    (_std, "preprocessing.std.0 is 1e-310: input should be greater than or equal to 0.001"),
    (_classes, "num_classes is 1000000000: input should be less than or equal to 100000"),
])
def test_a_card_out_of_bounds_is_one_line_and_builds_nothing(exported, env, tmp_path, capsys, monkeypatch, edit, fragment):
    model = _edit(exported, tmp_path, edit)
    capsys.readouterr()
    built = []
    monkeypatch.setattr(models, "create", lambda *a, **k: built.append(a))
    assert main(["predict", str(model), str(env / "data" / "test" / "cat" / "000.png")]) == 2
    line = error_line(capsys, f"model card {model}.card.json", "export the run again")
    assert f"card.json: {fragment}; export the run again" in line, line
    assert built == []
