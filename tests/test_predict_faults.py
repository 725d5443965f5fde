"""``kdarena predict`` under hostile and careless input (issue 36: H2, H4, M7, M8 and two lows).

Each case runs the command line on the tiny run of ``test_deploy`` and checks the exit code, the
single error line and what was (not) printed.
"""
from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
from pathlib import Path

import pytest

from kdarena.cli import main
from kdarena.deploy import inputs
from kdarena.deploy.predict import Predictions, render
from test_deploy import CLASSES, env, run, run_config, write_images  # noqa: F401  (module fixtures: one tiny run)
from test_deploy_errors import error_line


def _tar_gz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_an_archive_member_over_predicts_budget_is_refused_before_it_is_read(run, env, tmp_path, capsys, monkeypatch):
    """H2: predict read each member whole (a 14 MB tar.gz with a 3 GiB member peaked at 3.4 GB). The default
    budget (1 GB) is lowered here so that a 3 MB member stands for the 3 GiB one."""
    good = (env / "data" / "test" / "cat" / "000.png").read_bytes()
    archive = _tar_gz(tmp_path / "in.tar.gz", {"a/000.png": good, "a/huge.png": bytes(3_000_000)})
    monkeypatch.setattr(inputs, "ARCHIVE_MAX_GB", 0.002)
    assert main(["predict", str(run), str(archive)]) == 2
    error_line(capsys, f"{archive}: image files exceed the memory budget", "at member a/huge.png (3000000 bytes)")


def test_the_budget_option_raises_and_checks_the_limit(run, env, tmp_path, capsys):
    good = (env / "data" / "test" / "cat" / "000.png").read_bytes()
    archive = _tar_gz(tmp_path / "in.tar.gz", {"a/000.png": good, "a/001.png": good})
    assert main(["predict", str(run), str(archive), "--cache-max-gb", "0.0000001"]) == 2
    error_line(capsys, "exceed the memory budget")
    assert main(["predict", str(run), str(archive), "--cache-max-gb", "0.01", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["images"] == 2
    assert main(["predict", str(run), str(archive), "--cache-max-gb", "nan"]) == 2
    error_line(capsys, "--cache-max-gb nan: give a number of GB above 0")


@pytest.mark.parametrize("size", ["-1", "0"])
def test_a_batch_size_below_one_is_one_line(run, env, capsys, size):
    """H4: --batch-size -1 printed '0 images' and exited 0."""
    assert main(["predict", str(run), str(env / "data" / "test"), "--batch-size", size]) == 2
    assert error_line(capsys) == f"kdarena: error: --batch-size is {size}: give a whole number of images from 1 to 65536"


def test_a_card_with_a_negative_eval_batch_size_is_one_line(run, env, tmp_path, capsys):
    """H4: a card with eval_batch_size -5 predicted on nothing, exit 0."""
    out = tmp_path / "net.safetensors"
    assert main(["export", str(run), "--out", str(out)]) == 0
    card_path = Path(f"{out}.card.json")
    card = json.loads(card_path.read_text())
    card["config"]["data"]["eval_batch_size"] = -5
    card_path.write_text(json.dumps(card))
    capsys.readouterr()
    assert main(["predict", str(out), str(env / "data" / "test")]) == 2
    error_line(capsys, "the model card's config.data.eval_batch_size is -5: give a whole number of images from 1 to 65536; "
                       "pass --batch-size")
    assert main(["predict", str(out), str(env / "data" / "test"), "--batch-size", "7", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["images"] == 24


def test_an_image_given_as_a_link_is_predicted(run, env, tmp_path, capsys):
    """M8: a symlinked image was skipped ('Too many levels of symbolic links'), exit 0."""
    link = tmp_path / "photo.png"
    link.symlink_to(env / "data" / "test" / "dog" / "001.png")
    assert main(["predict", str(run), str(link), "--format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["summary"] == {"images": 1, "skipped": 0, "labelled": 0}
    assert result["predictions"][0]["image"] == str(link)


def test_every_input_skipped_is_an_error_and_skips_are_one_warning(run, env, tmp_path, capsys, caplog):
    """Lows: exit 0 when every input was skipped; one warning line per skipped file."""
    folder = tmp_path / "bad"
    folder.mkdir()
    for k in range(5):
        (folder / f"{k}.png").write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING, logger="kdarena"):
        assert main(["predict", str(run), str(folder)]) == 2
    error_line(capsys, "none of the 5 image(s) could be decoded (first: ", "0.png")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].getMessage().startswith("skipped 5 image(s) that cannot be decoded; first: ")
    shutil.copy(env / "data" / "test" / "cat" / "000.png", folder / "9.png")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdarena"):
        assert main(["predict", str(run), str(folder), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"] == {"images": 1, "skipped": 5, "labelled": 0}
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_names_cannot_drive_the_terminal_or_a_spreadsheet(run, env, tmp_path, capsys):
    """M7: newlines and escape codes in file and class names reached the table; CSV formulas were not neutralised."""
    folder = tmp_path / "in"
    folder.mkdir()
    evil = "x\n\x1b[2Jy=.png"
    shutil.copy(env / "data" / "test" / "cat" / "000.png", folder / evil)
    assert main(["predict", str(run), str(folder)]) == 0
    table = capsys.readouterr().out
    assert "\x1b" not in table and "x\\x0a\\x1b[2Jy=.png" in table
    assert len(table.splitlines()) == 1 + 1 + 1


def test_csv_and_json_cells_from_a_card(run):
    """M7: a class named '=cmd' or '-2+3' is text in CSV; a NaN probability is null in JSON, never a bare NaN."""
    card = {"classes": ["=cmd|' /C calc'!A0", "-2+3", "@SUM(1)"], "architecture": ["resnet8"], "network": "net0",
            "num_classes": 3}
    result = Predictions(card, names=["+a.png"], labels=[0], top=[[(0, float("nan")), (1, 0.5), (2, 0.25)]])
    rows = render(result, "csv").splitlines()
    assert rows[1] == "'+a.png,'=cmd|' /C calc'!A0,'=cmd|' /C calc'!A0,nan,'-2+3,0.500000,'@SUM(1),0.250000"
    text = render(result, "json")
    assert "NaN" not in text
    assert json.loads(text)["predictions"][0]["top"][0] == {"class": "=cmd|' /C calc'!A0", "probability": None}
