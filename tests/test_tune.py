"""kdarena tune and kdarena confirm on a tiny problem (sklearn digits, two ConvNets, 2-3 epochs a run):
the space, validation only, equal budgets, a rerun that runs nothing, an interrupted tuning continued,
pruning through the run folder, the plan, and its confirmation frozen by its hash."""
from __future__ import annotations

import json
import shutil
import statistics
import threading
import time

import pytest
import yaml

optuna = pytest.importorskip("optuna")
stats = pytest.importorskip("scipy.stats")

from kdarena import cli  # noqa: E402
from kdarena.experiments import confirm as confirm_module  # noqa: E402
from kdarena.experiments import local_engine, run_task, tune as tune_module  # noqa: E402
from kdarena.experiments.confirm import ConfirmError, confirm, parse_seed_ranges  # noqa: E402
from kdarena.experiments.report import find_runs  # noqa: E402
from kdarena.experiments.sweep import config_difference  # noqa: E402
from kdarena.experiments.tune import TuneError, tune, validation_curve  # noqa: E402
from kdarena.experiments.tune_space import SpaceError, parse_space  # noqa: E402

TINY = {
    "name": "tiny", "seed": 3,
    "models": ["convnet", "convnet"],
    "data": {"name": "digits", "val_size": 200, "batch_size": 128},
    "optim": {"epochs": 2},
    "train": {"progress": False, "tensorboard": False, "threads": 1},
}
SPACE = ["method.temperature=choice(1,4)", "optim.lr=loguniform(0.01,0.1)"]


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("tune") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


class _Counting:
    """Wraps the local engine's run function: which run folders trained, and how each started."""

    def __init__(self, monkeypatch, around=None):
        self.calls: list[tuple[str, str]] = []
        inner = around or run_task.execute_run

        def counted(config, run_dir, stop_requested=None):
            outcome = inner(config, run_dir, stop_requested)
            self.calls.append((run_dir.rsplit("/", 1)[-1], outcome.get("action", "")))
            return outcome

        monkeypatch.setattr(local_engine, "execute_run", counted)


@pytest.fixture(scope="module")
def tuned(config, tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned") / "D"
    text = tune(config, [], "dml,cd", SPACE, 3, out)
    return {"out": out, "text": text}


# ----------------------------------------------------------------------------- the space (fast)
def test_space_items_become_optuna_distributions():
    space = parse_space(["method.temperature=choice(1,4)", "optim.lr=loguniform(0.01,0.2)", "method.alpha=uniform(0,1)",
                         "method.every=int(1,8)", "optim.name=choice(sgd,adamw)"])
    assert space["method.temperature"] == optuna.distributions.CategoricalDistribution([1, 4])
    assert space["optim.lr"] == optuna.distributions.FloatDistribution(0.01, 0.2, log=True)
    assert space["method.alpha"] == optuna.distributions.FloatDistribution(0.0, 1.0)
    assert space["method.every"] == optuna.distributions.IntDistribution(1, 8)
    assert space["optim.name"].choices == ("sgd", "adamw")


@pytest.mark.parametrize("item, message", [
    ("method.temperature", "is not KEY=DIST"),
    ("data.val_size=choice(1,2)", "method.* or optim.* key"),
    ("optim.epochs=int(1,5)", "the epochs are the budget"),
    ("optim.lr=normal(0,1)", "choice(...), uniform(a,b), loguniform(a,b) or int(a,b)"),
    ("optim.lr=loguniform(0,1)", "low end above 0"),
    ("optim.lr=uniform(1,0.5)", "below the high end"),
    ("method.every=int(1,2.5)", "not an integer"),
    ("method.temperature=choice(1,1)", "different values"),
])
def test_a_bad_space_item_is_one_line_naming_it(item, message):
    with pytest.raises(SpaceError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*").replace(".", r"\.")):
        parse_space([item])


def test_the_objective_reads_validation_accuracy_only():
    records = [{"epoch": 0, "net0/train_top1": 50.0},  # not evaluated
               {"epoch": 1, "net0/val_top1": 60.0, "net1/val_top1": 70.0, "net0/test_top1": 99.0, "net1/test_top1": 99.0},
               {"epoch": 2, "net0/val_top1": 64.0, "net1/val_top1": 62.0, "net0/test_top1": 1.0, "net1/test_top1": 1.0}]
    assert validation_curve(records, 2) == [(1, 65.0), (2, 63.0)]  # what the pruner sees
    assert tune_module.objective_value(records, 2, "last") == 63.0
    assert tune_module.objective_value(records, 2, "best") == 67.0  # each network at its own best epoch: 64 and 70
    assert tune_module.objective_value(records[:1], 2, "last") is None
    assert validation_curve([{"epoch": 1, "net0/test_top1": 90.0, "net1/test_top1": 90.0}], 2) == []


def test_no_validation_split_is_one_line_and_exit_2(config, tmp_path, capsys):
    code = cli.main(["tune", str(config), "data.val_size=0", "--methods", "dml,cd", "--space", "method.temperature=choice(1,4)",
                     "--trials", "2", "--out", str(tmp_path / "D")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no validation split (data.val_size=0)" in err
    assert not (tmp_path / "D").exists()  # refused before anything was made


def test_a_key_a_method_lacks_fails_before_anything_trains(config, tmp_path):
    with pytest.raises(Exception, match="method independent"):
        tune(config, [], "independent,dml", ["method.temperature=choice(1,4)"], 2, tmp_path / "D")
    assert not (tmp_path / "D").exists()


# ----------------------------------------------------------------------------- tuning
def test_each_method_gets_its_own_study_with_the_same_budget(tuned):
    out = tuned["out"]
    for label in ("dml", "cd"):
        study = optuna.load_study(study_name=label, storage=tune_module.storage(out))
        assert len(study.trials) == 3 and all(t.state.name == "COMPLETE" for t in study.trials)
        assert sorted(p.name for p in (out / "trials").glob(f"{label}-trial*")) == [f"{label}-trial00{k}" for k in range(3)]
        # a trial is a run like any other: the method's preset, the sampled values, the budget's epochs
        summary = json.loads((out / "trials" / f"{label}-trial001" / "summary.json").read_text())
        trial = study.trials[1]
        assert summary["config"]["method"]["temperature"] == trial.params["method.temperature"]
        assert summary["config"]["optim"]["lr"] == pytest.approx(trial.params["optim.lr"])
        assert summary["config"]["method"]["name"] == label and summary["config"]["optim"]["epochs"] == 2
        # the value is the last epoch's validation top-1, mean over the networks
        assert trial.value == pytest.approx(sum(n["last_val_top1"] for n in summary["networks"]) / 2)
    assert "| dml | 3 | 3 | 0 | 0 |" in tuned["text"] and "| cd | 3 | 3 | 0 | 0 |" in tuned["text"]
    assert (out / "tune.md").read_text() == tuned["text"]
    for name in ("dml-history", "dml-importances", "cd-history", "cd-importances"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_plan_holds_each_method_at_its_best_trial(tuned):
    plan = yaml.safe_load((tuned["out"] / "plan.yaml").read_text())
    assert plan["objective"] == "last" and plan["config"]["optim"]["epochs"] == 2
    for label in ("dml", "cd"):
        study = optuna.load_study(study_name=label, storage=tune_module.storage(tuned["out"]))
        best = max(study.trials, key=lambda t: t.value)
        entry = plan["methods"][label]
        assert entry["trial"] == best.number and entry["validation_top1"] == pytest.approx(best.value, abs=1e-4)
        assert f"method.temperature={best.params['method.temperature']}" in entry["overrides"]
        assert f"method.name={label}" in entry["overrides"]


def test_the_same_command_again_runs_nothing(tuned, config, monkeypatch, capsys):
    counting = _Counting(monkeypatch)
    text = tune(config, [], "dml,cd", SPACE, 3, tuned["out"])
    assert counting.calls == [] and text == tuned["text"]


def test_a_larger_budget_extends_every_study_by_the_missing_trials(config, tmp_path, monkeypatch):
    out = tmp_path / "D"
    tune(config, ["optim.epochs=1"], "dml,cd", SPACE, 1, out)
    more = _Counting(monkeypatch)
    text = tune(config, ["optim.epochs=1"], "dml,cd", SPACE, 2, out)
    assert more.calls == [("dml-trial001", "trained"), ("cd-trial001", "trained")]
    assert "| dml | 2 | 2 | 0 | 0 |" in text and "| cd | 2 | 2 | 0 | 0 |" in text


def test_another_setup_in_the_same_folder_is_refused(tuned, config):
    with pytest.raises(TuneError, match="another setup .*space"):
        tune(config, [], "dml,cd", ["method.temperature=choice(1,2)", "optim.lr=loguniform(0.01,0.1)"], 3, tuned["out"])
    with pytest.raises(TuneError, match="another setup .*data.val_size"):
        tune(config, ["data.val_size=300"], "dml,cd", SPACE, 3, tuned["out"])


def test_an_interrupted_tuning_continues_where_it_stopped(config, tmp_path, monkeypatch):
    """Trial 1 is stopped mid-run as Ctrl-C stops it (checkpoint, then Interrupted): the tuning stops. The same
    command again resumes trial 1 from its checkpoint with its parameters, runs trial 2, and never trial 0; the
    trials are those of a tuning never interrupted."""
    out = tmp_path / "D"
    real = run_task.execute_run

    def stop_trial_1_after_an_epoch(cfg, run_dir, stop_requested=None):
        if not run_dir.endswith("trial001"):
            return real(cfg, run_dir)
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                path = tune_module.Path(run_dir) / "metrics.jsonl"
                if path.is_file() and path.read_text().count("\n") >= 1:
                    stop.set()
                time.sleep(0.01)

        threading.Thread(target=watch, daemon=True).start()
        return real(cfg, run_dir, stop)

    first = _Counting(monkeypatch, around=stop_trial_1_after_an_epoch)
    with pytest.raises(KeyboardInterrupt):
        tune(config, ["optim.epochs=3"], "dml", SPACE, 3, out)
    assert first.calls == [("dml-trial000", "trained"), ("dml-trial001", "trained")]
    study = optuna.load_study(study_name="dml", storage=tune_module.storage(out))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "RUNNING"]
    interrupted_params = study.trials[1].params
    assert (out / "trials" / "dml-trial001" / "checkpoints" / "last.pt").is_file()

    again = _Counting(monkeypatch)
    tune(config, ["optim.epochs=3"], "dml", SPACE, 3, out)
    assert again.calls == [("dml-trial001", "resumed"), ("dml-trial002", "trained")]
    study = optuna.load_study(study_name="dml", storage=tune_module.storage(out))
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3 and study.trials[1].params == interrupted_params

    whole = tmp_path / "whole"
    tune(config, ["optim.epochs=3"], "dml", SPACE, 3, whole)
    uninterrupted = optuna.load_study(study_name="dml", storage=tune_module.storage(whole))
    assert [t.params for t in uninterrupted.trials] == [t.params for t in study.trials]


def test_a_trial_that_finished_before_the_tuning_was_told_is_not_run_again(config, tmp_path, monkeypatch):
    out = tmp_path / "D"
    told = tune_module._Runner._finish

    def killed_before_telling(self, item, outcome):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(tune_module._Runner, "_finish", killed_before_telling)
    with pytest.raises(KeyboardInterrupt):
        tune(config, [], "dml", SPACE, 1, out)
    assert (out / "trials" / "dml-trial000" / "summary.json").is_file()
    monkeypatch.setattr(tune_module._Runner, "_finish", told)
    again = _Counting(monkeypatch)
    tune(config, [], "dml", SPACE, 1, out)
    trial = optuna.load_study(study_name="dml", storage=tune_module.storage(out)).trials[0]
    assert again.calls == [] and trial.state.name == "COMPLETE"
    summary = json.loads((out / "trials" / "dml-trial000" / "summary.json").read_text())
    assert trial.value == pytest.approx(sum(n["last_val_top1"] for n in summary["networks"]) / 2)


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_hopeless_trial_is_pruned_on_its_validation_accuracy_and_stopped(config, tmp_path, monkeypatch, jobs):
    """A pruner that gives up on every trial at its first report: each run is stopped through its folder after
    its first evaluated epoch, checkpointed, and recorded as pruned, never as finished; in this process or,
    with --jobs 2, two trials at once in worker processes."""
    monkeypatch.setattr(optuna.pruners, "MedianPruner", lambda: optuna.pruners.ThresholdPruner(lower=101.0))
    monkeypatch.setattr(tune_module, "POLL_S", 0.05)
    out = tmp_path / "D"
    with pytest.raises(TuneError, match="no trial of dml finished"):
        tune(config, ["optim.epochs=12"], "dml", SPACE, 2, out, jobs=jobs)
    text = (out / "tune.md").read_text()
    study = optuna.load_study(study_name="dml", storage=tune_module.storage(out))
    assert [t.state.name for t in study.trials] == ["PRUNED", "PRUNED"]
    for k in range(2):
        run = out / "trials" / f"dml-trial00{k}"
        epochs = len((run / "metrics.jsonl").read_text().splitlines())
        assert 1 <= epochs < 12 and not (run / "summary.json").exists()
        assert (run / run_task.STOP_EARLY_FILE).is_file()
    assert "| dml | 2 | 0 | 2 | 0 | - |" in text and not (out / "plan.yaml").exists()


# ----------------------------------------------------------------------------- confirmation
def test_seed_ranges():
    assert parse_seed_ranges("100-103") == [100, 101, 102, 103]
    assert parse_seed_ranges("0,1,5-6") == [0, 1, 5, 6]
    with pytest.raises(ConfirmError, match="backwards"):
        parse_seed_ranges("9-3")


def test_confirm_reports_corrected_paired_differences_from_scipy(tuned, tmp_path):
    plan = tuned["out"] / "plan.yaml"
    out = tmp_path / "confirm"
    text = confirm(plan, "10-12", out=out)
    runs = {(r.label, r.seed): r for r in find_runs([out])}
    assert sorted(runs) == [(m, s) for m in ("cd", "dml") for s in (10, 11, 12)]
    # a confirmation run is the tuned trial's run on another seed: nothing else differs
    chosen = yaml.safe_load(plan.read_text())["methods"]["dml"]["trial"]
    trial = json.loads((tuned["out"] / "trials" / f"dml-trial00{chosen}" / "summary.json").read_text())["config"]
    assert config_difference(trial, {**runs[("dml", 10)].config, "seed": trial["seed"], "name": trial["name"]}) is None
    value = {key: sum(n.last_test_top1 for n in r.summary.networks) / 2 for key, r in runs.items()}
    a, b = [value[("dml", s)] for s in (10, 11, 12)], [value[("cd", s)] for s in (10, 11, 12)]
    ci = stats.ttest_rel(a, b).confidence_interval(0.95)  # one comparison: no correction
    assert f"| dml − cd | 3 | {sum(a) / 3 - sum(b) / 3:+.2f} | [{ci.low:+.2f}, {ci.high:+.2f}] |" in text
    assert (out / "confirm.md").read_text() == text
    assert (out / confirm_module.HASH_FILE).read_text().split()[0] == confirm_module.plans.digest(plan)


def test_a_plan_edited_after_confirm_started_is_refused(tuned, tmp_path, capsys):
    plan = tmp_path / "plan.yaml"
    plan.write_bytes((tuned["out"] / "plan.yaml").read_bytes())
    out = tmp_path / "confirm"
    (out).mkdir()
    (out / confirm_module.HASH_FILE).write_text(f"{confirm_module.plans.digest(plan)}  {plan}\n")  # as a first call leaves it
    plan.write_text(plan.read_text().replace("validation_top1:", "validation_top1: 99.0 #", 1))
    code = cli.main(["confirm", str(plan), "--seeds", "0,1", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "changed after kdarena confirm started on it" in err
    assert not list(out.glob("*-seed*"))  # nothing ran


def test_a_plan_edited_while_its_runs_train_is_refused_before_the_report(tuned, tmp_path, monkeypatch):
    plan = tmp_path / "plan.yaml"
    plan.write_bytes((tuned["out"] / "plan.yaml").read_bytes())

    def edit_then_sweep(*args, **kwargs):
        plan.write_text(plan.read_text() + "# edited\n")

    monkeypatch.setattr(confirm_module, "run_sweep", edit_then_sweep)
    with pytest.raises(ConfirmError, match="changed while kdarena confirm ran"):
        confirm(plan, "0,1", out=tmp_path / "confirm")
    assert not (tmp_path / "confirm" / "confirm.md").exists()


def test_a_baseline_compares_every_other_method_with_it_bonferroni_over_their_number(tuned, tmp_path, monkeypatch):
    plan = yaml.safe_load((tuned["out"] / "plan.yaml").read_text())
    plan["methods"]["dml-copy"] = plan["methods"]["dml"]
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    with pytest.raises(ConfirmError, match="--baseline 'kd' is not a method"):
        confirm(path, "0,1", baseline="kd", out=tmp_path / "x")
    monkeypatch.setattr(confirm_module, "run_sweep", lambda *a, **k: None)
    summaries = {("dml", 0): 80.0, ("dml", 1): 81.0, ("dml", 2): 83.0, ("cd", 0): 79.0, ("cd", 1): 79.5, ("cd", 2): 80.0,
                 ("dml-copy", 0): 80.0, ("dml-copy", 1): 81.0, ("dml-copy", 2): 83.0}
    out = tmp_path / "confirm"
    for (label, seed), acc in summaries.items():
        run = out / f"{label}-seed{seed}"
        run.mkdir(parents=True)
        nets = [{"name": f"net{i}", "last_test_top1": acc + d, "test_at_best_val_top1": 0.0} for i, d in enumerate((-1.0, 1.0))]
        (run / "summary.json").write_text(json.dumps({"networks": nets, "config": {"seed": seed}}))
    text = confirm(path, "0-2", baseline="cd", out=out)
    # dml - cd: diffs 1.0, 1.5, 3.0; two comparisons: a 97.5 % interval, t_{0.9875, 2} from the closed form of t with
    # 2 degrees of freedom, (2p - 1) / sqrt(2 p (1 - p)) = 6.2053
    p = 1 - 0.025 / 2
    half = (2 * p - 1) / (2 * p * (1 - p)) ** 0.5 * statistics.stdev([1.0, 1.5, 3.0]) / 3 ** 0.5
    assert f"| dml − cd | 3 | +1.83 | [{1.8333 - half:+.2f}, {1.8333 + half:+.2f}] |" in text
    assert "| dml-copy − cd | 3 | +1.83 |" in text and "dml − dml-copy" not in text
    assert "97.5 % intervals: Bonferroni-corrected for 2 comparisons" in text
    # a plan tuned on each network's best epoch is confirmed at it: test_at_best_val_top1 (0.0 in every run here)
    best_plan, best_out = tmp_path / "best.yaml", tmp_path / "best"
    best_plan.write_text(yaml.safe_dump({**plan, "objective": "best"}))
    shutil.copytree(out, best_out, ignore=shutil.ignore_patterns(confirm_module.HASH_FILE, "*.md", "*.yaml"))
    text = confirm(best_plan, "0-2", baseline="cd", out=best_out)
    assert "| dml − cd | 3 | +0.00 |" in text and "epoch of each network's best validation top-1" in text


def test_a_damaged_plan_is_one_line_naming_the_file_and_the_field(tmp_path, capsys):
    plan = tmp_path / "plan.yaml"
    plan.write_text("kdarena_plan: 1\nobjective: soon\nconfig: {}\nmethods: {dml: {overrides: []}}\n")
    assert cli.main(["confirm", str(plan), "--seeds", "1,2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{plan}: objective is 'soon'" in err
    plan.write_text("!!python/object/apply:os.system ['echo hacked']\n")  # YAML without tags: nothing runs
    assert cli.main(["confirm", str(plan), "--seeds", "1,2"]) == 2
    assert "is not a YAML plan" in capsys.readouterr().err
    assert not (tmp_path / "confirm").exists()
