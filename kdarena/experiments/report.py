"""Tables of mean +- std over seeds from finished runs (``kdarena report DIR [DIR ...]``).

Every folder with a summary (a finished run) under the given directories is a run; runs are grouped
by method label, the run directory's name without its ``-seedN`` suffix. If two runs would
share a label and a seed (e.g. two experiments passed at once), each experiment directory
gets its own section instead, so runs of different experiments are never averaged together.
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from pydantic import ValidationError

from ..config import flatten, marked_keys
from ..errors import UserError
from ..methods import registry as method_registry
from ..records import read as run_folders
from ..records.folder import SUMMARY_FILE, atomic_write_text
from ..records.summary import Result, Summary
from .stats import Paired, mean, paired_difference, sample_std

#: Prefixes of the keys that define the method (they may differ between the runs of one experiment).
_METHOD_PREFIXES = ("seed", "method.", "perturb.")

LEGEND = ("Test top-1 (%), mean ± sample std over seeds ('-' for one seed): 'last epoch' = after the final epoch; "
          "'@ best val' = at the epoch where that network's validation top-1 peaked (selected on the held-out "
          "validation split, never on test); Δ = difference of means vs independent; ensemble = mean of the networks' softmax.")


@dataclass
class Run:
    path: Path
    experiment: Path
    label: str
    seed: int
    summary: Summary

    @property
    def config(self) -> dict[str, Any]:
        return self.summary.config.as_written() if self.summary.config is not None else {}

    @property
    def has_teacher(self) -> bool:
        """The run's method picks a teacher per step (teacher shares and perturbation wins are meaningful)."""
        method = method_registry.method_of(self.config)
        return bool(method and method.has_teacher)


def _f(value: float | None, digits: int = 2, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _pm(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return f"{mean(values):.2f} ± {_f(sample_std(values))}"


def _csv_num(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.{digits}f}"


# ----------------------------------------------------------------------------- discovery
def find_runs(dirs: Iterable[str | Path]) -> list[Run]:
    """The finished runs under ``dirs``; a damaged one is skipped with a warning naming its file and the fault."""
    runs: list[Run] = []
    seen: set[Path] = set()
    for d in dirs:
        root = Path(d)
        if not root.is_dir():
            raise UserError(f"{root} is not a directory; give an experiment directory (kdarena sweep --out) or a run directory")
        for here in run_folders.finished_runs(root):
            if here.resolve() in seen:
                continue
            seen.add(here.resolve())
            try:
                summary = run_folders.read_summary(here)
            except run_folders.DamagedFile as error:
                run_folders.skip(error)
                continue
            label, seed = run_folders.label_and_seed(here, summary.config.as_written() if summary.config else {})
            runs.append(Run(here, here.parent, label, seed, summary))
    return runs


def _sections(runs: list[Run]) -> list[tuple[str | None, dict[str, list[Run]]]]:
    keys = [(r.label, r.seed) for r in runs]
    split = len(set(keys)) != len(keys)
    buckets: dict[Path | None, dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        buckets[run.experiment if split else None][run.label].append(run)
    out = []
    for exp, groups in buckets.items():
        ordered = {label: sorted(groups[label], key=lambda r: r.seed) for label in _ordered_labels(groups)}
        out.append((None if exp is None else str(exp), ordered))
    return out


def _ordered_labels(labels: Iterable[str]) -> list[str]:
    labels, order = list(labels), method_registry.label_order()
    return [l for l in order if l in labels] + sorted(l for l in labels if l not in order)


# ----------------------------------------------------------------------------- per-group numbers
def _values(runs: list[Run], index: int | str | None, key: str) -> list[float]:
    """``index`` None = the ensemble; a string = a network the method evaluates besides the group (e.g. ``mean0``)."""
    out = []
    for run in runs:
        nets = run.summary.networks
        entry: Result | None
        if isinstance(index, str):
            entry = (run.summary.extra or {}).get(index)
        else:
            entry = run.summary.ensemble if index is None else (nets[index] if index < len(nets) else None)
        if entry is not None and getattr(entry, key, None) is not None:
            out.append(float(getattr(entry, key)))
    return out


def _network_rows(runs: list[Run]) -> list[tuple[str, int | None]]:
    n = max(len(r.summary.networks) for r in runs)
    models = runs[0].config.get("models") or []
    rows = [(f"net{i}" + (f" ({models[i]})" if i < len(models) else ""), i) for i in range(n)]
    if n > 1:
        rows.append(("ensemble", None))
    rows += [(name, name) for name in sorted(runs[0].summary.extra or {})]  # e.g. temporal means, gated ensemble
    return rows


def _settings(run: Run) -> str:
    c = run.config
    m, p = c.get("method") or {}, c.get("perturb") or {}
    text = str(m.get("name", "?"))
    if method_registry.method_of(c) is not None:
        try:
            text = method_registry.build(method_registry.params_for(m)).describe(p)
        except (ValidationError, UserError):  # options this version no longer knows: the name alone
            pass
    if (p.get("parameters") or {}).get("enabled"):
        text += ", weight mutation"
    return text


def _setup_line(runs: list[Run]) -> str:
    c = runs[0].config
    d, o = c.get("data") or {}, c.get("optim") or {}
    data = d.get("name", "?")
    extra = [f"val {d.get('val_size')}" if d.get("val_size") else "no val split: '@ best val' selects on test"]
    if d.get("train_subset"):
        extra.append(f"train subset {d['train_subset']}")
    models = " + ".join(c.get("models") or [])
    epochs = o.get("epochs")
    warmup = f" after {o['warmup_epochs']} warm-up epochs" if o.get("warmup_epochs") else ""
    return (f"setup: {data} ({', '.join(extra)}); models {models}; {epochs} epoch{'s' if epochs != 1 else ''}, "
            f"batch {d.get('batch_size')}, {o.get('name')} lr {o.get('lr')}{warmup}, {o.get('schedule')} schedule")


def _differences(runs: list[Run]) -> list[str]:
    flat = [flatten(r.config) for r in runs]
    ignored = marked_keys("bookkeeping")
    keys = sorted(set().union(*flat))
    out = []
    for key in keys:
        if key.startswith(_METHOD_PREFIXES) or key in ignored:
            continue
        values = {json.dumps(f.get(key), sort_keys=True) for f in flat}
        if len(values) > 1:
            out.append(f"{key} ({', '.join(sorted(values))})")
    return out


# ----------------------------------------------------------------------------- rendering
def _table(header: list[str], rows: list[list[str]], align_right_from: int = 1) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join(("-" * (w + 1) + ":") if i >= align_right_from else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"]
    for row in rows:
        lines.append("| " + " | ".join((c.rjust(w) if i >= align_right_from else c.ljust(w)) for i, (c, w) in enumerate(zip(row, widths))) + " |")
    return lines


def _by_seed(runs: list[Run], index: int | None, key: str) -> dict[int, float]:
    out = {}
    for run in runs:
        values = _values([run], index, key)
        if values:
            out[run.seed] = values[0]
    return out


#: (csv name, summary key, table title) of the two accuracies compared seed by seed
_METRICS = (("last", "last_test_top1", "Δ last epoch [95% CI]"), ("best_val", "test_at_best_val_top1", "Δ @ best val [95% CI]"))
DEFAULT_BASELINES = ("independent", "dml")


def _paired(groups: dict[str, list[Run]], baseline: str) -> dict[tuple[str, str], dict[str, Paired]]:
    """Per (method, network row): the seed-matched differences to ``baseline`` at each metric."""
    base = groups[baseline]
    out = {}
    for label, group in groups.items():
        if label == baseline:
            continue
        for name, index in _network_rows(group):
            out[(label, name)] = {metric: paired_difference(_by_seed(group, index, key), _by_seed(base, index, key))
                                  for metric, key, _ in _METRICS}
    return out


def _paired_table(baseline: str, paired: dict[tuple[str, str], dict[str, Paired]]) -> list[str]:
    if not paired:
        return []
    header = ["method", "network"] + [h for _, _, title in _METRICS for h in (title, "width", "pairs", "")]
    rows = [[label, name] + [c for metric, _, _ in _METRICS for c in (d[metric].text(), _f(d[metric].width), str(d[metric].n), d[metric].verdict)]
            for (label, name), d in paired.items()]
    return [f"Paired differences vs **{baseline}** (test top-1, points; mean over the seeds run for both, matched by seed, "
            f"with a 95 % Student-t interval; width = its upper minus its lower end; pairs = the number of seeds it rests on; "
            f"'better'/'worse' = the interval excludes 0, 'n.s.' = it does not):", "",
            *_table(header, rows, align_right_from=2), ""]


def _paired_columns(baseline: str, diffs: dict[str, Paired] | None) -> dict[str, str | int]:
    """report.csv's columns of the paired differences to ``baseline`` (empty for the baseline itself)."""
    out: dict[str, str | int] = {}
    for metric, _, _ in _METRICS:
        d, name = (diffs or {}).get(metric), f"paired_{metric}_vs_{baseline}"
        out.update({name: _csv_num(d.mean) if d else "", f"{name}_low": _csv_num(d.low) if d else "",
                    f"{name}_high": _csv_num(d.high) if d else "", f"{name}_width": _csv_num(d.width) if d else "",
                    f"{name}_pairs": d.n if d else ""})
    return out


def _check_baselines(runs: list[Run], baselines: Sequence[str] | None, dirs: list) -> list[str]:
    """The baselines to compare with: each one the user named must have runs (the defaults need not)."""
    present = _ordered_labels({r.label for r in runs})
    if baselines is None:
        return list(DEFAULT_BASELINES)
    missing = [b for b in baselines if b not in present]
    if missing:
        raise UserError(f"no run of baseline {', '.join(missing)} under {', '.join(map(str, dirs))}; methods present: "
                        f"{', '.join(present)}; pass some of them to --baseline (comma-separated)")
    return list(baselines)


def _perturbed(group: list[Run]) -> tuple[int, int]:
    """Perturbed steps the perturbed network won, and perturbed steps, summed over the group's seeds."""
    return sum(r.summary.perturbed_won for r in group), sum(r.summary.perturbed_steps for r in group)


def _run_mean(group: list[Run], key: str) -> float:
    return mean([float(getattr(r.summary, key)) for r in group])


def _recorded(group: list[Run], key: str) -> bool:
    """Every run of the group has ``key`` (summaries written before evaluation was timed have no eval_seconds)."""
    return all(getattr(r.summary, key) is not None for r in group)


def _seconds(group: list[Run]) -> str:
    """``147.0 + 307.2 = 454.2``: train, evaluation and total seconds; the training time alone for older runs."""
    train = _run_mean(group, "wall_seconds")
    if not _recorded(group, "eval_seconds"):
        return f"{train:.1f} + ? (not recorded)"
    return f"{train:.1f} + {_run_mean(group, 'eval_seconds'):.1f} = {_run_mean(group, 'total_seconds'):.1f}"


def write_report(dirs: Sequence[str | Path] | str | Path, out: str | Path | None = None, best_on_test: bool = False,
                 baselines: Sequence[str] | None = None) -> str:
    """Write ``report.md`` and ``report.csv`` into ``out`` (default: the first dir); return the Markdown.

    ``baselines``: methods every other method is compared with, seed by seed (paired 95 % intervals);
    each one named must have runs (else :class:`UserError`). None = :data:`DEFAULT_BASELINES`, those
    of them that have runs. A damaged run folder is skipped with a warning.
    """
    if isinstance(dirs, (str, Path)):
        dirs = [dirs]
    dirs = list(dirs)
    if not dirs:
        raise UserError("give at least one experiment or run directory")
    runs = find_runs(dirs)
    if not runs:
        raise UserError(f"no finished run (a folder with a valid {SUMMARY_FILE}) under {', '.join(map(str, dirs))}; "
                        f"train or sweep into it first (kdarena sweep --out DIR)")
    baselines = _check_baselines(runs, baselines, dirs)
    compared = [b for b in baselines if any(r.label == b for r in runs)]  # report.csv's paired columns
    md: list[str] = [LEGEND, ""]
    csv_rows: list[dict[str, Any]] = []
    for title, groups in _sections(runs):
        if title is not None:
            md += [f"## {title}", ""]
        all_runs = [r for g in groups.values() for r in g]
        md.append(_setup_line(all_runs))
        diffs = _differences(all_runs)
        if diffs:
            md.append(f"warning: these runs differ beyond the method, so they are not strictly comparable: {'; '.join(diffs)}")
        md.append("")
        paired = {b: _paired(groups, b) for b in baselines if b in groups}
        base = groups.get("independent")
        deltas = base is not None
        header = ["method", "network", "seeds", "last epoch", *["Δ last"] * deltas, "@ best val", *["Δ @ best val"] * deltas]
        if best_on_test:
            header.append("best test (selected on test)")
        rows = []
        for label, group in groups.items():
            for name, index in _network_rows(group):
                last = _values(group, index, "last_test_top1")
                at_val = _values(group, index, "test_at_best_val_top1")
                gain_last = gain_val = None
                if base is not None and label != "independent":
                    b_last, b_val = _values(base, index, "last_test_top1"), _values(base, index, "test_at_best_val_top1")
                    gain_last = mean(last) - mean(b_last) if last and b_last else None
                    gain_val = mean(at_val) - mean(b_val) if at_val and b_val else None
                row = [label, name, str(len(group)), _pm(last), _f(gain_last, signed=True), _pm(at_val), _f(gain_val, signed=True)]
                if not deltas:  # no independent runs here: the Δ columns would be nothing but '-'
                    del row[6], row[4]
                best_test = _values(group, index, "best_test_top1_selected_on_test")
                if best_on_test:
                    row.append(_pm(best_test))
                rows.append(row)
                won, steps = _perturbed(group)
                teacher = group[0].has_teacher
                share = _values(group, index, "teacher_share") if isinstance(index, int) and teacher else []
                record = {
                    "experiment": title or "", "method": label, "settings": _settings(group[0]),
                    "network": name.split(" ")[0], "model": name.split(" ")[1].strip("()") if " " in name else "", "seeds": len(group),
                    "last_top1_mean": _csv_num(mean(last)), "last_top1_std": _csv_num(sample_std(last)), "gain_last": _csv_num(gain_last),
                    "best_val_top1_mean": _csv_num(mean(at_val)) if at_val else "", "best_val_top1_std": _csv_num(sample_std(at_val)),
                    "gain_best_val": _csv_num(gain_val),
                }
                if best_on_test:
                    record["best_test_selected_on_test_mean"] = _csv_num(mean(best_test))
                    record["best_test_selected_on_test_std"] = _csv_num(sample_std(best_test))
                record.update({
                    "teacher_share": _csv_num(mean(share)) if share else "",
                    "perturbed_won": won if teacher else "", "perturbed_steps": steps if teacher else "",
                    "perturbed_win_rate": _csv_num(won / steps) if teacher and steps else "",
                    "wall_seconds": _csv_num(_run_mean(group, "wall_seconds"), 1),
                    **{key: _csv_num(_run_mean(group, key), 1) if _recorded(group, key) else "" for key in ("eval_seconds", "total_seconds")},
                    "images_per_s": _csv_num(_run_mean(group, "images_per_s"), 1),
                })
                for b in compared:
                    record.update(_paired_columns(b, paired.get(b, {}).get((label, name))))
                csv_rows.append(record)
        md += _table(header, rows, align_right_from=2)
        md.append("")

        header2 = ["method", "settings", "seeds", "teacher share (per network)", "perturbed net won", "seconds: train + eval = total", "images/s"]
        rows2 = []
        n_nets = 2
        for label, group in groups.items():
            nets = [i for _, i in _network_rows(group) if isinstance(i, int)]
            n_nets = len(nets)
            if group[0].has_teacher:
                share = " / ".join(_f(mean(_values(group, i, "teacher_share"))) for i in nets)
                won, steps = _perturbed(group)
                rate = f"{100.0 * won / steps:.1f}% ({won}/{steps})" if steps else "-"
            else:
                share, rate = "-", "-"
            rows2.append([label, _settings(group[0]), str(len(group)), share, rate,
                          _seconds(group), f"{_run_mean(group, 'images_per_s'):.0f}"])
        md += _table(header2, rows2, align_right_from=2)
        md += ["", f"Teacher share = fraction of training steps a network was the teacher (CD only). Perturbed net won = "
                   f"fraction of perturbed steps where the network given the perturbed batch became the teacher "
                   f"(chance ≈ 1/{n_nets} = {100.0 / max(n_nets, 1):.0f}%). Seconds = training and evaluation time summed over epochs, and their total (start-up and data loading excluded), mean over seeds; images/s = training images per second (median epoch), mean over seeds.", ""]
        for b in baselines:
            md += _paired_table(b, paired[b]) if b in paired else [f"No paired differences vs **{b}** here: no run of {b} in this section.", ""]
    text = "\n".join(md).rstrip() + "\n"

    target = Path(out) if out else Path(dirs[0])
    target.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    fields = list(dict.fromkeys(key for row in csv_rows for key in row))  # sections may compare with different baselines
    writer = csv.DictWriter(buffer, fieldnames=fields, restval="")
    writer.writeheader()
    writer.writerows(csv_rows)
    atomic_write_text(target / "report.md", text)
    atomic_write_text(target / "report.csv", buffer.getvalue())
    return text
