"""What ``kdarena tune`` gives back: a table per method (``DIR/tune.md``), Optuna's plots of each study
(``DIR/plots``) and the plan (``DIR/plan.yaml``): each method at its best trial, for ``kdarena confirm``."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from .. import config as cfg
from ..records.folder import atomic_write_text
from . import plan as plans
from .run_task import error_text
from .tune_space import describe, overrides, params_text

PLAN = "plan.yaml"
TABLE = "tune.md"


def write_results(tuning: Any, studies: dict[str, Any]) -> tuple[str, list[str]]:
    """Write the table (``DIR/tune.md``), the plots and, when every method has a finished trial, the plan, for
    ``tuning`` (a :class:`~.tune.Tuning`) and its ``studies`` by method; returns the table and the methods
    without a finished trial."""
    import optuna

    state = optuna.trial.TrialState
    epochs = tuning.base.optim.epochs
    at = "the last epoch" if tuning.objective == "last" else "each network's best epoch"
    lines = [f"Tuning on validation: each method {tuning.trials} trials of {epochs} epochs (the same budget), "
             f"TPE sampler (seed {tuning.seed}), {tuning.pruner} pruner; value = validation top-1 (mean over the "
             f"group's networks) at {at}. Space: " + ", ".join(f"{k}={v}" for k, v in describe(tuning.space).items()), "",
             "| method | trials | finished | pruned | failed | best validation top-1 | best trial | its parameters |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    chosen: dict[str, plans.PlannedMethod] = {}
    for spec in tuning.specs:
        study = studies[spec.label]
        trials = study.get_trials(deepcopy=False)
        count = {s: sum(t.state == s for t in trials) for s in (state.COMPLETE, state.PRUNED, state.FAIL)}
        best = study.best_trial if count[state.COMPLETE] else None
        lines.append(f"| {spec.label} | {len(trials)} | {count[state.COMPLETE]} | {count[state.PRUNED]} | {count[state.FAIL]} | "
                     + (f"{best.value:.2f} | {best.number} | {params_text(best.params)} |" if best else "- | - | - |"))
        if best is not None:
            chosen[spec.label] = plans.PlannedMethod(overrides=spec.overrides + overrides(best.params),
                                                     validation_top1=round(best.value, 4), trial=best.number, params=best.params)
    notes = _plots(tuning.out, studies)
    lines += [""] + [f"- {note}" for note in notes]
    missing = [spec.label for spec in tuning.specs if spec.label not in chosen]
    if missing:
        lines.append(f"No trial of {', '.join(missing)} finished: no plan is written.")
    else:
        plan = plans.Plan(objective=tuning.objective, config=cfg.to_dict(tuning.base), methods=chosen)
        path = tuning.out / PLAN
        atomic_write_text(path, plans.dump(plan, "kdarena tune's plan: each method at its tuned best, chosen on validation top-1.\n"
                                                 f"Confirm on fresh seeds: kdarena confirm {path} --seeds 100-109"))
        lines.append(f"Plan: {path} (confirm on fresh seeds: kdarena confirm {path} --seeds 100-109)")
    text = "\n".join(lines).rstrip() + "\n"
    atomic_write_text(tuning.out / TABLE, text)
    return text, missing


def _plots(out: Path, studies: dict[str, Any]) -> list[str]:
    """Optuna's optimisation history and parameter importances of each study as PNGs; returns one line per file
    (or per plot that cannot be drawn, and why: too few finished trials, matplotlib missing)."""
    try:
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as optuna_plots
    except ImportError as error:
        return [f"plots not drawn: {error} (pip install 'kdarena[tune]')"]
    folder = out / "plots"
    folder.mkdir(exist_ok=True)
    notes = []
    for label, study in studies.items():
        for what, draw in (("history", optuna_plots.plot_optimization_history), ("importances", optuna_plots.plot_param_importances)):
            path = folder / f"{label}-{what}.png"
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                    axes = draw(study)
                figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
                figure.savefig(path, dpi=110, bbox_inches="tight")
                plt.close(figure)
                notes.append(f"{label} {what}: {path}")
            except (ValueError, RuntimeError, ZeroDivisionError) as error:
                notes.append(f"{label} {what}: not drawn ({error_text(error)})")
    return notes
