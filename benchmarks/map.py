"""The map: where does each method pay off? Test accuracy against training budget and number of classes.

Runs every method of the arena x seeds in each *cell* (a protocol at one budget), with
``kdarena sweep`` (``--jobs`` runs at once), then writes per cell ``report.md`` (mean ± std, paired
95 % intervals vs independent and DML) and across cells ``map.md`` + ``map.csv`` + ``map.png``.

    python benchmarks/map.py --tiny-imagenet PATH/tiny-imagenet-32.tar.gz --cifar10 PATH/cifar10-jpeg.tar.gz \\
        --out runs/map --jobs 2                       # CPU scale (configs/benchmarks/map_*.yaml)
    python benchmarks/map.py ... --scale gpu --jobs 8  # GPU scale (benchmarks/gpu_map.sh)
    python benchmarks/map.py ... --engine ray --address auto --gpus-per-run 0.25  # on a Ray cluster (README, "Scaling out")

A method's accuracy in a run is the mean over its networks of the test top-1 at the epoch of best
validation top-1 (``@ best val``) and after the last epoch (``last``); the ensemble is reported
apart. Cells run in the order given, so an interrupted map keeps its most important cells; running
the same command again skips finished runs.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kdarena.experiments.report import write_report  # noqa: E402
from kdarena.methods.registry import label_order  # noqa: E402
from kdarena.experiments.stats import mean, paired_difference, sample_std  # noqa: E402
from kdarena.experiments.sweep import run_sweep  # noqa: E402
from kdarena.records.summary import Summary  # noqa: E402

TIN = ROOT / "configs" / "benchmarks" / "map_tiny_imagenet.yaml"
C10 = ROOT / "configs" / "benchmarks" / "map_cifar10.yaml"

# small-data CIFAR-10: 1,000 random training images, 500 of them held out for validation; few checkpoints
XS = ["data.train_subset=1000", "data.val_size=500", "train.checkpoint_every=10"]

# GPU scale: ResNet-20 pairs, batch 128, lr 0.1, on the GPU with torch's threads
GPU_NET = ["models=[resnet20,resnet20]", "data.batch_size=128", "optim.lr=0.1", "train.device=cuda", "train.threads=null"]
GPU_SMALL = ["data.train_subset=6000", "data.val_size=1000", "train.checkpoint_every=10", *GPU_NET]


def cifar10_budgets(prefix: str, base: list[str], images: int, budgets: list[tuple[int, int, str]]) -> dict[str, tuple]:
    """One small-data CIFAR-10 protocol at several budgets: ``{prefix}-e{epochs}`` cells, in the order given,
    from (epochs, eval_every, method set) each."""
    return {f"{prefix}-e{epochs}": (C10, [*base, f"optim.epochs={epochs}", f"train.eval_every={every}"],
                                    {"classes": 10, "epochs": epochs, "images": images, "methods": which})
            for epochs, every, which in budgets}


# cell name -> (config, overrides, axis value for the plots)
CELLS = {
    "cpu": {  # 2,000 training images (+250 validation) of 50 classes; order = priority
        "tin50-e4": (TIN, ["optim.epochs=4"], {"classes": 50, "epochs": 4}),
        "tin50-e1": (TIN, ["optim.epochs=1"], {"classes": 50, "epochs": 1}),
        # the other cells run the core of the arena only (what fits one session on 2 cores)
        "tin50-e12": (TIN, ["optim.epochs=12", "train.eval_every=2"], {"classes": 50, "epochs": 12, "methods": "core"}),
        # the longest budget: training accuracy pulls away from test accuracy (the over-fitting end of the axis)
        "tin50-e30": (TIN, ["optim.epochs=30", "train.eval_every=3"], {"classes": 50, "epochs": 30, "methods": "goal"}),
        # small data (500 CIFAR-10 training images + 500 for validation): budgets from under- to over-fitting
        **cifar10_budgets("c10xs", XS, 500, [(100, 20, "all"), (30, 6, "budget"), (10, 2, "budget")]),
        "c10-e4": (C10, ["optim.epochs=4", "train.eval_every=2"], {"classes": 10, "epochs": 4, "methods": "core"}),
        "tin200-e4": (TIN, ["data.classes=200", "optim.epochs=4", "train.eval_every=2"], {"classes": 200, "epochs": 4, "methods": "core"}),
    },
    "gpu": {  # the small-data grid at a larger budget: CIFAR ResNet-20 pairs on 5,000 CIFAR-10 images (+1,000 for
        # validation), 10 / 30 / 90 epochs, then Tiny-ImageNet-200 (full training set) for the class axis; sized from the
        # H200 throughput measured earlier (ResNet-32 x 2: ~3,400 img/s per run with five runs at once, ~17,000 in all)
        # for about 12 minutes, the over-fitting end first; the time cap cuts what does not fit, the same command continues
        **cifar10_budgets("c10m", GPU_SMALL, 5000, [(90, 10, "goal"), (30, 5, "budget"), (10, 2, "budget")]),
        "tin200-e15": (TIN, ["data.classes=200", "data.train_subset=null", "data.val_size=5000", *GPU_NET, "optim.epochs=15"],
                       {"classes": 200, "epochs": 15, "images": 95000, "methods": "goal"}),
    },
}

# our ideas beyond the presets, each tried where the whole arena runs (the losers are reported too)
CD_MEAN_T4 = "cd-mean-t4:method.name=cd-mean;perturb.enabled=false;method.temperature=4"
CD_RAMP_T4 = "cd-ramp-t4:method.name=cd;perturb.enabled=false;method.rampup=0.3;method.temperature=4"
DML_T4 = "dml-t4:method.name=dml;perturb.enabled=false;method.temperature=4"  # the control: competition, or τ alone?
IDEAS = [CD_MEAN_T4, CD_RAMP_T4, DML_T4]

CORE = ["independent", "dml", "kdcl", "cd", "cd-ramp", "cd-soft"]  # part one's secondary cells
BUDGET = ["independent", "dml", "kdcl", "cd", "cd-mean", CD_MEAN_T4]  # the budget axis of the small-data cells
# the goal: our variants against independent, DML and the paper's CD (and the τ control)
GOAL = ["independent", "dml", "cd", "cd-ramp", "cd-mean", CD_MEAN_T4, DML_T4]


def methods(model: str, which: str = "all") -> list[str]:
    """Every method of the arena (or its core); ONE needs the branched form of the model (shared trunk, two branches).
    The goal's methods come first, so that an interrupted cell has them."""
    if which in ("core", "budget", "goal"):
        return list({"core": CORE, "budget": BUDGET, "goal": GOAL}[which])
    return [
        "independent", "dml", "cd", "cd-mean", "cd-ramp", "kdcl", "pcl",
        f"one:method.name=one;perturb.enabled=false;models=[branched:{model},branched:{model}]",
        "pskd", "cd-code", "cd-noperturb", "cd-soft", *IDEAS,
        # competition on the branches of a shared trunk (ONE's structure), with DML on the same branches as control
        f"cd-mean-t4-branched:method.name=cd-mean;perturb.enabled=false;method.temperature=4;"
        f"models=[branched:{model},branched:{model}]",
        f"dml-branched:method.name=dml;perturb.enabled=false;models=[branched:{model},branched:{model}]",
    ]


def run_accuracy(summary: dict, key: str) -> float | None:
    values = [n[key] for n in summary.get("networks", []) if n.get(key) is not None]
    return sum(values) / len(values) if values else None


def temporal_means(summary: dict) -> float | None:
    """Mean test top-1 @ best val of a run's temporal means (PCL, cd-mean: deployable models of their own), or None."""
    values = [v["test_at_best_val_top1"] for k, v in summary.get("extra", {}).items()
              if k.startswith("mean") and v.get("test_at_best_val_top1") is not None]
    return sum(values) / len(values) if values else None


def collect(cell_dir: Path) -> dict[str, dict[int, dict]]:
    """label -> seed -> summary of every finished run of a cell, labels in the registry's order."""
    found: dict[str, dict[int, dict]] = {}
    for path in sorted(cell_dir.glob("*-seed*/summary.json")):
        label, seed = path.parent.name.rsplit("-seed", 1)
        # checked by the model the trainer writes with (a damaged or out-of-range summary stops the map)
        found.setdefault(label, {})[int(seed)] = Summary.model_validate(json.loads(path.read_text())).as_written()
    order = label_order()
    return {label: found[label] for label in sorted(found, key=lambda l: (order.index(l) if l in order else len(order), l))}


def write_map(out: Path, cells: dict[str, tuple]) -> str:
    rows, lines = [], ["# The map", "",
                       "Test top-1 (%) of each method, mean over its networks, mean ± std over seeds; Δ = paired difference "
                       "to independent / DML over matched seeds with its 95 % t-interval (* = interval above 0, "
                       "− = below 0), at the epoch of best validation top-1 and at the last epoch. Train = last-epoch "
                       "training top-1 (running, on augmented batches); gap = train − last test.", ""]
    for name, (config, _, axis) in cells.items():
        runs = collect(out / name)
        axis = {"data": "CIFAR-10" if config == C10 else "Tiny-ImageNet-32", "images": 2000,
                **{k: v for k, v in axis.items() if k != "methods"}}
        if not runs:
            continue
        lines += [f"## {name}: {axis['classes']} classes, {axis['epochs']} epochs", "",
                  "| method | seeds | @ best val | last | train | gap | Δ vs independent (@ best val) | Δ vs DML (@ best val) "
                  "| Δ vs independent (last) | Δ vs DML (last) | ensemble | temporal means |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

        def accuracies(by_seed: dict[int, dict], key: str) -> dict[int, float | None]:
            return {s: run_accuracy(v, key) for s, v in by_seed.items()}

        refs = {key: (accuracies(runs.get("independent", {}), key), accuracies(runs.get("dml", {}), key))
                for key in ("test_at_best_val_top1", "last_test_top1")}
        for label, by_seed in runs.items():
            best, last = accuracies(by_seed, "test_at_best_val_top1"), accuracies(by_seed, "last_test_top1")
            train = list(accuracies(by_seed, "last_train_top1").values())
            ens = [v["ensemble"]["test_at_best_val_top1"] for v in by_seed.values() if v.get("ensemble")]
            means = [m for m in (temporal_means(v) for v in by_seed.values()) if m is not None]
            deltas = {}
            for key, values in (("test_at_best_val_top1", best), ("last_test_top1", last)):
                base, dml = refs[key]
                deltas[key] = (paired_difference(values, base) if label != "independent" else None,
                               paired_difference(values, dml) if label != "dml" else None)

            def cell(d) -> str:
                if d is None:
                    return ""
                mark = {"better": " *", "worse": " −"}.get(d.verdict, "")
                return d.text() + mark if d.n else "-"

            pm = lambda xs: f"{mean(xs):.2f} ± {sample_std(xs):.2f}" if len(xs) > 1 else (f"{xs[0]:.2f}" if xs else "-")  # noqa: E731
            clean = lambda xs: [x for x in xs if x is not None]  # noqa: E731
            gap = [t - l for t, l in zip(train, last.values()) if t is not None and l is not None]
            (bi, bd), (li, ld) = deltas["test_at_best_val_top1"], deltas["last_test_top1"]
            lines.append(f"| {label} | {len(by_seed)} | {pm(clean(best.values()))} | {pm(clean(last.values()))} | "
                         f"{pm(clean(train))} | {pm(gap)} | {cell(bi)} | {cell(bd)} | {cell(li)} | {cell(ld)} | {pm(ens)} | {pm(means) if means else ''} |")
            row = {"cell": name, **axis, "method": label, "seeds": len(by_seed),
                   "best_val_mean": mean(clean(best.values())), "best_val_std": sample_std(clean(best.values())),
                   "last_mean": mean(clean(last.values())), "last_std": sample_std(clean(last.values())),
                   "train_mean": mean(clean(train)), "gap_mean": mean(gap),
                   "temporal_means_mean": mean(means) if means else None}
            for key, tag in (("test_at_best_val_top1", ""), ("last_test_top1", "_last")):
                for d, ref in zip(deltas[key], ("independent", "dml")):
                    row.update({f"delta_{ref}{tag}": d.mean if d else None, f"delta_{ref}{tag}_low": d.low if d else None,
                                f"delta_{ref}{tag}_high": d.high if d else None})
            rows.append(row)
        lines.append("")
    text = "\n".join(lines) + "\n"
    (out / "map.md").write_text(text)
    if rows:
        with open(out / "map.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        plot_map(rows, out / "map.png")
    return text


def panels(rows: list[dict]) -> list[tuple[str, str, dict]]:
    """The map's panels, found in the rows: accuracy against epochs for every protocol (classes, images) run at two
    or more budgets, and against classes for every budget (epochs, images) run with two or more class counts."""
    def distinct(fixed: dict, axis: str) -> int:
        return len({r[axis] for r in rows if all(r[k] == v for k, v in fixed.items())})

    found = []
    for data, classes, images in dict.fromkeys((r["data"], r["classes"], r["images"]) for r in rows):
        fixed = {"data": data, "classes": classes, "images": images}
        if distinct(fixed, "epochs") > 1:
            found.append((f"{data}, {classes} classes, {images:,} images", "epochs", fixed))
    for epochs, images in dict.fromkeys((r["epochs"], r["images"]) for r in rows):
        fixed = {"epochs": epochs, "images": images}
        if distinct(fixed, "classes") > 1:
            found.append((f"{epochs} epochs, {images:,} images", "classes", fixed))
    return found


def plot_map(rows: list[dict], path: Path) -> None:
    """Per protocol (accuracy against epochs) and per budget (against classes): test accuracy; the paired gain over
    independent training at the last epoch with its 95 % interval; the train − test gap (the regime)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    def number(value) -> bool:
        return value is not None and not (isinstance(value, float) and math.isnan(value))

    methods_in_order = list(dict.fromkeys(r["method"] for r in rows))
    # tab20's dark shades first, then its light ones: eleven methods, eleven colours
    colours = {m: colormaps["tab20"]((2 * i) % 20 + (2 * i) // 20 % 2) for i, m in enumerate(methods_in_order)}
    series = panels(rows) or [("", "epochs", {})]
    kinds = (("best_val_mean", "best_val_std", "test top-1 @ best val (%)", "accuracy"),
             ("delta_independent_last", "delta_independent_last", "Δ vs independent, last epoch (points, 95 % CI)",
              "paired gain"),
             ("gap_mean", None, "train − test top-1, last epoch (points)", "generalisation gap"))
    fig = Figure(figsize=(5.4 * len(series), 12.0))
    axes = fig.subplots(len(kinds), len(series), squeeze=False)
    spare = None
    for col, (title, axis, fixed) in enumerate(series):
        chosen = [r for r in rows if all(r.get(k) == v for k, v in fixed.items())]
        for row, (key, err, ylabel, kind) in enumerate(kinds):
            ax = axes[row][col]
            if row == len(kinds) - 1 and axis == "classes":
                ax.axis("off")  # room for the legend
                spare = ax
                continue
            for method in methods_in_order:
                pts = sorted((r[axis], r[key], r) for r in chosen if r["method"] == method and number(r[key]))
                if len(pts) < 2:
                    continue
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                if err == key:  # an interval [low, high] around the paired mean
                    yerr = [[y - r[f"{key}_low"] if number(r[f"{key}_low"]) else 0 for _, y, r in pts],
                            [r[f"{key}_high"] - y if number(r[f"{key}_high"]) else 0 for _, y, r in pts]]
                else:
                    yerr = [r[err] if err and number(r[err]) else 0 for _, _, r in pts]
                ax.errorbar(xs, ys, yerr=yerr, marker="o", capsize=2, label=method,
                            color=colours[method], linestyle="--" if method.startswith("cd") else "-")
            if kind == "paired gain":
                ax.axhline(0.0, color="black", linewidth=0.8)
            ax.set_xscale("log")
            ax.set_xlabel(axis)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{kind} vs {axis}: {title}", fontsize=9)
            ax.grid(alpha=0.3)
    labelled = {label: handle for ax in axes.flat for handle, label in zip(*ax.get_legend_handles_labels())}
    if labelled:
        (spare or axes[0][0]).legend(list(labelled.values()), list(labelled), loc="center" if spare else "best",
                                     ncol=2, fontsize=9 if spare else 7, title="method")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny-imagenet", required=True, help="tiny-imagenet-32.tar.gz (or the official tiny-imagenet-200 folder/zip)")
    p.add_argument("--cifar10", required=True, help="cifar10-jpeg.tar.gz (or a folder of train/ test/ class folders)")
    p.add_argument("--out", default="runs/map")
    p.add_argument("--scale", choices=sorted(CELLS), default="cpu")
    p.add_argument("--cells", default=None, help="comma-separated subset of the scale's cells, in this order")
    p.add_argument("--methods", default=None, help="comma-separated sweep methods (default: the whole arena)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=2, help="--engine local: runs at once on this machine")
    p.add_argument("--engine", choices=["local", "ray"], default="local", help="as kdarena sweep --engine")
    p.add_argument("--address", help="--engine ray: the cluster to join (as kdarena sweep --address)")
    p.add_argument("--gpus-per-run", type=float, help="--engine ray: GPUs each run asks for (as kdarena sweep --gpus-per-run)")
    p.add_argument("--report-only", action="store_true", help="rebuild map.md/csv/png from finished runs")
    args = p.parse_args()
    cells = CELLS[args.scale]
    if args.cells:
        cells = {name: cells[name] for name in args.cells.split(",")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, (config, overrides, _) in cells.items():
        if args.report_only:
            break
        root = Path(args.cifar10 if config == C10 else args.tiny_imagenet).resolve()  # the same path on every node
        model = next((o.split("[")[1].split(",")[0] for o in overrides if o.startswith("models=")), "resnet8")
        start = time.perf_counter()
        chosen = args.methods or methods(model, cells[name][2].get("methods", "all"))
        run_sweep(config, [f"data.root={root}", *overrides], chosen, args.seeds, out / name,
                  jobs=args.jobs if args.engine == "local" else 1, engine=args.engine, address=args.address,
                  gpus_per_run=args.gpus_per_run)
        write_report([out / name])
        print(f"cell {name}: {time.perf_counter() - start:.0f} s", flush=True)
        write_map(out, cells)
    print(write_map(out, cells))


if __name__ == "__main__":
    main()
