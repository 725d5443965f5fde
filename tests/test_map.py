"""benchmarks/map.py: the map's table and csv from finished runs (paired differences at both epochs, the gap)."""
from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def map_module():
    spec = importlib.util.spec_from_file_location("kdarena_map_benchmark", ROOT / "benchmarks" / "map.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# seed -> (test @ best val, last test, last train) of each of a run's two networks
RUNS = {
    "independent": {0: [(10.0, 11.0, 20.0), (12.0, 13.0, 22.0)], 1: [(9.0, 10.0, 19.0), (9.0, 10.0, 19.0)],
                    2: [(11.0, 12.0, 21.0), (11.0, 12.0, 23.0)]},
    "dml": {0: [(12.0, 13.0, 21.0), (12.0, 13.0, 21.0)], 1: [(10.0, 12.0, 20.0), (10.0, 12.0, 20.0)],
            2: [(12.0, 13.5, 22.0), (13.0, 14.5, 22.0)]},
}


def _write_runs(cell: Path) -> None:
    for label, seeds in RUNS.items():
        for seed, networks in seeds.items():
            run = cell / f"{label}-seed{seed}"
            run.mkdir(parents=True)
            summary = {"networks": [{"name": f"net{i}", "test_at_best_val_top1": b, "last_test_top1": l,
                                     "last_train_top1": t} for i, (b, l, t) in enumerate(networks)],
                       "ensemble": {"test_at_best_val_top1": 1.0}}
            if label == "dml":  # temporal means, as PCL and cd-mean report them: their own column
                summary["extra"] = {"mean0": {"test_at_best_val_top1": 30.0 + seed}, "mean1": {"test_at_best_val_top1": 32.0 + seed},
                                    "ensemble_gate": {"test_at_best_val_top1": 99.0}}
            (run / "summary.json").write_text(json.dumps(summary))


def _paired_text(a: list[float], b: list[float]) -> str:
    """The t-interval written out: mean of a - b ± t(0.975, n-1) * sd / sqrt(n), with t(0.975, 2) = 4.3027."""
    d = [x - y for x, y in zip(a, b)]
    m = sum(d) / len(d)
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1))
    half = 4.3027 * sd / math.sqrt(len(d))
    return f"{m:+.2f} [{m - half:+.2f}, {m + half:+.2f}]"


def test_map_reports_paired_differences_at_best_val_and_last_epoch(map_module, tmp_path):
    _write_runs(tmp_path / "tiny")
    cells = {"tiny": (None, [], {"classes": 50, "epochs": 30})}
    text = map_module.write_map(tmp_path, cells)

    def per_run(label, k):
        return [sum(net[k] for net in RUNS[label][s]) / 2 for s in (0, 1, 2)]

    dml_row = next(line for line in text.splitlines() if line.startswith("| dml |"))
    columns = [c.strip() for c in dml_row.strip("|").split("|")]
    # method, seeds, @best, last, train, gap, Δind(best), Δdml(best), Δind(last), Δdml(last), ensemble
    assert columns[6] == _paired_text(per_run("dml", 0), per_run("independent", 0)) + " *"
    assert columns[8].startswith(_paired_text(per_run("dml", 1), per_run("independent", 1)))
    assert columns[8].endswith("*")  # last epoch: +1.67 [+0.23, +3.10], entirely above zero
    assert columns[7] == "" and columns[9] == ""  # no difference of DML to itself
    assert columns[11] == "32.00 ± 1.00"  # the temporal means' mean (31, 32, 33 over seeds); other extras are not means
    independent_row = next(line for line in text.splitlines() if line.startswith("| independent |"))
    assert independent_row.rstrip().endswith("|  |")  # no temporal means: an empty cell
    gaps = [t - l for t, l in zip(per_run("dml", 2), per_run("dml", 1))]
    assert columns[5] == f"{sum(gaps) / 3:.2f} ± {math.sqrt(sum((g - sum(gaps) / 3) ** 2 for g in gaps) / 2):.2f}"

    with open(tmp_path / "map.csv") as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    d = [x - y for x, y in zip(per_run("dml", 1), per_run("independent", 1))]
    assert float(rows["dml"]["delta_independent_last"]) == pytest.approx(sum(d) / 3)
    assert rows["independent"]["delta_independent_last"] == ""
    assert (tmp_path / "map.png").stat().st_size > 0


def test_map_panels_follow_the_protocols_that_were_run(map_module):
    def row(data, classes, images, epochs):
        return {"data": data, "classes": classes, "images": images, "epochs": epochs}

    rows = [row("T", 50, 2000, 1), row("T", 50, 2000, 4), row("T", 200, 2000, 4), row("C", 10, 2000, 4),
            row("C", 10, 1000, 5), row("C", 10, 1000, 40), row("C", 10, 45000, 15)]
    found = [(axis, fixed) for _, axis, fixed in map_module.panels(rows)]
    assert found == [("epochs", {"data": "T", "classes": 50, "images": 2000}),
                     ("epochs", {"data": "C", "classes": 10, "images": 1000}),
                     ("classes", {"epochs": 4, "images": 2000})]


@pytest.mark.parametrize("scale", ["cpu", "gpu"])
def test_every_cell_of_the_map_makes_a_valid_config_for_each_of_its_methods(map_module, scale, tmp_path):
    """A typo in a cell's overrides or a method spec fails here, not after an hour of other cells."""
    from kdarena.experiments.sweep import plan_sweep

    for name, (config, overrides, axis) in map_module.CELLS[scale].items():
        model = next((o.split("[")[1].split(",")[0] for o in overrides if o.startswith("models=")), "resnet8")
        chosen = map_module.methods(model, axis.get("methods", "all"))
        _, plans = plan_sweep(config, ["data.root=unused.tar.gz", *overrides], chosen, "0", tmp_path / name)
        labels = [plan.label for plan in plans]
        assert len(labels) == len(set(labels)) == len(chosen), name
        assert all(plan.config.optim.epochs == axis["epochs"] for plan in plans), name
        if "images" in axis:  # the axis value the plots use is the training set the overrides make
            train = plans[0].config.data.train_subset - plans[0].config.data.val_size if plans[0].config.data.train_subset else None
            assert train in (axis["images"], None), name
