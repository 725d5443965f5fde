"""benchmarks/map3.py: the pre-registered study's statistics, its selection rule (validation only), and tables
rebuilt from committed summaries alone."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def map3(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("kdarena_map3_benchmark", ROOT / "benchmarks" / "map3.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(module, "PREREGISTRATION", tmp_path / "preregistration.md")
    return module


def _summary(val: float, test: float, train: float = 99.0) -> dict:
    nets = [{"name": f"net{i}", "last_val_top1": val + d, "best_val_top1": val + d + 1, "last_test_top1": test + d,
             "test_at_best_val_top1": test + d, "last_train_top1": train} for i, d in enumerate((-0.5, 0.5))]
    return {"networks": nets, "run_dir": "/somewhere/else", "wall_seconds": 60.0}


def _write(map3, cell: str, phase: int, label: str, seed: int, summary: dict) -> None:
    path = map3.RESULTS / cell / f"phase{phase}" / f"{label}-seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary))


def test_selection_reads_validation_only_and_breaks_ties_by_the_listed_order(map3):
    cell = "c10-5k"
    _, candidates = map3.phase1_methods("resnet8")
    names = [map3.label(c) for c in candidates]
    # the last candidate is best on test, the second on validation; the first is within 0.1 of the second
    for seed in (0, 1, 2):
        _write(map3, cell, 1, names[0], seed, _summary(val=60.95, test=60.0))
        _write(map3, cell, 1, names[1], seed, _summary(val=61.0, test=59.0))
        _write(map3, cell, 1, names[2], seed, _summary(val=50.0, test=80.0))
    chosen, scores = map3.select(cell)
    assert chosen == names[0]
    assert [s[2] for s in scores] == [3, 3, 3]
    _write(map3, cell, 1, names[0], 0, _summary(val=59.0, test=99.0))  # now 0.68 behind: the second wins
    assert map3.select(cell)[0] == names[1]


def test_selection_waits_for_every_candidate(map3):
    _, candidates = map3.phase1_methods("resnet8")
    _write(map3, "c10-5k", 1, map3.label(candidates[0]), 0, _summary(val=61.0, test=59.0))
    assert map3.select("c10-5k")[0] is None


def test_tables_hide_phase1_test_until_the_preregistration_exists(map3):
    for seed in (0, 1, 2):
        _write(map3, "c10-5k", 1, "independent", seed, _summary(val=60.0, test=12.34))
    text = map3.tables()
    assert "12.34" not in text and "last test" not in text
    assert "60.00 ± 0.00" in text
    plan = {"cells": {"c10-5k": {"methods": ["independent", "dml"], "seeds": [10, 11, 12],
                                 "comparisons": [["dml", "independent"]]}}}
    map3.PREREGISTRATION.write_text("# plan\n\n```json\n" + json.dumps(plan) + "\n```\n")
    for seed in (10, 11):
        _write(map3, "c10-5k", 2, "independent", seed, _summary(val=60.0, test=60.0 + seed / 10))
        _write(map3, "c10-5k", 2, "dml", seed, _summary(val=60.0, test=61.0 + seed / 10 + (0.1 if seed == 11 else 0)))
    assert "Interim: 2 of 3 pre-registered seeds" in map3.tables()
    _write(map3, "c10-5k", 2, "independent", 12, _summary(val=60.0, test=61.2))
    _write(map3, "c10-5k", 2, "dml", 12, _summary(val=60.0, test=62.2))
    text = map3.tables()
    assert "12.34" in text  # exploratory test accuracy, shown once the plan is fixed
    assert "| dml − independent | 3 | +1.03 |" in text and "Interim" not in text
    # one comparison: the corrected interval is the plain 95 % one (diffs 1.0, 1.1, 1.0: se 0.0333, t 4.303)
    assert "| +1.03 | [+0.89, +1.18] | 0.29 | [+0.89, +1.18] |" in text
    # exploratory readings: a metric the plan did not fix, plain 95 %; no ensemble in these summaries, no row for it
    assert "| dml − independent | test @ best val, mean over networks | 3 | +1.03 | [+0.89, +1.18] |" in text
    assert "ensemble, last test | 3" not in text
    assert (map3.RESULTS / "tables.md").read_text() == text


def test_collect_copies_each_finished_summary_once_with_its_sweep_time(map3, tmp_path):
    exp = tmp_path / "runs" / "c10-5k" / "phase1"
    (exp / "dml-seed0").mkdir(parents=True)
    (exp / "dml-seed1").mkdir(parents=True)  # unfinished: no summary
    (exp / "dml-seed0" / "summary.json").write_text(json.dumps(_summary(61.0, 60.0)))
    (exp / "sweep.json").write_text(json.dumps({"runs": [{"label": "dml", "seed": 0, "seconds": 420.0}]}))
    new = map3.collect(exp, "c10-5k", 1, commit=False)
    assert [p.name for p in new] == ["dml-seed0.json"]
    stored = json.loads(new[0].read_text())
    assert stored["sweep_seconds"] == 420.0 and "run_dir" not in stored
    assert map3.collect(exp, "c10-5k", 1, commit=False) == []


def test_only_runs_without_a_committed_summary_are_planned(map3):
    """A new machine has no run folders: what is committed decides what runs, and specs missing the same seeds
    share one sweep."""
    for seed in (0, 1, 2):
        _write(map3, "c10-5k", 1, "independent", seed, _summary(60.0, 60.0))
    for seed in (0, 1):
        _write(map3, "c10-5k", 1, "kdcl", seed, _summary(60.0, 60.0))
        _write(map3, "c10-5k", 1, "one", seed, _summary(60.0, 60.0))
    _write(map3, "c10-5k", 2, "kdcl", 2, _summary(60.0, 60.0))  # another phase does not count
    specs = ["independent", "kdcl", "one:method.name=one;perturb.enabled=false", "pcl"]
    assert map3.missing_grids("c10-5k", 1, specs, [0, 1, 2]) == [
        (["kdcl", "one:method.name=one;perturb.enabled=false"], "2"), (["pcl"], "0,1,2")]
    assert map3.missing_grids("c10-5k", 1, ["independent"], [0, 1, 2]) == []


PART4 = """```json
{"cells": {"c10-5k": {"methods": ["ours", "independent"], "seeds": [100, 101], "comparisons": [["ours", "independent"]]}}}
```

```json
{"part4": {"c10-5k": {"methods": ["new"], "check": ["old-rerun:method.name=dml", 100, "old"], "overrides": [],
                      "references": ["old"], "seeds": [100, 101], "comparisons": [["new", "old"]]}}}
```
"""


def _write_to(map3, cell: str, folder: str, label: str, seed: int, summary: dict) -> None:
    path = map3.RESULTS / cell / folder / f"{label}-seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary))


def test_part4_pairs_new_methods_with_committed_references_and_checks_the_rerun(map3):
    map3.PREREGISTRATION.write_text(PART4)
    assert map3.preregistered()["cells"]["c10-5k"]["methods"] == ["ours", "independent"]  # part three's block unchanged
    for seed, (new, old) in {100: (70.0, 68.0), 101: (71.0, 68.5)}.items():
        _write(map3, "c10-5k", 2, "old", seed, _summary(val=old, test=old))
        _write_to(map3, "c10-5k", "part4", "new", seed, _summary(val=new, test=new))
    _write_to(map3, "c10-5k", "part4", "old-rerun", 100, _summary(val=68.0, test=68.0))
    text = "\n".join(map3.part4_tables())
    assert "**identical**" in text
    assert "| new − old | 2 | +2.25 |" in text  # (2.0 + 2.5) / 2, paired by seed
    assert "| old-rerun |" not in text  # the check run is no method of the comparison
    _write_to(map3, "c10-5k", "part4", "old-rerun", 100, _summary(val=68.0, test=68.01))
    assert "**different**" in "\n".join(map3.part4_tables())


def test_ablation_reuses_phase1_runs_and_plans_only_the_missing_ones(map3):
    for seed in (0, 1, 2):
        _write(map3, "c10-5k", 1, "cd", seed, _summary(val=60.0, test=60.0 + seed))
    for seed in (0, 1):
        _write(map3, "c10-5k", 1, "cd-code", seed, _summary(val=62.0, test=62.0))
    _write(map3, "c10-5k", 1, "dml", 0, _summary(val=61.0, test=61.0))  # not an ablation variant
    for seed in (0, 1, 2):
        _write_to(map3, "c10-5k", "ablation", "cd-better", seed, _summary(val=61.0, test=61.0 + 2 * seed))
    runs = map3.ablation_results("c10-5k")
    assert set(runs) == {"cd", "cd-code", "cd-better"} and sorted(runs["cd-code"]) == [0, 1]
    grids = dict((tuple(map(map3.label, specs)), seeds)
                 for specs, seeds in map3.missing_grids("c10-5k", "ablation", map3.ABLATION, [0, 1, 2]))
    assert grids == {("cd-better-every10", "cd-code-noperturb", "cd-noperturb"): "0,1,2", ("cd-code",): "2"}
    text = "\n".join(map3.ablation_table("c10-5k"))
    # cd-better − cd on test: differences 1, 2, 3 -> mean 2, t-interval 2 +- 4.303 * 1/sqrt(3)
    assert "| cd-better − cd | rule: best -> better (every better peer teaches) | 3 | +1.00 [+1.00, +1.00] | +2.00 [-0.48, +4.48] |" in text
