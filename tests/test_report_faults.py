"""``kdarena report`` and ``kdarena plot`` on damaged and hostile run folders (issue #27 point 9),
and the report's baselines and paired intervals (issue #26 point 5).

Each test builds its experiment from small files it writes: three seeds of ``independent`` and
``dml`` that are valid, plus one damaged run. The damaged run is skipped with one warning line that
names its file and the fault; the others are still reported; no NaN, inf or out-of-range top-1
reaches a table. Every case below crashed (AttributeError, OverflowError, TypeError), hung, or
tabulated the bad number before the fix.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from kdarena.cli import main

# seed -> last-epoch top-1 and top-1 at best val of net0 / net1
GOOD = {
    "independent": {0: ((70.0, 71.0), (70.5, 71.5)), 1: ((68.0, 69.5), (68.5, 70.0)), 2: ((71.0, 70.0), (71.5, 70.5))},
    "dml": {0: ((72.0, 72.5), (72.0, 73.0)), 1: ((70.5, 70.0), (71.0, 70.5)), 2: ((71.5, 73.0), (72.0, 73.5))},
}


def summary(method: str, seed: int, last=(70.0, 71.0), at_val=(70.5, 71.5)) -> dict:
    """A summary.json as the trainer writes it (the fields report reads, and a few it does not)."""
    nets = [{"name": f"net{i}", "last_test_top1": l, "last_test_top5": 99.0, "best_val_top1": v, "best_val_epoch": 1,
             "test_at_best_val_top1": v, "best_test_top1_selected_on_test": max(l, v), "best_test_epoch": 1,
             "teacher_share": 0.5, "last_train_top1": 90.0} for i, (l, v) in enumerate(zip(last, at_val))]
    return {"epochs": 2, "selection_split": "val", "networks": nets,
            "ensemble": {"name": "ensemble", "last_test_top1": max(last), "test_at_best_val_top1": max(at_val)},
            "wall_seconds": 3.5, "images_per_s": 900.0, "perturbed_steps": 0, "perturbed_won": 0,
            "config": {"seed": seed, "models": ["convnet", "convnet"], "method": {"name": method},
                       "perturb": {"enabled": False, "ops": ["noise"]},
                       "data": {"name": "digits", "val_size": 200, "batch_size": 128},
                       "optim": {"name": "sgd", "lr": 0.1, "epochs": 2, "schedule": "cosine"}}}


def metrics(top1=(60.0, 70.0)) -> str:
    return "".join(json.dumps({"epoch": e, "net0/test_top1": t, "net1/test_top1": t + 1, "ensemble/test_top1": t + 2,
                               "net0/ce": 1.0 / (e + 1), "net1/ce": 1.1 / (e + 1), "net0/teacher_share": 0.5,
                               "net1/teacher_share": 0.5}) + "\n" for e, t in enumerate(top1))


def good_experiment(root: Path, runs: dict = GOOD) -> Path:
    for method, seeds in runs.items():
        for seed, (last, at_val) in seeds.items():
            run = root / f"{method}-seed{seed}"
            run.mkdir(parents=True)
            (run / "summary.json").write_text(json.dumps(summary(method, seed, last, at_val)))
            (run / "metrics.jsonl").write_text(metrics())
    return root


def cli(capsys, caplog, *argv: str) -> tuple[int, str, str, list[str]]:
    """Exit code, stdout, stderr and the warning lines of one in-process ``kdarena`` call."""
    capsys.readouterr()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdarena"):
        code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err.strip(), [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def assert_one_warning(warnings: list[str], *needles: str) -> None:
    assert len(warnings) == 1, warnings
    assert "\n" not in warnings[0] and warnings[0].startswith("kdarena: warning: skipping a damaged run: "), warnings[0]
    for needle in needles:
        assert needle in warnings[0], (needle, warnings[0])


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("kdarena: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def assert_good_runs_reported(text: str) -> None:
    """Both valid methods are in the table with their three seeds; the damaged ``cd`` is not; no bad number shows."""
    rows = [_cells(l) for l in text.splitlines() if l.startswith("| ")]
    for method in ("independent", "dml"):
        assert [method, "net0 (convnet)", "3"] in [r[:3] for r in rows], method
    assert not any(r[0] == "cd" for r in rows)
    assert "Paired differences vs **independent**" in text
    for word in ("nan", "inf", "e+"):
        assert word not in text.lower(), word


# ============================================================================== report: one damaged summary.json
def _with(**changes):
    data = summary("cd", 0)
    for key, value in changes.items():
        data[key] = value
    return json.dumps(data)


def _net0(field: str, raw: str) -> str:
    """The cd summary with net0's ``field`` written as raw JSON text (1e400, NaN and Infinity have no Python literal)."""
    data = summary("cd", 0)
    data["networks"][0][field] = "__RAW__"
    return json.dumps(data).replace('"__RAW__"', raw)


DAMAGED_SUMMARIES = [  # (id, text of cd-seed0/summary.json, words the warning must contain)
    ("a list", "[]", ["the top level must be an object", "not list"]),
    ("config a string", _with(config="x"), ["config is 'x'", "dictionary"]),
    ("networks of numbers", _with(networks=[1, 2]), ["networks.0 is 1", "dictionary"]),
    ("top-1 1e400", _net0("last_test_top1", "1e400"), ["networks.0.last_test_top1", "too large for a float"]),
    ("top-1 NaN", _net0("last_test_top1", "NaN"), ["networks.0.last_test_top1 is NaN"]),
    ("top-1 inf", _net0("test_at_best_val_top1", "Infinity"), ["networks.0.test_at_best_val_top1", "too large"]),
    ("top-1 1e308", _net0("last_test_top1", "1e308"), ["networks.0.last_test_top1 is 1e+308", "less than or equal to 100"]),
    ("top-1 negative", _net0("last_test_top1", "-3"), ["networks.0.last_test_top1 is -3", "greater than or equal to 0"]),
    ("top-1 a string", _net0("last_test_top1", '"71.3"'), ["networks.0.last_test_top1 is '71.3'", "valid number"]),
    ("top-1 a boolean", _net0("last_test_top1", "true"), ["networks.0.last_test_top1 is True"]),
    ("teacher share 2", _net0("teacher_share", "2.0"), ["networks.0.teacher_share is 2.0", "less than or equal to 1"]),
    ("ensemble 1e308", _with(ensemble={"last_test_top1": 1e308}), ["ensemble.last_test_top1"]),
    ("extra network 500", _with(extra={"mean0": {"last_test_top1": 500.0}}), ["extra.mean0.last_test_top1 is 500.0"]),
    ("wall time 1e308", _with(wall_seconds=1e308), ["wall_seconds is 1e+308"]),
    ("won > steps", _with(perturbed_steps=3, perturbed_won=5), ["perturbed_won 5 exceeds perturbed_steps 3"]),
    ("steps a float", _with(perturbed_steps=1e300), ["perturbed_steps", "valid integer"]),
    ("models of numbers", json.dumps({**summary("cd", 0), "config": {**summary("cd", 0)["config"], "models": [1, 2]}}),
     ["config.models.0 is 1"]),
    ("perturb ops of numbers", json.dumps({**summary("cd", 0), "config": {**summary("cd", 0)["config"], "perturb": {"ops": [7]}}}),
     ["config.perturb.ops"]),
    ("seed a string", json.dumps({**summary("cd", 0), "config": {**summary("cd", 0)["config"], "seed": "0"}}),
     ["config.seed is '0'"]),
    ("no evaluation", _with(networks=[]), ["holds no evaluation"]),
    ("cut short", _with()[:100], ["is not valid JSON"]),
    ("nested too deeply", "[" * 100_000 + "]" * 100_000, ["nested too deeply"]),
]


@pytest.mark.parametrize("text, needles", [c[1:] for c in DAMAGED_SUMMARIES], ids=[c[0] for c in DAMAGED_SUMMARIES])
def test_report_skips_a_damaged_summary_and_reports_the_rest(tmp_path, capsys, caplog, text, needles):
    exp = good_experiment(tmp_path / "exp")
    (exp / "cd-seed0").mkdir()
    (exp / "cd-seed0" / "summary.json").write_text(text)
    code, out, err, warnings = cli(capsys, caplog, "report", str(exp))
    assert code == 0, err
    assert_one_warning(warnings, str(exp / "cd-seed0" / "summary.json"), *needles)
    assert_good_runs_reported(out)
    assert (exp / "report.md").read_text() + "\n" == out  # print adds the last newline


@pytest.mark.parametrize("kind", ["fifo", "link to /dev/zero", "not UTF-8", "a directory"])
def test_report_never_blocks_on_a_summary_that_is_not_a_small_file(tmp_path, capsys, caplog, kind):
    exp = good_experiment(tmp_path / "exp")
    run = exp / "cd-seed0"
    run.mkdir()
    path = run / "summary.json"
    if kind == "fifo":
        os.mkfifo(path)  # reading it would wait forever for a writer
    elif kind == "link to /dev/zero":
        path.symlink_to("/dev/zero")  # reading it would never end
    elif kind == "not UTF-8":
        path.write_bytes(b'{"networks": "\xff\xfe"}')
    else:
        path.mkdir()
        (run / "metrics.jsonl").write_text(metrics())  # so the folder is a run plot would look at
    code, out, err, warnings = cli(capsys, caplog, "report", str(exp))
    assert code == 0, err
    if kind == "a directory":  # not a file, so not a run folder: nothing to warn about
        assert warnings == []
    else:
        assert_one_warning(warnings, str(path), "not UTF-8" if kind == "not UTF-8" else "not a regular file")
    assert_good_runs_reported(out)


def test_report_with_only_damaged_runs_is_one_line_and_exit_2(tmp_path, capsys, caplog):
    for i, text in enumerate(["[]", _with(config="x"), _net0("last_test_top1", "NaN")]):
        (tmp_path / f"cd-seed{i}").mkdir()
        (tmp_path / f"cd-seed{i}" / "summary.json").write_text(text)
    code, out, err, warnings = cli(capsys, caplog, "report", str(tmp_path))
    assert_one_line_error(code, err, "no finished run", "valid summary.json", str(tmp_path))
    assert len(warnings) == 3 and not (tmp_path / "report.md").exists()
    code, _, err, _ = cli(capsys, caplog, "report", str(tmp_path / "missing"))
    assert_one_line_error(code, err, "missing is not a directory")


def test_report_warning_is_one_line_on_the_real_stderr(tmp_path):
    """The shape a user sees: the warning on stderr (one line), the table on stdout, exit 0."""
    exp = good_experiment(tmp_path / "exp")
    (exp / "cd-seed0").mkdir()
    (exp / "cd-seed0" / "summary.json").write_text(_net0("last_test_top1", "1e400"))
    done = subprocess.run([sys.executable, "-m", "kdarena.cli", "report", str(exp)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [f"kdarena: warning: skipping a damaged run: {exp / 'cd-seed0' / 'summary.json'}: "
                                        "networks.0.last_test_top1 is a number too large for a float: input should be a finite number"]
    assert_good_runs_reported(done.stdout)


# ============================================================================== report: baselines, interval width, pairs
def test_a_named_baseline_without_runs_is_one_line_and_exit_2(tmp_path, capsys, caplog):
    exp = good_experiment(tmp_path / "exp")
    (exp / "report.md").write_text("the previous report\n")
    code, _, err, _ = cli(capsys, caplog, "report", str(exp), "--baseline", "nosuchmethod")
    assert_one_line_error(code, err, "no run of baseline nosuchmethod", "methods present: independent, dml", "--baseline")
    assert (exp / "report.md").read_text() == "the previous report\n"  # nothing lost
    code, _, err, _ = cli(capsys, caplog, "report", str(exp), "--baseline", "dml,cd-mean")
    assert_one_line_error(code, err, "baseline cd-mean under")


def test_absent_default_baselines_are_left_out_with_a_note(tmp_path, capsys, caplog):
    exp = good_experiment(tmp_path / "exp", {"independent": GOOD["independent"]})
    code, out, err, warnings = cli(capsys, caplog, "report", str(exp))
    assert code == 0 and warnings == [], err
    assert "No paired differences vs **dml** here: no run of dml in this section." in out
    with open(exp / "report.csv") as handle:
        assert not any("vs_dml" in field for field in csv.DictReader(handle).fieldnames)
    code, out, _, _ = cli(capsys, caplog, "report", str(exp), "--baseline", "")
    assert code == 0 and "Paired differences" not in out and "No paired differences" not in out


def _interval(diffs: list[float]) -> tuple[float, float, float]:
    """Mean and 95 % t-interval written out: t(0.975, 1) = 12.7062, t(0.975, 2) = 4.3027."""
    m = statistics.mean(diffs)
    half = {2: 12.7062, 3: 4.3027}[len(diffs)] * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return m, m - half, m + half


def test_paired_differences_show_the_interval_width_and_the_pairs_they_rest_on(tmp_path, capsys, caplog):
    runs = {"independent": {s: GOOD["independent"][s] for s in (0, 1)}, "dml": GOOD["dml"]}  # dml's seed 2 has no partner
    exp = good_experiment(tmp_path / "exp", runs)
    code, out, err, _ = cli(capsys, caplog, "report", str(exp), "--baseline", "independent")
    assert code == 0, err
    last = [GOOD["dml"][s][0][0] - GOOD["independent"][s][0][0] for s in (0, 1)]  # net0, last epoch: +2.00, +2.50
    at_val = [GOOD["dml"][s][1][0] - GOOD["independent"][s][1][0] for s in (0, 1)]  # net0, @ best val: +1.50, +2.50
    (m, lo, hi), (mv, lov, hiv) = _interval(last), _interval(at_val)
    paired = out[out.index("Paired differences vs **independent**"):]
    header = next(l for l in paired.splitlines() if l.startswith("| method"))
    assert _cells(header) == [
        "method", "network", "Δ last epoch [95% CI]", "width", "pairs", "", "Δ @ best val [95% CI]", "width", "pairs", ""]
    row = _cells(next(l for l in paired.splitlines() if l.startswith("| dml ") and "net0" in l))
    assert row == ["dml", "net0 (convnet)", f"{m:+.2f} [{lo:+.2f}, {hi:+.2f}]", f"{hi - lo:.2f}", "2", "n.s." if lo <= 0 else "better",
                   f"{mv:+.2f} [{lov:+.2f}, {hiv:+.2f}]", f"{hiv - lov:.2f}", "2", "n.s." if lov <= 0 else "better"]
    main_row = _cells(next(l for l in out.splitlines() if l.startswith("| dml ") and "net0" in l))
    assert main_row[2] == "3"  # the table's seeds column still counts dml's own runs

    with open(exp / "report.csv") as handle:
        rows = {(r["method"], r["network"]): r for r in csv.DictReader(handle)}
    dml = rows[("dml", "net0")]
    for name, (mean_, low, high) in (("paired_last_vs_independent", (m, lo, hi)), ("paired_best_val_vs_independent", (mv, lov, hiv))):
        assert float(dml[name]) == pytest.approx(mean_, abs=1e-4)
        assert float(dml[f"{name}_low"]) == pytest.approx(low, abs=1e-4)
        assert float(dml[f"{name}_high"]) == pytest.approx(high, abs=1e-4)
        assert float(dml[f"{name}_width"]) == pytest.approx(high - low, abs=1e-4)
        assert dml[f"{name}_pairs"] == "2"
    assert rows[("independent", "net0")]["paired_last_vs_independent"] == ""  # no difference to itself
    assert dml["seeds"] == "3" and float(dml["gain_last"]) == pytest.approx(
        statistics.mean(GOOD["dml"][s][0][0] for s in range(3)) - statistics.mean(GOOD["independent"][s][0][0] for s in (0, 1)), abs=1e-4)


# ============================================================================== plot
def _record(**changes) -> str:
    record = {"epoch": 0, "net0/test_top1": 60.0, "net1/test_top1": 61.0, "net0/ce": 1.0, "net0/teacher_share": 0.5}
    record.update(changes)
    return json.dumps(record).replace('"__1e400__"', "1e400").replace('"__NaN__"', "NaN") + "\n"


DAMAGED_METRICS = [  # (id, text of cd-seed0/metrics.jsonl, words the warning must contain)
    ("top-1 1e400", _record(**{"net0/test_top1": "__1e400__"}), ["record 3: net0/test_top1", "too large for a float"]),
    ("top-1 NaN", _record(**{"net1/test_top1": "__NaN__"}), ["record 3: net1/test_top1 is NaN"]),
    ("top-1 150", _record(**{"net0/test_top1": 150.0}), ["record 3: net0/test_top1 is 150.0", "less than or equal to 100"]),
    ("top-1 a string", _record(**{"net0/test_top1": "x"}), ["net0/test_top1 is 'x'"]),
    ("loss a list", _record(**{"net0/ce": [1]}), ["net0/ce is list"]),
    ("teacher share -1", _record(**{"net0/teacher_share": -1.0}), ["net0/teacher_share is -1.0"]),
    ("epoch a string", _record(epoch="0"), ["record 3: epoch is '0'"]),
    ("epoch 1e400", _record(epoch="__1e400__"), ["record 3: epoch is", "too large for a float"]),
    ("no epoch", json.dumps({"net0/test_top1": 50.0}) + "\n", ["record 3 has no 'epoch'"]),
    ("perturb count negative", _record(**{"perturb/noise/count": -1}), ["perturb/noise/count is -1"]),
    ("perturb won > count", _record(**{"perturb/noise/count": 1, "perturb/noise/won": 2}), ["perturb/noise won more steps"]),
]


@pytest.mark.parametrize("text, needles", [c[1:] for c in DAMAGED_METRICS], ids=[c[0] for c in DAMAGED_METRICS])
def test_plot_skips_a_run_with_damaged_metrics_and_plots_the_rest(tmp_path, capsys, caplog, text, needles):
    pytest.importorskip("matplotlib")
    from kdarena.experiments import plot

    exp = good_experiment(tmp_path / "exp")
    (exp / "cd-seed0").mkdir()
    (exp / "cd-seed0" / "metrics.jsonl").write_text(metrics() + text)
    (exp / "cd-seed0" / "summary.json").write_text(json.dumps(summary("cd", 0)))
    code, out, err, warnings = cli(capsys, caplog, "plot", str(exp), "--out", str(tmp_path / "png"))
    assert code == 0, err
    assert_one_warning(warnings, str(exp / "cd-seed0" / "metrics.jsonl"), *needles)
    assert str(tmp_path / "png" / "accuracy.png") in out.splitlines()
    assert (tmp_path / "png" / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    caplog.clear()
    assert sorted({r.label for r in plot._find_runs(exp)}) == ["dml", "independent"]


DAMAGED_CONFIGS = [  # (id, file, its text, words the warning must contain)
    ("summary a list", "summary.json", "[]", ["summary.json: the top level must be an object"]),
    ("summary config a string", "summary.json", _with(config="x"), ["summary.json: config is 'x'"]),
    ("summary models of numbers", "summary.json", json.dumps({"config": {"models": [1, 2]}}), ["config.models.0 is 1"]),
    ("summary 1e400 seed", "summary.json", '{"config": {"seed": 1e400}}', ["config.seed is a number too large"]),
    ("config.yaml a list", "config.yaml", "- 1\n- 2\n", ["config.yaml: the top level must be an object", "not list"]),
    ("config.yaml not YAML", "config.yaml", "models: [convnet\n", ["config.yaml is not valid YAML"]),
    ("config.yaml method a string", "config.yaml", "method: cd\n", ["config.yaml: method is 'cd'"]),
]


@pytest.mark.parametrize("name, text, needles", [c[1:] for c in DAMAGED_CONFIGS], ids=[c[0] for c in DAMAGED_CONFIGS])
def test_plot_skips_a_run_with_a_damaged_config(tmp_path, capsys, caplog, name, text, needles):
    pytest.importorskip("matplotlib")
    exp = good_experiment(tmp_path / "exp")
    (exp / "cd-seed0").mkdir()
    (exp / "cd-seed0" / "metrics.jsonl").write_text(metrics())
    (exp / "cd-seed0" / name).write_text(text)
    code, out, err, warnings = cli(capsys, caplog, "plot", str(exp), "--out", str(tmp_path / "png"))
    assert code == 0, err
    assert_one_warning(warnings, str(exp / "cd-seed0" / name), *needles)
    assert str(tmp_path / "png" / "accuracy.png") in out.splitlines()


def test_plot_never_blocks_on_a_metrics_fifo_and_fails_in_one_line_when_nothing_is_left(tmp_path, capsys, caplog):
    pytest.importorskip("matplotlib")
    run = tmp_path / "exp" / "cd-seed0"
    run.mkdir(parents=True)
    os.mkfifo(run / "metrics.jsonl")
    code, _, err, warnings = cli(capsys, caplog, "plot", str(tmp_path / "exp"))
    assert_one_warning(warnings, str(run / "metrics.jsonl"), "not a regular file")
    assert_one_line_error(code, err, "no run with a valid metrics.jsonl under", str(tmp_path / "exp"))
    assert not (tmp_path / "exp" / "plots").exists()
    code, _, err, _ = cli(capsys, caplog, "plot", str(tmp_path / "missing"))
    assert_one_line_error(code, err, "missing is not a directory")


def test_a_sweep_without_independent_runs_has_no_delta_columns(tmp_path, capsys, caplog):
    # Δ is against independent; a sweep without it showed two columns of nothing but '-' (issue 37)
    root = good_experiment(tmp_path / "exp", {"dml": GOOD["dml"]})
    code, _, err, _ = cli(capsys, caplog, "report", str(root))
    assert code == 0, err
    md = (root / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| method | network"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["method", "network", "seeds", "last epoch", "@ best val"]
    row = next(line for line in md.splitlines() if line.startswith("| dml ") and "net0" in line)
    assert [c.strip() for c in row.strip("|").split("|")] == ["dml", "net0 (convnet)", "3", "71.33 ± 0.76", "71.67 ± 0.58"]
    with_base = good_experiment(tmp_path / "both")
    assert cli(capsys, caplog, "report", str(with_base))[0] == 0
    assert "| Δ last |" in (with_base / "report.md").read_text().replace("  ", " ")
