"""Write steps.json: ``python tests/golden/record.py`` (only when a change is meant to alter the numbers)."""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import BASE, CASES, summarize  # noqa: E402

from kdarena.config import load  # noqa: E402
from kdarena.trainer import Trainer  # noqa: E402


def run(name: str, out: Path) -> dict:
    trainer = Trainer(load(None, BASE + CASES[name]), run_dir=out / name)
    trainer.fit()
    return summarize(out / name, trainer.group.state_dict())


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        result = {name: run(name, Path(tmp)) for name in CASES}
    (Path(__file__).parent / "steps.json").write_text(json.dumps(result, indent=1))
    print({k: (len(v["teachers"]), v["teachers"][:6]) for k, v in result.items()})
