"""examples/quickstart.py runs as documented and every network learns the digits."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("sklearn")


def test_quickstart_example_reaches_90_percent():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--seed", "0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = re.findall(r"network (\d+): test accuracy ([\d.]+)%  teacher share ([\d.]+)", result.stdout)
    assert [int(i) for i, _, _ in lines] == [0, 1], result.stdout
    for _, accuracy, _ in lines:
        assert float(accuracy) >= 90.0, result.stdout
    assert sum(float(share) for _, _, share in lines) == pytest.approx(1.0, abs=0.011)
