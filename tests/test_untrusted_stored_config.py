"""A checkpoint's stored config is untrusted input (issue 36: M5): no download it asks for, no data root it
names that is not a data set's folder."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kdarena.cli import main
from kdarena.engine import checkpoint as ckpt
from test_deploy import env, run, run_config, write_images  # noqa: F401  (module fixtures: one tiny run)
from test_deploy_errors import error_line


def _tampered(run: Path, tmp_path: Path, **data) -> Path:
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    for name in ("best", "last"):
        path = copy / "checkpoints" / f"{name}.pt"
        state = ckpt.load(path, required=ckpt.EVAL_KEYS)
        state["config"]["data"].update(data)
        ckpt.save_atomic(state, path, keep_previous=False)
    return copy


def test_a_stored_root_that_is_no_data_set_is_not_walked(run, tmp_path, capsys, monkeypatch):
    """data.root: / walked the whole file system."""
    copy = _tampered(run, tmp_path, root="/")
    walked = []
    import kdarena.data.sources as sources

    monkeypatch.setattr(sources, "scan_folder", lambda root, wanted: walked.append(root))
    # the run recorded its inputs (issue 37): export needs no data, so it exports without the root, unwalked
    assert main(["export", str(copy), "--out", str(tmp_path / "m.safetensors")]) == 0
    (copy / "inputs.json").unlink()  # as a run trained before inputs.json: export must rebuild the data
    for command in (["eval", str(copy / "checkpoints" / "best.pt")], ["export", str(copy), "--out", str(tmp_path / "m.safetensors")]):
        assert main(command) == 2
        error_line(capsys, "names data.root=/, which holds no train/ folder of imagefolder images; pass data.root=FOLDER")
    assert walked == []


def test_the_user_may_pass_the_root(run, env, tmp_path, capsys):
    copy = _tampered(run, tmp_path, root="/")
    assert main(["eval", str(copy / "checkpoints" / "best.pt"), f"data.root={env / 'data'}"]) == 0


def test_a_stored_download_is_never_started(run, env, tmp_path, monkeypatch):
    """download: true created a folder of the file's choosing and started a download."""
    copy = _tampered(run, tmp_path, download=True, root=str(env / "data"))
    state = ckpt.load(copy / "checkpoints" / "best.pt", required=ckpt.EVAL_KEYS)
    assert ckpt.stored_config(state, [], "best.pt").data.download is False
    assert ckpt.stored_config(state, ["data.download=true"], "best.pt").data.download is True
    assert ckpt.stored_config(state, ["data={download: true}"], "best.pt").data.download is True
