"""Sweep -> report -> plot on a tiny experiment (sklearn digits, two ConvNets, 2 epochs, 2 seeds)."""
import json
import math
import statistics

import pytest
import yaml

from kdarena import cli
from kdarena.config import ConfigError
from kdarena.experiments.plot import plot_path
from kdarena.experiments.report import write_report
from kdarena.experiments.stats import pooled_std, sample_std
from kdarena.experiments.sweep import SweepError, presets, parse_method, parse_methods, parse_seeds, run_sweep

pytestmark = pytest.mark.slow

TINY = {
    "name": "tiny",
    "models": ["convnet", "convnet"],
    "data": {"name": "digits", "val_size": 200, "batch_size": 128},
    "optim": {"epochs": 2},
    "train": {"progress": False, "tensorboard": False, "threads": 1},
}
METHODS = "independent,dml,cd"
SEEDS = "0,1"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """An unfinished cd-seed0 (stopped after 3 steps), then the full sweep, then the same sweep again."""
    root = tmp_path_factory.mktemp("sweep")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "output": str(root)}))
    exp = root / "exp"
    stopped = run_sweep(config, ["train.stop_after_steps=3"], "cd", "0", exp)
    first = run_sweep(config, [], METHODS, SEEDS, exp)
    mtimes = {p: p.stat().st_mtime_ns for p in exp.glob("*/summary.json")}
    second = run_sweep(config, [], METHODS, SEEDS, exp)
    return {"root": root, "config": config, "exp": exp, "stopped": stopped, "first": first, "second": second, "mtimes": mtimes}


def test_sweep_layout_and_status(experiment):
    exp = experiment["exp"]
    assert [r["status"] for r in experiment["stopped"]] == ["stopped"]
    names = sorted(p.parent.name for p in exp.glob("*/summary.json"))
    assert names == sorted(f"{m}-seed{s}" for m in METHODS.split(",") for s in (0, 1))
    status = {f"{r['label']}-seed{r['seed']}": r["status"] for r in experiment["first"]}
    assert status.pop("cd-seed0") == "resumed"
    assert set(status.values()) == {"trained"}
    index = json.loads((exp / "sweep.json").read_text())
    assert [(r["label"], r["seed"]) for r in index["runs"]] == [(m, s) for s in (0, 1) for m in METHODS.split(",")]
    assert {r["status"] for r in index["runs"]} == {"skipped"}  # written by the second sweep
    # Methods differ only in their preset; seeds only in the seed.
    cfg = {p.parent.name: json.loads(p.read_text())["config"] for p in exp.glob("*/summary.json")}
    assert cfg["independent-seed0"]["method"]["name"] == "independent" and not cfg["dml-seed1"]["perturb"]["enabled"]
    assert cfg["cd-seed1"]["method"]["name"] == "cd" and cfg["cd-seed1"]["perturb"]["enabled"] and cfg["cd-seed1"]["seed"] == 1


def test_resumed_run_is_complete(experiment):
    run = experiment["exp"] / "cd-seed0"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["epoch"] for r in records] == [0, 1]
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2


def test_second_sweep_skips_finished_runs(experiment, capsys):
    assert {r["status"] for r in experiment["second"]} == {"skipped"}
    assert {p: p.stat().st_mtime_ns for p in experiment["exp"].glob("*/summary.json")} == experiment["mtimes"]
    run_sweep(experiment["config"], [], "dml", "1", experiment["exp"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[1/1] dml-seed1: skipped")


def test_sweep_refuses_a_run_made_with_another_config(experiment):
    with pytest.raises(SweepError, match="optim.epochs"):
        run_sweep(experiment["config"], ["optim.epochs=3"], "dml", "0", experiment["exp"])


def test_report_table(experiment):
    exp = experiment["exp"]
    text = write_report([exp])
    lines = text.splitlines()
    assert "mean ± sample std" in lines[0] and "best val" in lines[0]  # the legend comes first
    for column in ("method", "network", "seeds", "last epoch", "Δ last", "@ best val", "Δ @ best val", "teacher share",
                   "perturbed net won", "seconds: train + eval = total", "images/s"):
        assert column in text
    assert "selected on test" not in text
    for method in METHODS.split(","):
        rows = [l for l in lines if l.startswith(f"| {method} ")]
        assert rows and all("±" in r for r in rows[:3]), method
    assert "Paired differences vs **independent**" in text and "Paired differences vs **dml**" in text
    # dml - independent, net0, matched by seed, last epoch: mean and 95 % t-interval (t_{0.975, 1} = 12.706)
    summary = lambda m, s: json.loads((exp / f"{m}-seed{s}" / "summary.json").read_text())["networks"][0]  # noqa: E731
    diffs = [summary("dml", s)["last_test_top1"] - summary("independent", s)["last_test_top1"] for s in (0, 1)]
    half = 12.7062 * statistics.stdev(diffs) / math.sqrt(2)
    paired = text[text.index("Paired differences vs **independent**"):]
    row = next(l for l in paired.splitlines() if l.startswith("| dml ") and "net0" in l)
    assert f"{statistics.mean(diffs):+.2f} [{statistics.mean(diffs) - half:+.2f}, {statistics.mean(diffs) + half:+.2f}]" in row
    assert (exp / "report.md").read_text() == text
    csv_lines = (exp / "report.csv").read_text().splitlines()
    assert csv_lines[0].startswith("experiment,method,settings,network,model,seeds,last_top1_mean,last_top1_std")
    assert len(csv_lines) == 1 + 3 * 3  # 3 methods x (2 networks + ensemble)

    # The numbers: mean and sample std over the seeds' summaries.
    last = [json.loads((exp / f"dml-seed{s}" / "summary.json").read_text())["networks"][0]["last_test_top1"] for s in (0, 1)]
    row = next(l for l in lines if l.startswith("| dml ") and "net0" in l)
    assert f"{statistics.mean(last):.2f} ± {statistics.stdev(last):.2f}" in row

    with_test = write_report([exp], out=experiment["root"] / "r2", best_on_test=True)
    assert "best test (selected on test)" in with_test
    assert (experiment["root"] / "r2" / "report.csv").is_file()


def test_report_cli(experiment, capsys):
    assert cli.main(["report", str(experiment["exp"])]) == 0
    assert "Paired differences vs **dml**" in capsys.readouterr().out


def test_plots_are_png(experiment):
    paths = plot_path(experiment["exp"])
    names = sorted(p.rsplit("/", 1)[-1] for p in paths)
    assert names == ["accuracy.png", "losses.png", "perturbation.png", "teacher_share.png"]
    for path in paths:
        with open(path, "rb") as handle:
            assert handle.read(8) == PNG_MAGIC
    single = plot_path(experiment["exp"] / "independent-seed0", experiment["root"] / "single")
    assert sorted(p.rsplit("/", 1)[-1] for p in single) == ["accuracy.png", "losses.png"]  # no teacher, no perturbation


# ----------------------------------------------------------------------------- parsing and statistics (fast)
def test_method_specs():
    assert parse_method("cd-code").overrides == presets()["cd-code"]
    custom = parse_method("cd-clean:method.name=cd;method.selection=clean")
    assert (custom.label, custom.overrides) == ("cd-clean", ["method.name=cd", "method.selection=clean"])
    assert parse_method("cd:perturb.every=10").overrides == presets()["cd"] + ["perturb.every=10"]
    specs = parse_methods("independent,cd-x:models=[convnet,convnet];method.name=cd")
    assert [s.label for s in specs] == ["independent", "cd-x"] and specs[1].overrides[0] == "models=[convnet,convnet]"
    with pytest.raises(SweepError, match="unknown method"):
        parse_method("nope")
    with pytest.raises(SweepError, match="twice"):
        parse_methods("cd,cd")
    with pytest.raises(SweepError, match="seedN"):
        parse_method("cd-seed1:method.name=cd")
    with pytest.raises(ConfigError):
        parse_method("x:method.name")
    assert parse_seeds("0, 2") == [0, 2]
    with pytest.raises(SweepError):
        parse_seeds("a")


def test_bad_method_override_fails_before_training(tmp_path):
    with pytest.raises(ConfigError, match="method bad"):
        run_sweep(None, ["output=" + str(tmp_path)], "bad:method.name=nope", "0", tmp_path / "exp")
    assert not (tmp_path / "exp").exists()


def test_statistics():
    assert sample_std([1.0, 3.0]) == pytest.approx(math.sqrt(2.0))
    assert math.isnan(sample_std([1.0]))
    assert pooled_std([1.0, 3.0], [2.0, 2.0, 2.0]) == pytest.approx(math.sqrt(2.0 / 3.0))


def test_parallel_sweep_gives_the_same_runs(experiment):
    """--jobs 2: the same runs as one by one (same threads, CPU: bit-identical accuracies)."""
    exp = experiment["root"] / "parallel"
    records = run_sweep(experiment["config"], [], "independent,dml", "1", exp, jobs=2)
    assert sorted((r["label"], r["status"]) for r in records) == [("dml", "trained"), ("independent", "trained")]
    for label in ("independent", "dml"):
        got = json.loads((exp / f"{label}-seed1" / "summary.json").read_text())
        want = json.loads((experiment["exp"] / f"{label}-seed1" / "summary.json").read_text())
        assert [n["last_test_top1"] for n in got["networks"]] == [n["last_test_top1"] for n in want["networks"]]
    with pytest.raises(SweepError, match="--jobs must be >= 1"):
        run_sweep(experiment["config"], [], "dml", "1", exp, jobs=0)
