"""Confirm a tuned plan on fresh seeds (``kdarena confirm PLAN --seeds 100-109 [--baseline NAME]``).

* The plan is frozen first: its sha256 is written into the confirmation folder before any run starts, and
  checked again before the report. A plan changed after that (between two calls, or while the runs
  train) is an error: the runs would answer another question than the one asked.
* Every method of the plan trains on every seed through the sweep (``--jobs``, ``--engine ray``): finished
  runs are skipped, unfinished ones resumed, so the same command continues an interrupted confirmation.
* The report compares methods seed by seed on test top-1 (mean over the group's networks) at the epoch
  the tuning chose on: the last epoch, or the epoch of the best validation top-1. With ``--baseline``,
  each other method against it; without, every pair. Intervals are Bonferroni-corrected for the number
  of comparisons, Holm's procedure decides significance, and the Wilcoxon signed-rank p-value stands
  beside the t-test's (:mod:`.stats`).
"""
from __future__ import annotations

import logging
from itertools import combinations
from pathlib import Path
from typing import Sequence

from .. import config as cfg
from ..records.folder import atomic_write_text
from ..errors import UserError
from . import plan as plans
from .report import find_runs
from .stats import ALPHA, holm, mean, paired_difference, sample_std
from .sweep import parse_seeds, run_sweep

log = logging.getLogger("kdarena")

HASH_FILE = "plan.sha256"
CONFIG_FILE = "plan-config.yaml"
REPORT = "confirm.md"


class ConfirmError(UserError):
    """A confirmation cannot run as asked, or its plan changed; the message says which."""


def parse_seed_ranges(text: str) -> list[int]:
    """``100-109`` or ``0,1,2`` or ``0-2,10``: the seeds, each once."""
    items = []
    for part in (p.strip() for p in str(text).split(",")):
        low, sep, high = part.partition("-")
        if sep and low.strip().isdigit() and high.strip().isdigit():
            if int(high) < int(low):
                raise ConfirmError(f"--seeds {text!r}: the range {part} runs backwards; write LOW-HIGH, e.g. 100-109")
            items += [str(s) for s in range(int(low), int(high) + 1)]
        else:
            items.append(part)
    return parse_seeds(",".join(items))


def _frozen(plan_path: Path, out: Path) -> str:
    """The plan's sha256, written into ``out`` on the first call; a later call must find the same plan."""
    now = plans.digest(plan_path)
    record = out / HASH_FILE
    if record.is_file():
        then = record.read_text().split()[0] if record.read_text().strip() else ""
        if then != now:
            raise ConfirmError(f"{plan_path} changed after kdarena confirm started on it (sha256 {then[:12]} then, "
                               f"{now[:12]} now); restore it, or confirm the new plan into another --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record, f"{now}  {plan_path}\n")
    return now


def confirm(plan_path: str | Path, seeds: str | Sequence[int], baseline: str | None = None, out: str | Path | None = None,
            jobs: int = 1, engine: str = "local", address: str | None = None, gpus_per_run: float | None = None) -> str:
    """Run the plan's methods on ``seeds`` into ``out`` (default: ``confirm`` beside the plan); returns the report,
    also written to ``out/confirm.md``."""
    plan_path = Path(plan_path)
    seed_list = parse_seed_ranges(seeds) if isinstance(seeds, str) else parse_seeds(list(seeds))
    plan = plans.load(plan_path)
    labels = list(plan.methods)
    if baseline is not None and baseline not in plan.methods:
        raise ConfirmError(f"--baseline {baseline!r} is not a method of {plan_path}; its methods: {', '.join(labels)}")
    pairs = [(m, baseline) for m in labels if m != baseline] if baseline else list(combinations(labels, 2))
    if not pairs:
        raise ConfirmError(f"{plan_path} holds one method ({labels[0]}): there is nothing to compare it with")
    out = Path(out) if out is not None else plan_path.parent / "confirm"
    digest = _frozen(plan_path, out)
    if plan.config.get("seed") in seed_list:
        log.warning("kdarena: warning: seed %s is the one the tuning trained with; a confirmation is only fresh on other "
                    "seeds (e.g. --seeds 100-109)", plan.config["seed"])
    base = cfg.validate(plan.config)
    atomic_write_text(out / CONFIG_FILE, cfg.dump(base))
    specs = [f"{label}:{';'.join(method.overrides)}" if method.overrides else label for label, method in plan.methods.items()]
    run_sweep(out / CONFIG_FILE, [], specs, seed_list, out, jobs=jobs, engine=engine, address=address, gpus_per_run=gpus_per_run)
    if plans.digest(plan_path) != digest:
        raise ConfirmError(f"{plan_path} changed while kdarena confirm ran (sha256 {digest[:12]} when it started); "
                           f"these runs confirm the plan as it was; restore it, or confirm the new plan into another --out")
    text = _report(plan, out, seed_list, pairs, plan_path, digest)
    atomic_write_text(out / REPORT, text)
    return text


def _report(plan: plans.Plan, out: Path, seeds: list[int], pairs: list[tuple[str, str]], plan_path: Path, digest: str) -> str:
    wanted = set(seeds)
    values: dict[str, dict[int, float]] = {label: {} for label in plan.methods}
    for run in find_runs([out]):
        nets = [n.test_top1(plan.objective) for n in run.summary.networks]
        if run.label in values and run.seed in wanted and all(isinstance(v, (int, float)) for v in nets):
            values[run.label][run.seed] = mean(nets)
    epoch = "last epoch" if plan.objective == "last" else "epoch of each network's best validation top-1"
    k = len(pairs)
    lines = [f"Confirmation of {plan_path} (sha256 {digest[:12]}) on seeds {_seeds_text(seeds)}: test top-1 (mean over "
             f"the group's networks) at the {epoch}, the epoch the tuning chose on.", "",
             "| method | seeds | test top-1 | tuned on validation |", "|---|---:|---:|---:|"]
    for label, method in plan.methods.items():
        got = list(values[label].values())
        spread = f" ± {sample_std(got):.2f}" if len(got) > 1 else ""
        tuned = f"{method.validation_top1:.2f}" if method.validation_top1 is not None else "-"
        lines.append(f"| {label} | {len(got)} | {mean(got):.2f}{spread} | {tuned} |" if got else f"| {label} | 0 | - | {tuned} |")
    tests = [paired_difference(values[a], values[b], comparisons=k) for a, b in pairs]
    significant = holm([t.p for t in tests])
    level = 100 * (1 - ALPHA / k)
    correction = (f"Bonferroni-corrected for {k} comparisons (all of them hold together with 95 % confidence)" if k > 1
                  else "one comparison, so nothing to correct")
    lines += ["", f"Paired differences (matched by seed), {level:.4g} % intervals: {correction}; Holm at 5 % on the "
              "paired t-test's p; the Wilcoxon signed-rank p beside it as a check that does not assume normal differences:", "",
              "| comparison | pairs | difference | corrected interval | p (t) | Holm | p (Wilcoxon) |",
              "|---|---:|---:|---:|---:|---|---:|"]
    for (a, b), test, rejected in zip(pairs, tests, significant):
        interval = f"[{test.low:+.2f}, {test.high:+.2f}]" if test.n > 1 else "-"
        verdict = ("better" if test.mean > 0 else "worse") if rejected else ("n.s." if test.n > 1 else "-")
        lines.append(f"| {a} − {b} | {test.n} | {test.mean:+.2f} | {interval} | {_p(test.p)} | {verdict} | {_p(test.wilcoxon_p)} |")
    missing = [f"{label} ({len(values[label])}/{len(seeds)})" for label in plan.methods if len(values[label]) < len(seeds)]
    if missing:
        lines += ["", f"Runs missing (failed or damaged): {', '.join(missing)}; a comparison rests on the seeds both have."]
    return "\n".join(lines) + "\n"


def _p(value: float) -> str:
    return "-" if value != value else f"{value:.4f}"


def _seeds_text(seeds: list[int]) -> str:
    ordered = sorted(seeds)
    if ordered == list(range(ordered[0], ordered[-1] + 1)) and len(ordered) > 2:
        return f"{ordered[0]}-{ordered[-1]}"
    return ",".join(map(str, seeds))
