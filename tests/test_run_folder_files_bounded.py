"""Files inside a run folder are read bounded and regular-only by export, train --resume and a resuming sweep
(issue 36: H1): metrics.jsonl as a FIFO hung them; as a link to /dev/zero it read until MemoryError."""
from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

from kdarena.cli import main
from test_deploy import env, run, run_config, write_images  # noqa: F401  (module fixtures: one tiny run)


def _within(seconds: float, command: list[str]) -> int:
    """``main(command)``'s exit code, failing the test if it has not returned within ``seconds``."""
    result: list[int] = []
    worker = threading.Thread(target=lambda: result.append(main(command)), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"{command[0]} blocked"
    return result[0]


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_a_metrics_file_that_is_not_a_regular_file_is_one_line(run, tmp_path, capsys, kind):
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    metrics = copy / "metrics.jsonl"
    metrics.unlink()
    if kind == "fifo":
        os.mkfifo(metrics)
    else:
        metrics.symlink_to("/dev/zero")
    what = "a FIFO" if kind == "fifo" else "a device"
    for command in (["train", "--resume", str(copy)], ["export", str(copy), "--out", str(tmp_path / "m.safetensors")]):
        assert _within(60, command) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("kdarena: error: ") and f"metrics.jsonl is {what}, not a regular file" in err[-1], err
        assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "m.safetensors").exists()
