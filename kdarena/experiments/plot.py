"""PNG plots of one run or of an experiment directory (``kdarena plot PATH [--out DIR]``).

* ``accuracy.png``      test top-1 per epoch, one panel per network (and the ensemble), one line per
                        method: mean over seeds, shaded min-max band.
* ``teacher_share.png`` each network's teacher share per epoch, one panel per CD-like method.
* ``losses.png``        the loss terms (ce, kd, feat) per network and epoch, one row per method.
* ``perturbation.png``  per perturbation op: how often it was applied and how often the perturbed
                        network won (became the teacher), one panel per method with perturbation.

Needs matplotlib (``pip install 'kdarena[plot]'``). Figures are drawn with the Agg canvas
directly, so the global matplotlib backend of the caller is left alone.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MissingExtraError, UserError
from ..methods import registry as method_registry
from ..records import read as run_folders
from ..records.epoch import is_before_training
from ..records.folder import METRICS_FILE

_TERMS = (("ce", "cross-entropy"), ("kd", "distillation KL"), ("feat", "feature loss"))


def _matplotlib():
    try:
        from matplotlib.figure import Figure
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401  (Agg canvas)
    except ImportError:
        raise MissingExtraError("plotting needs matplotlib: pip install 'kdarena[plot]'") from None
    return Figure


@dataclass
class _Run:
    path: Path
    label: str
    seed: int
    records: list[dict[str, Any]]
    config: dict[str, Any]

    @property
    def n(self) -> int:
        return len(self.config.get("models") or []) or sum(1 for k in self.records[0] if k.endswith("/teacher_share"))

    @property
    def has_teacher(self) -> bool:
        method = method_registry.method_of(self.config)
        return bool(method and method.has_teacher)


def _find_runs(path: Path) -> list[_Run]:
    """The runs under ``path`` with epoch records; a damaged one is skipped with a warning naming its file and the fault."""
    runs = []
    for here in run_folders.logged_runs(path):
        try:
            records = run_folders.read_records(here)
            config = run_folders.read_config(here)
        except run_folders.DamagedFile as error:
            run_folders.skip(error)
            continue
        if not records:
            continue
        label, seed = run_folders.label_and_seed(here, config)
        runs.append(_Run(here, _method_label(label, config), seed, records, config))
    keys = [(r.label, r.seed) for r in runs]
    if len(set(keys)) != len(keys):  # several experiments below PATH: qualify labels with the experiment
        for r in runs:
            parent = r.path.parent.relative_to(path) if r.path.parent != path else Path(path.name)
            r.label = f"{parent}/{r.label}"
    return runs


def _method_label(folder_label: str, config: dict[str, Any]) -> str:
    """A sweep's folder is named by its method preset (``cd-mean``); any other folder's name says nothing of
    the method, which the legend must show: ``cd-mean (photos)``."""
    method = (config.get("method") or {}).get("name")
    if folder_label in method_registry.presets() or not isinstance(method, str):
        return folder_label
    return f"{method} ({folder_label})"


def _groups(runs: list[_Run]) -> dict[str, list[_Run]]:
    groups: dict[str, list[_Run]] = defaultdict(list)
    for r in runs:
        groups[r.label].append(r)
    labels = list(groups)
    base = lambda l: l.rsplit("/", 1)[-1]  # noqa: E731
    order = method_registry.label_order()
    ordered = sorted(labels, key=lambda l: (order.index(base(l)) if base(l) in order else len(order), l))
    return {l: sorted(groups[l], key=lambda r: r.seed) for l in ordered}


def _series(group: list[_Run], key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """Epochs (1-based; 0: the starting weights of a run from weights) with mean, min and max over the seeds that
    have ``key`` at that epoch."""
    by_epoch: dict[int, list[float]] = defaultdict(list)
    for run in group:
        for record in run.records:
            if key in record and record[key] is not None:
                by_epoch[0 if is_before_training(record) else int(record["epoch"]) + 1].append(float(record[key]))
    epochs = sorted(by_epoch)
    return (epochs, [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs],
            [min(by_epoch[e]) for e in epochs], [max(by_epoch[e]) for e in epochs])


def _colors(labels: list[str]) -> dict[str, Any]:
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
    return {label: palette[i % len(palette)] for i, label in enumerate(labels)}


def _seed_note(groups: dict[str, list[_Run]]) -> str:
    counts = sorted({len(g) for g in groups.values()})
    if counts == [1]:
        return "1 seed"
    return f"mean over {'/'.join(map(str, counts))} seeds, band = min–max"


def _integer_epochs(ax) -> None:
    """Whole-epoch ticks; a single epoch gets a sensible range instead of fractional ticks."""
    from matplotlib.ticker import MaxNLocator

    lo, hi = ax.dataLim.intervalx
    if math.isfinite(lo) and math.isfinite(hi) and hi - lo < 1:
        ax.set_xlim(lo - 0.5, hi + 0.5)
        ax.set_xticks(list(range(int(round(lo)), int(round(hi)) + 1)))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _suptitle(fig, text: str) -> None:
    """A figure title wrapped to the figure's width (narrow single-panel figures cut long titles)."""
    import textwrap

    width = fig.get_figwidth()
    fig.suptitle("\n".join(textwrap.wrap(text, max(int(width * 9.5), 30))), fontsize=11 if width < 7 else 12)


def _save(fig, path: Path) -> str:
    fig.savefig(path, dpi=110)
    return str(path)


# ----------------------------------------------------------------------------- the plots
def _accuracy_panels(groups) -> list[tuple[str, str]]:
    """(name, record key) of each accuracy panel: the networks, their ensemble, then the networks a method
    scores besides them (cd-mean's temporal means ``mean{i}``, ONE's ``gate_ensemble``)."""
    n = max(r.n for g in groups.values() for r in g)
    panels = [(f"net{i}", f"net{i}/test_top1") for i in range(n)] + ([("ensemble", "ensemble/test_top1")] if n > 1 else [])
    shown = {name for name, _ in panels}
    extra = sorted({key.split("/")[0] for g in groups.values() for r in g for record in r.records
                    for key in record if key.endswith("/test_top1")} - shown)
    return panels + [(name, f"{name}/test_top1") for name in extra]


def _accuracy(Figure, groups, colors, out: Path) -> str | None:
    panels = _accuracy_panels(groups)
    series = {(label, key): _series(group, key) for label, group in groups.items() for _, key in panels}
    last_epoch = max((s[0][-1] for s in series.values() if s[0]), default=0)
    if not last_epoch:
        return None
    zoom_from = last_epoch // 2 + 1 if last_epoch >= 4 else None  # second row: the second half, zoomed in
    rows = 2 if zoom_from else 1
    fig = Figure(figsize=(4.6 * len(panels), 3.9 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, len(panels), squeeze=False)
    models = next(iter(groups.values()))[0].config.get("models") or []
    for c, (name, key) in enumerate(panels):
        idx = int(name[3:]) if name.startswith("net") else None
        title = name + (f" ({models[idx]})" if idx is not None and idx < len(models) else " (mean softmax)" if name == "ensemble" else "")
        for r in range(rows):
            ax = axes[r][c]
            lo_hi: list[float] = []
            for label, group in groups.items():
                epochs, mean, low, high = series[(label, key)]
                if r == 1:
                    keep = [k for k, e in enumerate(epochs) if e >= zoom_from]
                    epochs, mean, low, high = ([v[k] for k in keep] for v in (epochs, mean, low, high))
                if not epochs:
                    continue
                ax.plot(epochs, mean, color=colors[label], label=f"{label} ({mean[-1]:.2f})",
                        marker="o" if len(epochs) < 15 else None, ms=3)
                if len(group) > 1:
                    ax.fill_between(epochs, low, high, color=colors[label], alpha=0.15, linewidth=0)
                lo_hi += low + high
            if r == 1 and lo_hi:
                pad = 0.08 * (max(lo_hi) - min(lo_hi) or 1.0)
                ax.set_ylim(min(lo_hi) - pad, max(lo_hi) + pad)
            ax.set_title(title if r == 0 else f"{title}: epochs {zoom_from}-{last_epoch} (zoom)", fontsize=10)
            ax.grid(alpha=0.3)
            _integer_epochs(ax)
            if r == rows - 1:
                ax.set_xlabel("epoch")
            if c == 0:
                ax.set_ylabel("test top-1 accuracy (%)")
        axes[0][c].legend(fontsize=8, title="method (last epoch)", title_fontsize=8, loc="lower right")
    _suptitle(fig, f"Test top-1 per epoch ({_seed_note(groups)})")
    return _save(fig, out / "accuracy.png")


def _panel_grid(Figure, count: int, width: float, height: float, max_cols: int = 3, **kwargs):
    """A figure of ``count`` panels wrapped into rows of at most ``max_cols``; unused axes hidden."""
    cols = min(count, max_cols)
    rows = -(-count // cols)
    fig = Figure(figsize=(width * cols, height * rows + 0.4), layout="constrained")
    axes = list(fig.subplots(rows, cols, squeeze=False, **kwargs).flat)
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes[:count]


def _teacher_share(Figure, groups, out: Path) -> str | None:
    cd = {label: g for label, g in groups.items() if g[0].has_teacher}
    if not cd:
        return None
    fig, axes = _panel_grid(Figure, len(cd), 4.6, 3.8, sharey=True)
    for ax, (label, group) in zip(axes, cd.items()):
        n = group[0].n
        models = group[0].config.get("models") or []
        for i in range(n):
            epochs, mean, low, high = _series(group, f"net{i}/teacher_share")
            name = f"net{i}" + (f" ({models[i]})" if i < len(models) else "")
            ax.plot(epochs, mean, label=name, marker="o" if len(epochs) < 15 else None, ms=3)
            if len(group) > 1:
                ax.fill_between(epochs, low, high, alpha=0.15, linewidth=0)
        ax.axhline(1.0 / max(n, 1), color="grey", linestyle="--", linewidth=1, label=f"equal share (1/{n})")
        ax.set_ylim(0, 1)
        ax.set_title(f"{label} ({len(group)} seed{'s' if len(group) > 1 else ''})")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        _integer_epochs(ax)
        ax.legend(fontsize=8)
    for ax in axes[:: min(len(axes), 3)]:
        ax.set_ylabel("teacher share (fraction of steps)")
    _suptitle(fig, "How often each network was the teacher" + (f" ({_seed_note(cd)})" if any(len(g) > 1 for g in cd.values()) else ""))
    return _save(fig, out / "teacher_share.png")


def _losses(Figure, groups, out: Path) -> str | None:
    terms = [(t, title) for t, title in _TERMS if any(f"net0/{t}" in rec for g in groups.values() for r in g for rec in r.records)]
    if not terms:
        return None
    rows = list(groups.items())
    fig = Figure(figsize=(4.4 * len(terms), 2.9 * len(rows) + 0.6), layout="constrained")
    axes = fig.subplots(len(rows), len(terms), squeeze=False, sharex=True)
    for r, (label, group) in enumerate(rows):
        n = group[0].n
        models = group[0].config.get("models") or []
        for c, (term, title) in enumerate(terms):
            ax = axes[r][c]
            drawn = False
            for i in range(n):
                epochs, mean, low, high = _series(group, f"net{i}/{term}")
                if not epochs:
                    continue
                drawn = True
                ax.plot(epochs, mean, label=f"net{i}" + (f" ({models[i]})" if i < len(models) else ""), marker="o" if len(epochs) < 15 else None, ms=3)
                if len(group) > 1:
                    ax.fill_between(epochs, low, high, alpha=0.15, linewidth=0)
            if not drawn:
                ax.text(0.5, 0.5, f"no {term} term\nfor {label}", ha="center", va="center", transform=ax.transAxes, color="grey")
                ax.set_xticks([])
                ax.set_yticks([])
            else:
                ax.grid(alpha=0.3)
                _integer_epochs(ax)
                ax.legend(fontsize=8)
            if r == 0:
                ax.set_title(f"{title} ({term})")
            if c == 0:
                ax.set_ylabel(f"{label}\nloss per step (nats)")
            if r == len(rows) - 1:
                ax.set_xlabel("epoch")
    _suptitle(fig, f"Training loss terms per epoch (mean over the epoch's steps; {_seed_note(groups)})")
    return _save(fig, out / "losses.png")


def _perturbation(Figure, groups, out: Path) -> str | None:
    panels = []
    for label, group in groups.items():
        counts: dict[str, int] = defaultdict(int)
        won: dict[str, int] = defaultdict(int)
        for run in group:
            for record in run.records:
                for key, value in record.items():
                    if key.startswith("perturb/") and key.endswith("/count"):
                        op = key[len("perturb/"):-len("/count")]
                        counts[op] += int(value)
                        won[op] += int(record.get(f"perturb/{op}/won", 0))
        if counts:
            panels.append((label, group, dict(counts), dict(won)))
    if not panels:
        return None
    fig, axes = _panel_grid(Figure, len(panels), max(4.8, 0.9 * max(len(p[2]) for p in panels) + 1.5), 4.2)
    for ax, (label, group, counts, won) in zip(axes, panels):
        ops = sorted(counts)
        xs = range(len(ops))
        total = [counts[o] for o in ops]
        wins = [won[o] for o in ops]
        ax.bar(xs, total, color="#9ecae1", label="perturbed steps")
        ax.bar(xs, wins, color="#08519c", label="perturbed network won")
        top = max(total) if total else 1
        for x, t, w in zip(xs, total, wins):
            ax.text(x, t + 0.02 * top, f"{100.0 * w / t:.0f}%" if t else "-", ha="center", va="bottom", fontsize=9)
        ax.set_ylim(0, top * 1.4 + 1)  # head room for the labels and the legend
        ax.set_xticks(list(xs))
        ax.set_xticklabels(ops, rotation=30 if len(ops) > 4 else 0, ha="right" if len(ops) > 4 else "center")
        ax.set_xlabel("perturbation op")
        ax.set_ylabel("training steps (all seeds)")
        n = group[0].n
        rate = 100.0 * sum(wins) / max(sum(total), 1)
        ax.set_title(f"{label}: won {rate:.1f}% overall (chance ≈ {100.0 / max(n, 1):.0f}%)", fontsize=10)
        ax.legend(fontsize=8, loc="upper left", ncol=2)
        ax.grid(axis="y", alpha=0.3)
    _suptitle(fig, "Perturbations per op; label = % of them where the perturbed network became the teacher")
    return _save(fig, out / "perturbation.png")


def plot_path(path: str | Path, out: str | Path | None = None) -> list[str]:
    """Write the PNGs for a run directory or an experiment directory; return their paths."""
    Figure = _matplotlib()
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a directory; give a run directory or an experiment directory (kdarena sweep --out)")
    runs = _find_runs(path)
    if not runs:
        raise UserError(f"no run with a valid {METRICS_FILE} under {path}; train or sweep into it first (kdarena sweep --out DIR)")
    groups = _groups(runs)
    colors = _colors(list(groups))
    target = Path(out) if out else path / "plots"
    target.mkdir(parents=True, exist_ok=True)
    written = [
        _accuracy(Figure, groups, colors, target),
        _teacher_share(Figure, groups, target),
        _losses(Figure, groups, target),
        _perturbation(Figure, groups, target),
    ]
    return [p for p in written if p]
