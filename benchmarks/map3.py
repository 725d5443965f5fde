"""The map, part three: a regime users recognise, decided before it runs.

Two phases per cell (benchmarks/map3_protocol.md says why and how; benchmarks/preregistration.md
fixes phase 2 before it runs):

    python benchmarks/map3.py run --cell c10-5k --phase 1 --cifar10 PATH/cifar10-jpeg.tar.gz --jobs 2 --commit
    python benchmarks/map3.py select --cell c10-5k      # the written rule, on validation accuracy only
    python benchmarks/map3.py run --cell c10-5k --phase 2 --cifar10 ... --jobs 2 --commit   # after the pre-registration
    python benchmarks/map3.py tables                    # rebuild every table from benchmarks/results/map3 alone

``run`` trains with ``kdarena sweep`` into ``--out`` (finished runs are skipped, unfinished ones resumed) and copies
every finished run's summary into ``benchmarks/results/map3/<cell>/phase<k>/`` as it finishes (``--commit``: one git
commit per summary), so an interrupted study continues from what is committed. Before the pre-registration exists
the tables show validation accuracy only: phase 1's test accuracy is stored, never read for a choice.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kdarena.experiments.stats import holm, mean, paired_difference, sample_std  # noqa: E402
from kdarena.records.summary import Summary  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "map3"
PREREGISTRATION = ROOT / "benchmarks" / "preregistration.md"
C10 = ROOT / "configs" / "benchmarks" / "map_cifar10.yaml"
TIN = ROOT / "configs" / "benchmarks" / "map_tiny_imagenet.yaml"

# cell -> (config, archive option, overrides, the network the methods' group is made of); sized by the pilot
# (benchmarks/map3_protocol.md)
CELLS = {
    # 7,500 random training images: 5,000 to train, 2,500 held out for validation; the full 10,000-image test split
    "c10-5k": (C10, "cifar10", ["data.train_subset=7500", "data.val_size=2500", "models=[resnet14,resnet14]",
                                "optim.epochs=60", "train.eval_every=10", "train.checkpoint_every=10"], "resnet14"),
    # the first 100 classes, 125 random images each: 100 to train, 25 held out; the 5,000 official val images of
    # those classes are the test split
    "tin100": (TIN, "tiny_imagenet", ["data.classes=100", "data.train_subset=12500", "data.val_size=2500",
                                      "optim.epochs=30", "train.eval_every=10", "train.checkpoint_every=10"], "resnet8"),
}


# Part four's ablation (exploration, c10-5k, seeds 0-2): from the paper's `cd` to the authors' `cd-code` one ingredient
# at a time, and each rule with the perturbation off. `cd` (seeds 0-2) and `cd-code` (seeds 0-1) are phase 1's runs
# (same recipe; part four's check run shows today's code gives the committed numbers).
ABLATION = ["cd", "cd-better:method.name=cd;method.rule=better",
            "cd-better-every10:method.name=cd;method.rule=better;perturb.every=10",
            "cd-code", "cd-code-noperturb:method.name=cd;method.rule=better;perturb.enabled=false", "cd-noperturb"]
# (variant, the one it changes, what changed)
ABLATION_STEPS = [("cd-better", "cd", "rule: best -> better (every better peer teaches)"),
                  ("cd-better-every10", "cd-better", "perturbation: every step -> every 10th"),
                  ("cd-code", "cd-better-every10", "op pool: paper -> the authors' code"),
                  ("cd-code-noperturb", "cd-code", "the authors' rule, perturbation off"),
                  ("cd-noperturb", "cd", "the paper's rule, perturbation off")]
ABLATION_OVERRIDES = ["train.precision=bf16"]


def phase1_methods(model: str) -> tuple[list[str], list[str]]:
    """(the arena's core and the controls, our candidates): sweep specs, the labels before the colon."""
    references, rest, candidates = phase1_parts(model)
    return references + rest, candidates


def phase1_parts(model: str) -> tuple[list[str], list[str], list[str]]:
    """Phase 1 in the order it runs: the references of phase 2 and our candidates first (the selection needs
    only them), then the rest of the arena and the controls."""
    branched = f"models=[branched:{model},branched:{model}]"
    references = ["independent", "dml", "cd"]
    rest = ["cd-code", "kdcl", "pcl", f"one:method.name=one;perturb.enabled=false;{branched}",
            "dml-t4:method.name=dml;perturb.enabled=false;method.temperature=4",  # control for the temperature
            f"dml-branched:method.name=dml;perturb.enabled=false;{branched}"]     # control for the shared trunk
    candidates = ["cd-mean", "cd-mean-t4:method.name=cd-mean;perturb.enabled=false;method.temperature=4",
                  f"cd-mean-t4-branched:method.name=cd-mean;perturb.enabled=false;method.temperature=4;{branched}"]
    return references, rest, candidates


def label(spec: str) -> str:
    return spec.split(":", 1)[0]


# ----------------------------------------------------------------------------- committed summaries
def network_mean(summary: dict, key: str) -> float | None:
    values = [n.get(key) for n in summary.get("networks", [])]
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def folder(phase: int | str) -> str:
    """Where a phase's summaries live: ``phase1``, ``phase2`` (part three), ``part4`` (part four's confirmation)."""
    return {"p4": "part4", "ablation": "ablation"}.get(phase, f"phase{phase}")  # type: ignore[arg-type]


def load_results(cell: str, phase: int | str) -> dict[str, dict[int, dict]]:
    """label -> seed -> committed summary of one phase of one cell."""
    found: dict[str, dict[int, dict]] = {}
    for path in sorted((RESULTS / cell / folder(phase)).glob("*-seed*.json")):
        name, seed = path.stem.rsplit("-seed", 1)
        # checked by the model the trainer writes with (a damaged or out-of-range summary stops the tables)
        found.setdefault(name, {})[int(seed)] = Summary.model_validate(json.loads(path.read_text())).as_written()
    return found


def ablation_results(cell: str) -> dict[str, dict[int, dict]]:
    """The ablation's runs: its own, and phase 1's runs of the variants phase 1 already trained."""
    found = {name: dict(by_seed) for name, by_seed in load_results(cell, 1).items() if name in map(label, ABLATION)}
    for name, by_seed in load_results(cell, "ablation").items():
        found.setdefault(name, {}).update(by_seed)
    return found


def collect(exp_dir: Path, cell: str, phase: int | str, commit: bool) -> list[Path]:
    """Copy every finished run's summary (and its sweep wall time, evaluation included) into the results."""
    dest = RESULTS / cell / folder(phase)
    dest.mkdir(parents=True, exist_ok=True)
    seconds = {}
    if (exp_dir / "sweep.json").is_file():
        for r in json.loads((exp_dir / "sweep.json").read_text()).get("runs", []):
            seconds[f"{r.get('label')}-seed{r.get('seed')}"] = r.get("seconds")
    new = []
    for path in sorted(exp_dir.glob("*-seed*/summary.json")):
        target = dest / f"{path.parent.name}.json"
        if target.is_file():
            continue
        summary = json.loads(path.read_text())
        summary.pop("run_dir", None)
        summary["sweep_seconds"] = seconds.get(path.parent.name)
        target.write_text(json.dumps(summary, indent=1) + "\n")
        new.append(target)
        if commit:
            rel = target.relative_to(ROOT)
            subprocess.run(["git", "-C", str(ROOT), "add", str(rel)], check=False)
            subprocess.run(["git", "-C", str(ROOT), "commit", "-q", "-m",
                            f"map3 {cell} {folder(phase)}: {path.parent.name} finished", "--", str(rel)], check=False)
    return new


# ----------------------------------------------------------------------------- the pre-registration
def preregistered() -> dict | None:
    """The machine-readable block of benchmarks/preregistration.md (None before it is written)."""
    if not PREREGISTRATION.is_file():
        return None
    block = re.search(r"```json\n(.*?)\n```", PREREGISTRATION.read_text(), re.S)
    return json.loads(block.group(1)) if block else None


def part4_plan() -> dict | None:
    """Part four's block of benchmarks/preregistration.md (``{"c10-5k": {...}}``; None before it is written)."""
    if not PREREGISTRATION.is_file():
        return None
    for block in re.findall(r"```json\n(.*?)\n```", PREREGISTRATION.read_text(), re.S):
        parsed = json.loads(block)
        if "part4" in parsed:
            return parsed["part4"]
    return None


def select(cell: str) -> tuple[str | None, list[tuple[str, float, int]]]:
    """The written rule (benchmarks/map3_protocol.md): among the candidates, the highest mean over seeds 0-2 of the
    last-epoch validation top-1 (mean over the group's networks); a tie within 0.10 points goes to the one listed
    first. Reads validation accuracy only."""
    _, candidates = phase1_methods(CELLS[cell][3])
    runs = load_results(cell, 1)
    scores = []
    for spec in candidates:
        values = [network_mean(runs.get(label(spec), {}).get(s, {}), "last_val_top1") for s in (0, 1, 2)]
        values = [v for v in values if v is not None]
        scores.append((label(spec), mean(values) if len(values) == 3 else math.nan, len(values)))
    complete = [s for s in scores if s[2] == 3]
    if len(complete) < len(candidates):
        return None, scores
    best = max(s[1] for s in complete)
    return next(name for name, score, _ in complete if score >= best - 0.10), scores


# ----------------------------------------------------------------------------- tables
def pm(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{mean(values):.2f} ± {sample_std(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def phase1_table(cell: str, show_test: bool) -> list[str]:
    runs = load_results(cell, 1)
    if not runs:
        return []
    core, candidates = phase1_methods(CELLS[cell][3])
    names = [label(s) for s in core + candidates]
    head = "| method | ours? | seeds | last val | best val | last train | minutes a run |"
    lines = [f"### {cell}, phase 1 (exploration, seeds 0-2)", "", head + (" last test | test @ best val |" if show_test else ""),
             "|---|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if show_test else "")]
    for name in [n for n in names if n in runs] + sorted(set(runs) - set(names)):
        by_seed = runs[name]
        minutes = [s["sweep_seconds"] / 60 for s in by_seed.values() if s.get("sweep_seconds")]
        row = (f"| {name} | {'candidate' if name in [label(c) for c in candidates] else ''} | {len(by_seed)} | "
               f"{pm([network_mean(s, 'last_val_top1') for s in by_seed.values()])} | "
               f"{pm([network_mean(s, 'best_val_top1') for s in by_seed.values()])} | "
               f"{pm([network_mean(s, 'last_train_top1') for s in by_seed.values()])} | {pm(minutes)} |")
        if show_test:
            row += (f" {pm([network_mean(s, 'last_test_top1') for s in by_seed.values()])} |"
                    f" {pm([network_mean(s, 'test_at_best_val_top1') for s in by_seed.values()])} |")
        lines.append(row)
    chosen, scores = select(cell)
    lines += ["", "Selection (validation only): " + ", ".join(f"{n} {s:.2f} ({k} seeds)" for n, s, k in scores)
              + (f" -> **{chosen}**" if chosen else " -> not decided yet (needs seeds 0-2 of every candidate)"), ""]
    return lines


def phase2_table(cell: str, plan: dict, runs: dict[str, dict[int, dict]] | None = None, title: str | None = None) -> list[str]:
    runs = load_results(cell, 2) if runs is None else runs
    if not runs:
        return []
    comparisons = plan["comparisons"]
    title = title or f"### {cell}, phase 2 (confirmatory, seeds {plan['seeds'][0]}-{plan['seeds'][-1]})"
    lines = [title, "",
             "| method | seeds | last test | test @ best val | last train | train − test | ensemble, last test | "
             "temporal means, last test |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    done = min(len(runs.get(name, {})) for pair in comparisons for name in pair)
    if done < len(plan["seeds"]):  # the plan has no early stop: an interim look decides nothing
        lines[1:1] = ["", f"**Interim: {done} of {len(plan['seeds'])} pre-registered seeds in every comparison; "
                          "the pre-registered test is the one on all of them.**"]
    last = {name: {s: network_mean(v, "last_test_top1") for s, v in by_seed.items()} for name, by_seed in runs.items()}
    for name, by_seed in runs.items():
        train = [network_mean(s, "last_train_top1") for s in by_seed.values()]
        lines.append(f"| {name} | {len(by_seed)} | {pm(list(last[name].values()))} | "
                     f"{pm([network_mean(s, 'test_at_best_val_top1') for s in by_seed.values()])} | {pm(train)} | "
                     f"{pm([t - l for t, l in zip(train, last[name].values()) if t is not None and l is not None])} | "
                     f"{pm([ensemble_top1(s) for s in by_seed.values()])} | {pm([temporal_means_top1(s) for s in by_seed.values()])} |")
    tests = [paired_difference(last.get(a, {}), last.get(b, {}), len(comparisons)) for a, b in comparisons]
    verdicts = holm([t.p for t in tests])
    lines += ["", f"Paired differences, last-epoch test top-1 (mean over networks), Bonferroni-corrected "
              f"{100 - 5 / len(comparisons):.2f} % intervals (family-wise 95 % over {len(comparisons)} comparisons), "
              "Holm at 5 %; the uncorrected 95 % interval of each comparison beside it, for reference (the "
              "pre-registered decision is the corrected one):", "",
              "| comparison | seeds | difference | corrected interval | width | 95 % interval | p | Holm |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]
    for (a, b), t, rejected in zip(comparisons, tests, verdicts):
        single = paired_difference(last.get(a, {}), last.get(b, {}))
        lines.append(f"| {a} − {b} | {t.n} | {t.mean:+.2f} | [{t.low:+.2f}, {t.high:+.2f}] | "
                     f"{t.width:.2f} | [{single.low:+.2f}, {single.high:+.2f}] | {t.p:.4f} | "
                     f"{'significant' if rejected else 'n.s.'} |")
    return lines + [""] + exploratory_table(runs, comparisons)


def ensemble_top1(summary: dict) -> float | None:
    value = (summary.get("ensemble") or {}).get("last_test_top1")
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def temporal_means_top1(summary: dict) -> float | None:
    """Last test top-1 of the run's temporal means (``mean0``, ``mean1``, ...: cd-mean, PCL), mean over them."""
    return network_mean({"networks": list((summary.get("extra") or {}).values())}, "last_test_top1")


def exploratory_table(runs: dict[str, dict[int, dict]], comparisons: list[list[str]]) -> list[str]:
    """The same runs read in ways the plan did not fix: plain 95 % intervals, no correction, no verdicts."""
    def by_seed(name: str, read) -> dict[int, float]:
        return {s: v for s, v in ((s, read(summary)) for s, summary in runs.get(name, {}).items()) if v is not None}

    last = lambda summary: network_mean(summary, "last_test_top1")  # noqa: E731
    at_best = lambda summary: network_mean(summary, "test_at_best_val_top1")  # noqa: E731
    planned = {tuple(pair) for pair in comparisons} | {tuple(reversed(pair)) for pair in comparisons}
    names = list(runs)
    rows = [(f"{a} − {b}", "last test, mean over networks", a, b, last)
            for i, a in enumerate(names) for b in names[i + 1:] if (a, b) not in planned]
    rows += [(f"{a} − {b}", what, a, b, read) for what, read in (("test @ best val, mean over networks", at_best),
                                                                  ("ensemble, last test", ensemble_top1),
                                                                  ("temporal means, last test", temporal_means_top1))
             for a, b in comparisons]
    lines = ["Exploratory (not pre-registered: plain 95 % intervals, uncorrected, no verdicts):", "",
             "| comparison | metric | seeds | difference | 95 % interval |", "|---|---|---:|---:|---:|"]
    for label, what, a, b, read in rows:
        t = paired_difference(by_seed(a, read), by_seed(b, read))
        if t.n >= 2:
            lines.append(f"| {label} | {what} | {t.n} | {t.mean:+.2f} | [{t.low:+.2f}, {t.high:+.2f}] |")
    return lines + [""]


def tables() -> str:
    plan = preregistered()
    lines = ["# The map, part three: tables (rebuilt from benchmarks/results/map3 by benchmarks/map3.py tables)", ""]
    for cell in CELLS:
        lines += phase1_table(cell, show_test=plan is not None)
        if plan and cell in plan.get("cells", {}):
            lines += phase2_table(cell, plan["cells"][cell])
    lines += part4_tables()
    text = "\n".join(lines) + "\n"
    (RESULTS / "tables.md").parent.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tables.md").write_text(text)
    return text


def part4_tables() -> list[str]:
    """Part four's confirmation: its new methods beside part three's committed references, paired by seed, and the
    check that today's code reproduces a committed run."""
    plan = part4_plan()
    if not plan:
        return []
    lines = ["# The map, part four: tables", ""]
    for cell, cell_plan in plan.items():
        new = load_results(cell, "p4")
        check_label, check_seed, check_of = label(cell_plan["check"][0]), cell_plan["check"][1], cell_plan["check"][2]
        rerun, committed = new.pop(check_label, {}).get(check_seed), load_results(cell, 2).get(check_of, {}).get(check_seed)
        lines += [f"### {cell}: the same recipe and code as the committed runs", ""]
        if rerun and committed:
            keys = ("last_test_top1", "last_val_top1", "best_val_top1", "last_train_top1")
            same = all(a.get(k) == b.get(k) for a, b in zip(rerun["networks"], committed["networks"]) for k in keys)
            lines += [f"`{check_of}` seed {check_seed} retrained with `{' '.join(cell_plan['overrides'])}` "
                      f"({rerun.get('precision', '?')}, {rerun.get('device_model', '?')}, torch {rerun.get('torch', '?')}): "
                      "last test top-1 per network " + " / ".join(f"{n['last_test_top1']:.2f}" for n in rerun["networks"])
                      + ", committed " + " / ".join(f"{n['last_test_top1']:.2f}" for n in committed["networks"]) + ": "
                      + ("**identical** (test, validation and training top-1 of every network)" if same else "**different**"),
                      ""]
        else:
            lines += ["The check run has not finished yet.", ""]
        references = load_results(cell, 2)
        runs = {name: references.get(name, {}) for name in cell_plan["references"]}
        runs.update(new)
        seeds = cell_plan["seeds"]
        lines += phase2_table(cell, cell_plan, runs, f"### {cell}, part four (confirmatory, seeds {seeds[0]}-{seeds[-1]})")
        lines += machines_line(new) + ablation_table(cell)
    return lines


def machines_line(runs: dict[str, dict[int, dict]]) -> list[str]:
    """What the runs ran on (precision, device model, torch), counted: a study that mixed machines shows it."""
    seen: dict[str, int] = {}
    for by_seed in runs.values():
        for summary in by_seed.values():
            key = f"{summary.get('precision', '?')} on {summary.get('device_model', '?')}, torch {summary.get('torch', '?')}"
            seen[key] = seen.get(key, 0) + 1
    if not seen:
        return []
    return ["Ran on: " + "; ".join(f"{key} ({count} run{'s' if count > 1 else ''})" for key, count in seen.items())
            + (" -- **more than one machine or precision**" if len(seen) > 1 else ""), ""]


def ablation_table(cell: str) -> list[str]:
    """Part four's ablation: each variant over seeds 0-2, then each step's paired difference (plain 95 % intervals:
    exploration, no verdicts)."""
    runs = ablation_results(cell)
    if not any(name != "cd" and name != "cd-code" for name in runs) and len(runs.get("cd-code", {})) < 3:
        return []
    lines = [f"### {cell}: ablation, from the paper's rule to the authors' (exploration, seeds 0-2)", "",
             "| variant | seeds | last val | last test | last train | train − test |", "|---|---:|---:|---:|---:|---:|"]
    for name in map(label, ABLATION):
        by_seed = runs.get(name, {})
        train = [network_mean(s, "last_train_top1") for s in by_seed.values()]
        test = [network_mean(s, "last_test_top1") for s in by_seed.values()]
        lines.append(f"| {name} | {len(by_seed)} | {pm([network_mean(s, 'last_val_top1') for s in by_seed.values()])} | "
                     f"{pm(test)} | {pm(train)} | {pm([a - b for a, b in zip(train, test) if a is not None and b is not None])} |")
    lines += ["", "Each step, paired by seed (mean over networks; plain 95 % t-intervals over the seeds both have):", "",
              "| step | what changed | seeds | last val | last test |", "|---|---|---:|---:|---:|"]
    for variant, base, what in ABLATION_STEPS:
        cells = []
        for key in ("last_val_top1", "last_test_top1"):
            read = lambda name: {s: v for s, v in ((s, network_mean(x, key)) for s, x in runs.get(name, {}).items())  # noqa: E731
                                 if v is not None}
            cells.append(paired_difference(read(variant), read(base)))
        lines.append(f"| {variant} − {base} | {what} | {cells[0].n} | {cells[0].text()} | {cells[1].text()} |")
    return lines + [""]


# ----------------------------------------------------------------------------- running
def missing_grids(cell: str, phase: int, specs: list[str], seeds: list[int]) -> list[tuple[list[str], str]]:
    """The sweeps still to run: ``(specs, seeds)`` grids covering exactly the (spec, seed) pairs whose summary is not
    committed yet. The committed results, not a run folder, say what is done: on a new machine (``--out`` empty)
    the study goes on where the repository stands instead of training finished runs again. Specs missing the same
    seeds share one sweep, so ``--jobs`` runs them side by side."""
    committed = ablation_results(cell) if phase == "ablation" else load_results(cell, phase)
    by_seeds: dict[tuple[int, ...], list[str]] = {}
    for spec in specs:
        missing = tuple(s for s in seeds if s not in committed.get(label(spec), {}))
        if missing:
            by_seeds.setdefault(missing, []).append(spec)
    return [(group, ",".join(map(str, missing))) for missing, group in by_seeds.items()]


def run(cell: str, phase: int, archive: str, out: Path, jobs: int, commit: bool, seeds: str | None) -> None:
    from kdarena.experiments.sweep import run_sweep

    config, _, overrides, model = CELLS[cell]
    if phase == 1:
        references, rest, candidates = phase1_parts(model)
        batches, phase_seeds = [references + candidates, rest], [0, 1, 2]
    elif phase == "ablation":
        overrides = overrides + ABLATION_OVERRIDES
        batches, phase_seeds = [ABLATION], [0, 1, 2]
    elif phase == "p4":
        plan = part4_plan()
        if plan is None or cell not in plan:
            sys.exit(f"part four of {cell} is not pre-registered: commit {PREREGISTRATION.relative_to(ROOT)} first")
        overrides = overrides + plan[cell]["overrides"]
        check_spec, check_seed, _ = plan[cell]["check"]
        phase_seeds = plan[cell]["seeds"]
        # the check run and the first seed side by side, so the reproduction is known after the first batch
        batches = [(plan[cell]["methods"] + [check_spec], [check_seed]), (plan[cell]["methods"], phase_seeds)]
    else:
        plan = preregistered()
        if plan is None or cell not in plan.get("cells", {}):
            sys.exit(f"phase 2 of {cell} is not pre-registered: commit {PREREGISTRATION.relative_to(ROOT)} first")
        batches, phase_seeds = [plan["cells"][cell]["methods"]], plan["cells"][cell]["seeds"]
    wanted = [int(s) for s in seeds.split(",")] if seeds else phase_seeds
    batches = [batch if isinstance(batch, tuple) else (batch, wanted) for batch in batches]
    exp_dir = out / cell / folder(phase)
    done = threading.Event()

    def watch() -> None:  # commit each summary as its run finishes, not when the whole sweep does
        while not done.wait(30):
            collect(exp_dir, cell, phase, commit)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        for batch, batch_seeds in batches:
            for specs, seed_text in missing_grids(cell, phase, batch, [s for s in batch_seeds if s in wanted]):
                run_sweep(config, [f"data.root={archive}", *overrides], specs, seed_text, exp_dir, jobs=jobs)
    finally:
        done.set()
        watcher.join()
        collect(exp_dir, cell, phase, commit)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--cell", choices=sorted(CELLS), required=True)
    r.add_argument("--phase", type=lambda v: v if v in ("p4", "ablation") else int(v), choices=[1, 2, "p4", "ablation"],
                   required=True, help="1, 2 (part three), p4 (part four's confirmation, benchmarks/preregistration.md) "
                                       "or ablation (part four's, c10-5k: from cd to cd-code one ingredient at a time)")
    r.add_argument("--cifar10", help="cifar10-jpeg.tar.gz (or a folder of train/ test/ class folders)")
    r.add_argument("--tiny-imagenet", help="tiny-imagenet-32.tar.gz")
    r.add_argument("--out", default="runs/map3")
    r.add_argument("--jobs", type=int, default=2)
    r.add_argument("--seeds", default=None, help="a subset of the phase's seeds (default: all of them)")
    r.add_argument("--commit", action="store_true", help="git-commit each finished run's summary")
    s = sub.add_parser("select")
    s.add_argument("--cell", choices=sorted(CELLS), required=True)
    sub.add_parser("tables")
    args = p.parse_args()
    if args.command == "run":
        archive = getattr(args, CELLS[args.cell][1])
        if not archive:
            sys.exit(f"--{CELLS[args.cell][1].replace('_', '-')} PATH is needed for {args.cell}")
        run(args.cell, args.phase, archive, Path(args.out), args.jobs, args.commit, args.seeds)
        print(tables())
    elif args.command == "select":
        chosen, scores = select(args.cell)
        for name, score, k in scores:
            print(f"{name}: last-epoch validation top-1 {score:.2f} over {k} seeds")
        print(f"chosen: {chosen}" if chosen else "not decided: seeds 0-2 of every candidate are needed")
    else:
        print(tables())


if __name__ == "__main__":
    main()
