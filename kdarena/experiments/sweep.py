"""Run methods x seeds with everything else identical into one experiment directory.

``kdarena sweep CONFIG [key=value ...] --methods independent,dml,cd --seeds 0,1,2 --out DIR``

* One run directory per method and seed, ``DIR/<label>-seed<S>`` (e.g. ``cd-seed0``).
* A method is a registered short name (:func:`presets`, declared by each method class) or ``label:key=value;key=value``
  (a registered name with extra overrides, or a new label with its own overrides, e.g.
  ``cd-clean:method.name=cd;method.selection=clean``).
* Order of overrides: the config file, then the command-line overrides, then the method's
  preset and extras, then ``seed``. So a method always means the same thing.
* Finished runs (with a summary) are skipped, unfinished ones (``checkpoints/last.pt``)
  resumed, the rest started. A run made with a different config is never silently reused.
* The index (:class:`~kdarena.records.sweep_index.SweepIndex`) lists every run with its status, wall time and the node (and GPU) it ran on;
  it is rewritten after every run.
* ``--engine`` says where the runs train: ``local`` (this machine, ``--jobs`` at once) or ``ray``
  (a Ray cluster, :mod:`.ray_engine`); everything above is the same for both.
"""
from __future__ import annotations

import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .. import config as cfg
from ..methods import registry as method_registry
from ..records import read as run_folders
from ..records import folder
from ..records.folder import is_finished, lock, sweep_index_path, write_json
from ..records.summary import Summary
from ..records.sweep_index import SweepIndex, SweepMethod, SweepRun
from .engines import SweepError, make_engine
from .run_task import next_action

log = logging.getLogger("kdarena")

def presets() -> dict[str, list[str]]:
    """Registered sweep labels and the overrides that define them (each method class declares its own)."""
    return method_registry.presets()


_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_SEED_SUFFIX = re.compile(r"-seed\d+$")


@dataclass
class MethodSpec:
    label: str
    overrides: list[str] = field(default_factory=list)


@dataclass
class RunPlan:
    label: str
    seed: int
    run_dir: Path
    config: cfg.Config
    status: str = "pending"
    seconds: float = 0.0
    error: str | None = None
    node: str | None = None  # the host (local engine) or Ray node id it trained on
    gpu: str | None = None  # the GPU ids Ray gave it

    @property
    def name(self) -> str:
        return f"{self.label}-seed{self.seed}"

    def record(self) -> SweepRun:
        return SweepRun(label=self.label, seed=self.seed, run_dir=str(self.run_dir), status=self.status,
                        seconds=round(self.seconds, 2), node=self.node, gpu=self.gpu, error=self.error)


# ----------------------------------------------------------------------------- parsing
def _split_top_level(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside brackets, so ``cd-x:models=[a,b]`` stays one item."""
    parts, depth, current = [], 0, []
    for char in text:
        if char in "[{(":
            depth += 1
        elif char in "]})":
            depth = max(depth - 1, 0)
        if char == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse_method(text: str) -> MethodSpec:
    """``cd`` -> preset; ``label:key=value;key=value`` -> preset (if registered) + overrides."""
    label, _, rest = text.partition(":")
    label = label.strip()
    if not _LABEL.match(label) or _SEED_SUFFIX.search(label):
        raise SweepError(f"method label {label!r} must be letters, digits, '-', '_', '.', '+' and must not end in -seedN")
    extras = _split_top_level(rest, ";") if rest else []
    for item in extras:
        cfg.parse_override(item)  # raises ConfigError on a malformed item
    known = presets()
    if label not in known and not extras:
        raise SweepError(
            f"unknown method {label!r}; registered: {', '.join(known)}; "
            f"or define one as LABEL:key=value;key=value (e.g. cd-clean:method.name=cd;method.selection=clean)"
        )
    return MethodSpec(label, list(known.get(label, [])) + extras)


def parse_methods(methods: str | Sequence[str]) -> list[MethodSpec]:
    items = _split_top_level(methods, ",") if isinstance(methods, str) else [str(m) for m in methods]
    if not items:
        raise SweepError("no method given; e.g. --methods independent,dml,cd")
    specs = [parse_method(item) for item in items]
    labels = [s.label for s in specs]
    dupes = sorted({l for l in labels if labels.count(l) > 1})
    if dupes:
        raise SweepError(f"method label(s) {dupes} given twice; give variants their own label, e.g. cd-every10:perturb.every=10")
    return specs


def parse_seeds(seeds: str | int | Sequence[int]) -> list[int]:
    if isinstance(seeds, int):
        return [seeds]
    items = [s.strip() for s in seeds.split(",") if s.strip()] if isinstance(seeds, str) else list(seeds)
    try:
        values = [int(s) for s in items]
    except (TypeError, ValueError):
        raise SweepError(f"seeds must be integers, e.g. --seeds 0,1,2 (got {seeds!r})") from None
    if not values:
        raise SweepError("no seed given; e.g. --seeds 0,1,2")
    if len(set(values)) != len(values):
        raise SweepError(f"seed given twice in {values}")
    return values


# ----------------------------------------------------------------------------- config comparison
def config_difference(saved: dict[str, Any], planned: dict[str, Any]) -> str | None:
    """First setting (other than paths, logging and speed knobs) that differs, as one phrase."""
    a, b = cfg.flatten(saved), cfg.flatten(planned)
    ignored = cfg.marked_keys("bookkeeping")
    for key in sorted(set(a) | set(b)):
        if key in ignored:
            continue
        if a.get(key) != b.get(key):
            return f"{key} is {a.get(key)!r} there but {b.get(key)!r} in this sweep"
    return None


def _stored_config(run_dir: Path) -> dict[str, Any] | None:
    if is_finished(run_dir):
        try:
            return run_folders.read_config(run_dir)
        except run_folders.DamagedFile:
            return None
    path = folder.config_path(run_dir)  # (not the parameters named config_path below: the sweep's own config file)
    if path.is_file():
        try:
            return cfg.to_dict(cfg.load(path))
        except cfg.ConfigError:
            return None
    return None


# ----------------------------------------------------------------------------- the sweep
def plan_sweep(config_path: str | Path | None, overrides: Sequence[str] | None, methods: str | Sequence[str],
               seeds: str | Sequence[int], out: str | Path | None = None) -> tuple[Path, list[RunPlan]]:
    """Validate every run's config up front (a typo fails before anything trains)."""
    overrides = list(overrides or [])
    base = cfg.load(config_path, overrides)
    specs, seed_list = parse_methods(methods), parse_seeds(seeds)
    exp_dir = Path(out) if out else Path(base.output) / f"{base.name}-sweep"
    plans = []
    # Seed-major order: an interrupted sweep leaves every method with the same number of seeds.
    for seed in seed_list:
        for spec in specs:
            name = f"{spec.label}-seed{seed}"
            try:
                config = cfg.load(config_path, overrides + spec.overrides + [f"seed={seed}", f"name='{name}'"])
            except cfg.ConfigError as error:
                raise cfg.ConfigError(f"method {spec.label}: {error}") from None
            plans.append(RunPlan(spec.label, seed, exp_dir / name, config))
    return exp_dir, plans


def _write_index(exp_dir: Path, config_path, overrides, specs: list[MethodSpec], seeds: list[int], plans: list[RunPlan]) -> None:
    """Write the index; runs and methods of earlier sweeps into the same directory are kept (a damaged old
    index is replaced by this sweep's, with a warning)."""
    path = sweep_index_path(exp_dir)
    old = SweepIndex()
    if path.is_file():
        try:
            old = run_folders.validate(path, SweepIndex, run_folders.read_json(path))
        except run_folders.DamagedFile as error:
            log.warning("kdarena: warning: %s; it is rewritten from this sweep's runs", error)
    previous = {(r.label, r.seed): r for r in old.runs}
    runs = {}  # this sweep's runs first, then older ones
    for p in plans:
        run = p.record()
        kept = previous.get((p.label, p.seed)) if p.status in ("pending", "skipped") else None
        if kept is not None:  # a run not (yet) trained by this sweep keeps where and how long it last trained
            run = run.model_copy(update={"seconds": kept.seconds, "node": kept.node or run.node, "gpu": kept.gpu or run.gpu})
        runs[(p.label, p.seed)] = run
    for key, r in previous.items():
        runs.setdefault(key, r)
    methods = {s.label: SweepMethod(label=s.label, overrides=s.overrides) for s in specs}
    for m in old.methods:
        methods.setdefault(m.label, m)
    index = SweepIndex(config=None if config_path is None else str(config_path), overrides=list(overrides or []),
                       methods=list(methods.values()), seeds=sorted(set(old.seeds) | set(seeds)), runs=list(runs.values()))
    write_json(path, index.as_written())


def run_sweep(config_path: str | Path | None, overrides: Sequence[str] | None = None,
              methods: str | Sequence[str] = "independent,dml,cd", seeds: str | Sequence[int] = "0,1,2",
              out: str | Path | None = None, jobs: int = 1, engine: str = "local", address: str | None = None,
              gpus_per_run: float | None = None) -> list[dict[str, Any]]:
    """Run every method x seed into one experiment directory; returns the index's run records.

    The plan (which runs, skipped / resumed / restarted, the index, the lines printed) is made here;
    ``engine`` only says where each run trains (:func:`~kdarena.experiments.engines.make_engine`). ``jobs > 1`` trains that many
    runs at once in separate processes; results are the same as one by one, and as on Ray.
    """
    from tqdm.auto import tqdm

    from ..engine.distributed import from_environment
    from ..progress import progress_bar

    executor = make_engine(engine, jobs, address, gpus_per_run)
    exp_dir, plans = plan_sweep(config_path, overrides, methods, seeds, out)
    specs, seed_list = parse_methods(methods), parse_seeds(seeds)
    info = from_environment()
    if info.enabled and (jobs > 1 or engine != "local"):
        raise SweepError("--jobs > 1 and --engine ray run single-process runs; do not start them with torchrun")
    main = info.is_main  # under torchrun every rank runs the sweep; rank 0 writes and prints

    def index() -> None:
        if main:
            _write_index(exp_dir, config_path, overrides, specs, seed_list, plans)

    def say(text: str) -> None:
        if main:
            tqdm.write(text, file=sys.stdout)  # above the progress bar

    # Refuse stale runs before training anything.
    for plan in plans:
        stored = _stored_config(plan.run_dir) if plan.run_dir.exists() else None
        if stored is not None:
            diff = config_difference(stored, cfg.to_dict(plan.config))
            if diff:
                raise SweepError(f"{plan.run_dir} was made with another config ({diff}); "
                                 f"choose another --out or move that run away")
    held = None
    if main:
        exp_dir.mkdir(parents=True, exist_ok=True)
        # One sweep per --out: a second driver is refused at once (two drivers both exited 2, and sweep.json
        # called the other's finished runs failed). Released in the finally below, or by the kernel on exit.
        held = lock(exp_dir)
    index()
    total = len(plans)
    todo: dict[str, RunPlan] = {}
    done = [0]  # runs finished so far, the [k/total] of each line: Ray finishes runs in any order ([2/2] came before [1/2])
    for plan in plans:
        if is_finished(plan.run_dir):
            plan.status = "skipped"
            try:
                note = run_folders.read_summary(plan.run_dir).accuracy_note()
            except run_folders.DamagedFile:
                note = ""
            done[0] += 1
            say(f"[{done[0]}/{total}] {plan.name}: skipped (finished){note}")
            index()
            continue
        if next_action(plan.run_dir) == "restarted":
            log.warning("%s holds an unfinished run without a checkpoint; it is moved aside and started afresh", plan.run_dir)
        executor.prepare(plan.config)
        todo[plan.name] = plan

    # a bar on a terminal, else a line every few seconds (the runs' own progress lines come from their trainers)
    bar = progress_bar(total, "sweep", total - len(todo), "runs") if main and todo else tqdm(disable=True)

    def finish(name: str, outcome: dict[str, Any]) -> None:
        plan = todo[name]
        if outcome.get("started") is False:  # the sweep stopped before this run began: it stays pending
            index()
            return
        done[0] += 1
        head = f"[{done[0]}/{total}] {name}:"
        plan.seconds, plan.node, plan.gpu = outcome.get("seconds", 0.0), outcome.get("node"), outcome.get("gpu")
        if "interrupted" in outcome:  # it checkpointed first; the local engine stops the sweep here, Ray goes on
            plan.status, plan.error = "interrupted", outcome["interrupted"]
            say(f"{head} interrupted; run the same sweep again to resume")
        elif "error" in outcome:  # one failed run must not cost the others
            plan.status, plan.error = "failed", outcome["error"]
            log.error("%s failed: %s%s", name, plan.error, "\n" + outcome["traceback"].rstrip() if "traceback" in outcome else "")
            say(f"{head} FAILED ({plan.error})")
        else:
            summary, action = outcome["summary"], outcome["action"]
            plan.status = action if summary.get("networks") else ("stopped" if "stopped_at_step" in summary else action)
            where = f" on {outcome['node_ip']} ({plan.node[:12]})" if outcome.get("node_ip") else ""
            note = Summary.model_validate(summary).accuracy_note() if summary.get("networks") else ""
            say(f"{head} {plan.status} in {plan.seconds:.1f} s{where}{note}")
        bar.update(1)
        index()

    try:
        executor.run(exp_dir, [(name, plan.config, plan.run_dir) for name, plan in todo.items()], finish)
    except KeyboardInterrupt:  # a run that never started stays pending (it was called interrupted)
        index()
        say(f"sweep interrupted; the same command again skips the finished runs and resumes the others ({exp_dir})")
        raise
    finally:
        bar.close()
        if held is not None:
            held.close()
    failed = [p for p in plans if p.status == "failed"]
    stopped = sum(p.status == "interrupted" for p in plans)
    again = f"; {stopped} interrupted (the same command again resumes them)" if stopped else ""
    say(f"sweep: {total - len(failed) - stopped}/{total} runs ok in {exp_dir}{again}; tables: kdarena report {exp_dir}")
    if failed:
        raise SweepError(f"{len(failed)} of {total} runs failed: "
                         + "; ".join(f"{p.name} ({p.error})" for p in failed) + f"; see {sweep_index_path(exp_dir)}")
    return [p.record().model_dump(exclude_none=True) for p in plans]
