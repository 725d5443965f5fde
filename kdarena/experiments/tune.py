"""Tune each method on validation with the same budget (``kdarena tune``), then confirm (``kdarena confirm``).

``kdarena tune CONFIG [key=value ...] --methods A,B --space KEY=DIST ... --trials N [--epochs E] --out DIR``

* Each method has its own Optuna study (TPE sampler, seeded) and the same budget: ``N`` trials of ``E``
  epochs (``optim.epochs`` of the config without ``--epochs``), on the same space (:mod:`.tune_space`).
* A trial's value is the validation top-1, mean over the group's networks, at the last epoch (``--objective
  last``) or at each network's best epoch (``best``). Test accuracy is never read; a config without a
  validation split is refused before anything trains.
* Hopeless trials are pruned on their per-epoch validation top-1 (Optuna's median pruner, or successive
  halving): the tuner reads each running trial's epoch records as they are written, and a pruned run is
  stopped through its folder (:data:`~.run_task.STOP_EARLY_FILE`), so the budget goes to promising trials.
* Trials train through the sweep's engines (``--jobs`` locally, ``--engine ray``): a trial is a run folder
  like any other, ``DIR/trials/<method>-trial<k>``.
* The studies live in ``DIR/study.journal`` (Optuna's journal file). The same command continues an
  interrupted tuning: a finished trial is never run again, a trial cut short resumes from its checkpoint
  with its parameters, and only the missing trials are asked for. Each trial's parameters depend only on
  the seed and the trials before it, so an interrupted tuning asks for what an uninterrupted one would.
* It writes ``DIR/tune.md`` (per method: trials, the best value, its parameters), Optuna's plots
  (``DIR/plots``: optimisation history, parameter importances) and ``DIR/plan.yaml``: each method at its
  tuned best, for ``kdarena confirm`` on fresh seeds.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from .. import config as cfg
from ..records.epoch import is_before_training
from ..records.folder import atomic_write_text, is_finished, read_metrics
from ..errors import MissingExtraError, UserError
from .run_task import STOP_EARLY_FILE
from .stats import mean
from .sweep import MethodSpec, config_difference, make_engine, parse_methods
from .tune_results import TABLE, write_results
from .tune_space import corners, describe, overrides, params_text, parse_space


OBJECTIVES = ("last", "best")
PRUNERS = ("median", "halving", "none")
JOURNAL = "study.journal"
LOCK = "tune.lock"
#: seconds between the tuner's looks at its running trials' epoch records
POLL_S = 0.5


class TuneError(UserError):
    """A tuning cannot run as asked (no validation split, another setup in DIR, ...); the message says why."""


def import_optuna():
    try:
        import optuna
    except ImportError as error:
        raise MissingExtraError(f"kdarena tune needs Optuna: pip install 'kdarena[tune]' ({error})") from None
    return optuna


# ----------------------------------------------------------------------------- reading a trial
def validation_top1(records: Sequence[dict[str, Any]], networks: int) -> list[tuple[int, list[float]]]:
    """``(epoch, [validation top-1 of net0, net1, ...])`` of every evaluated epoch of a group of ``networks``.
    Only ``net{i}/val_top1`` is read: the test split never decides anything here."""
    keys = [f"net{i}/val_top1" for i in range(networks)]
    out = []
    for record in records:
        values = [record.get(key) for key in keys]
        if not is_before_training(record) and isinstance(record.get("epoch"), int) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out.append((record["epoch"], [float(v) for v in values]))
    return out


def validation_curve(records: Sequence[dict[str, Any]], networks: int) -> list[tuple[int, float]]:
    """``(epoch, validation top-1 mean over the group's networks)``: what the pruner sees, epoch by epoch."""
    return [(epoch, mean(values)) for epoch, values in validation_top1(records, networks)]


def objective_value(records: Sequence[dict[str, Any]], networks: int, objective: str) -> float | None:
    """A trial's value, mean over the group's networks: each network's validation top-1 at the last epoch (``last``)
    or at its own best epoch (``best``, the epoch whose test accuracy a run reports as '@ best val'); None when
    no epoch was evaluated on a validation split."""
    epochs = validation_top1(records, networks)
    if not epochs:
        return None
    if objective == "last":
        return mean(epochs[-1][1])
    return mean([max(values[i] for _, values in epochs) for i in range(networks)])


# ----------------------------------------------------------------------------- the tuning
@dataclass
class _Trial:
    """A trial in flight: its Optuna handle, run folder and config, and the epochs already reported."""

    label: str
    trial: Any  # optuna.trial.Trial
    params: dict[str, Any]
    run_dir: Path
    config: cfg.Config
    reported: set[int] = field(default_factory=set)
    stop_asked: bool = False
    done: bool = False

    @property
    def name(self) -> str:
        return self.run_dir.name


@dataclass
class Tuning:
    """One ``kdarena tune``: what it was asked, checked before anything trains."""

    config_path: str | Path | None
    overrides: list[str]
    specs: list[MethodSpec]
    space: dict[str, Any]
    trials: int
    out: Path
    objective: str = "last"
    pruner: str = "median"
    seed: int = 0
    base: cfg.Config | None = None

    def trial_config(self, spec: MethodSpec, params: dict[str, Any], name: str) -> cfg.Config:
        """The base config, then the method (preset and extras), then the trial's parameters."""
        try:
            return cfg.load(self.config_path, self.overrides + spec.overrides + overrides(params) + [f"name='{name}'"])
        except cfg.ConfigError as error:
            raise cfg.ConfigError(f"method {spec.label}: {error}") from None

    def setup(self, spec: MethodSpec) -> dict[str, Any]:
        """What makes a study this study: stored with it, compared when the same DIR is tuned again."""
        return {"config": cfg.to_dict(self.base), "method": spec.overrides, "space": describe(self.space),
                "objective": self.objective, "pruner": self.pruner, "seed": self.seed}


def plan_tuning(config_path: str | Path | None, overrides: Sequence[str] | None, methods: str | Sequence[str],
                space: Sequence[str], trials: int, out: str | Path, epochs: int | None = None, objective: str = "last",
                pruner: str = "median", seed: int | None = None) -> Tuning:
    """Check everything that can be checked before a trial trains: the options, the validation split, and each
    method's config at the corners of the space (a typo, or a key a method does not have, fails here)."""
    if trials < 1:
        raise TuneError(f"--trials must be >= 1, got {trials}")
    if epochs is not None and epochs < 1:
        raise TuneError(f"--epochs must be >= 1, got {epochs}")
    if objective not in OBJECTIVES:
        raise TuneError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if pruner not in PRUNERS:
        raise TuneError(f"--pruner must be one of {', '.join(PRUNERS)}, got {pruner!r}")
    import_optuna()
    specs, parsed = parse_methods(methods), parse_space(space)
    base_overrides = list(overrides or []) + ([f"optim.epochs={epochs}"] if epochs is not None else [])
    base = cfg.load(config_path, base_overrides)
    if not base.data.val_size:
        raise TuneError("tuning reads validation accuracy only, and this config has no validation split (data.val_size=0); "
                        "hold part of the training data out, e.g. data.val_size=0.1")
    tuning = Tuning(config_path, base_overrides, specs, parsed, trials, Path(out), objective, pruner,
                    base.seed if seed is None else seed, base)
    for spec in specs:
        for key, distribution in parsed.items():
            for value in corners(distribution):
                tuning.trial_config(spec, {key: value}, f"{spec.label}-check")
    return tuning


def tune(config_path: str | Path | None, overrides: Sequence[str] | None, methods: str | Sequence[str], space: Sequence[str],
         trials: int, out: str | Path, epochs: int | None = None, objective: str = "last", pruner: str = "median",
         seed: int | None = None, jobs: int = 1, engine: str = "local", address: str | None = None,
         gpus_per_run: float | None = None, at_once: int | None = None) -> str:
    """Tune every method (see the module's docstring); returns the table also written to ``DIR/tune.md``.

    ``at_once``: trials of each method trained at the same time (default: ``jobs`` shared by the methods,
    at least one). Trials asked together do not see each other's results, so fewer at once tune better.
    """
    tuning = plan_tuning(config_path, overrides, methods, space, trials, out, epochs, objective, pruner, seed)
    executor = make_engine(engine, jobs, address, gpus_per_run)
    if at_once is not None and at_once < 1:
        raise TuneError(f"--at-once must be >= 1, got {at_once}")
    per_round = at_once or max(1, jobs // len(tuning.specs))
    tuning.out.mkdir(parents=True, exist_ok=True)
    with _only_tuner(tuning.out):
        studies = {spec.label: _study(tuning, spec) for spec in tuning.specs}
        for label, study in studies.items():
            if study.trials:
                done = sum(t.state.is_finished() for t in study.trials)
                print(f"{label}: {done} of {trials} trials done in {tuning.out}", flush=True)
        runner = _Runner(tuning, studies, executor)
        try:
            while runner.round(per_round):
                pass
        except KeyboardInterrupt:
            print(f"tuning interrupted; the same command again resumes the unfinished trials and runs the rest ({tuning.out})")
            raise
        text, missing = write_results(tuning, studies)
    if missing:
        raise TuneError(f"no trial of {', '.join(missing)} finished (see {tuning.out / TABLE}); the plan is not written")
    return text


@contextmanager
def _only_tuner(out: Path) -> Iterator[None]:
    """One tuner per DIR at a time (two would run the same unfinished trial twice): a lock file, held while tuning."""
    import fcntl

    with open(out / LOCK, "a") as handle:  # closing it releases the lock
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise TuneError(f"another kdarena tune is running in {out}; wait for it, or tune into another --out") from None
        yield


def storage(out: Path):
    """The studies of the tuning folder ``out``: Optuna's journal file ``out/study.journal`` (a file beside the
    trials, so the folder is the whole tuning, on any shared file system a Ray cluster writes its runs to)."""
    import_optuna()
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(Path(out) / JOURNAL)))


def _study(tuning: Tuning, spec: MethodSpec):
    """The method's study in DIR's journal, created on the first run; a study made with another setup is refused."""
    optuna = import_optuna()
    pruner = {"median": optuna.pruners.MedianPruner, "halving": optuna.pruners.SuccessiveHalvingPruner,
              "none": optuna.pruners.NopPruner}[tuning.pruner]()
    study = optuna.create_study(study_name=spec.label, storage=storage(tuning.out), direction="maximize", pruner=pruner,
                                load_if_exists=True)
    setup, saved = tuning.setup(spec), study.user_attrs.get("setup")
    if saved is None:
        study.set_user_attr("setup", setup)
        return study
    for key in setup:
        if key == "config":
            diff = config_difference(saved.get("config") or {}, setup["config"])
        else:
            diff = None if saved.get(key) == setup[key] else f"{key} is {saved.get(key)!r} there but {setup[key]!r} now"
        if diff:
            raise TuneError(f"{tuning.out} holds a tuning of {spec.label} made with another setup ({diff}); "
                            f"give the same arguments as before to continue it, or another --out")
    return study


class _Runner:
    """Asks each study for its next trials, trains them through the engine, reports their epochs, tells the results."""

    def __init__(self, tuning: Tuning, studies: dict[str, Any], executor):
        self.tuning, self.studies, self.executor = tuning, studies, executor
        self.lock = threading.Lock()  # one thread at a time talks to the studies

    def round(self, per_round: int) -> bool:
        """Train up to ``per_round`` trials of every method that has budget left; False when none has."""
        optuna = import_optuna()
        batch: list[_Trial] = []
        for spec in self.tuning.specs:
            study = self.studies[spec.label]
            # trials left running by an interrupted tuning: resumed first, with their parameters
            stale = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING][:per_round]
            for frozen in stale:  # Optuna's handle of a trial asked by an earlier process is Trial(study, its id)
                batch.append(self._trial(spec, optuna.trial.Trial(study, frozen._trial_id), dict(frozen.params),
                                         set(frozen.intermediate_values)))
            for _ in range(min(per_round - len(stale), self.tuning.trials - len(study.trials))):
                # seeded by the trials before it: a continued tuning asks what an uninterrupted one would
                study.sampler = optuna.samplers.TPESampler(seed=self.tuning.seed + len(study.trials))
                trial = study.ask(self.tuning.space)
                batch.append(self._trial(spec, trial, dict(trial.params), set()))
        if not batch:
            return False
        self._train(batch)
        return True

    def _trial(self, spec: MethodSpec, trial, params: dict[str, Any], reported: set[int]) -> _Trial:
        name = f"{spec.label}-trial{trial.number:03d}"
        run_dir = self.tuning.out / "trials" / name
        item = _Trial(spec.label, trial, params, run_dir, self.tuning.trial_config(spec, params, name), reported)
        self.executor.prepare(item.config)
        return item

    def _train(self, batch: list[_Trial]) -> None:
        for item in batch:
            if is_finished(item.run_dir):  # it finished, but the tuning stopped before it was told
                self._finish(item, {"summary": {}, "action": "skipped"})
        batch = [item for item in batch if not item.done]
        if not batch:
            return
        by_name = {item.name: item for item in batch}
        finished = threading.Event()
        watcher = threading.Thread(target=self._watch, args=(batch, finished), daemon=True)
        watcher.start()
        try:
            self.executor.run(self.tuning.out, [(item.name, item.config, item.run_dir) for item in batch],
                              lambda name, outcome: self._finish(by_name[name], outcome))
        finally:
            finished.set()
            watcher.join()
        if any(not item.done for item in batch):  # some were interrupted (the Ray engine goes on after one)
            raise KeyboardInterrupt("trials interrupted")

    def _watch(self, batch: list[_Trial], finished: threading.Event) -> None:
        while not finished.wait(POLL_S):
            for item in batch:
                if not item.done and not item.stop_asked:
                    self._report(item)

    def _report(self, item: _Trial) -> None:
        """Report the trial's new evaluated epochs; stop its run through its folder once the pruner gives up on it."""
        new = [(epoch, value) for epoch, value in validation_curve(read_metrics(item.run_dir), len(item.config.models))
               if epoch not in item.reported]
        if not new:
            return
        with self.lock:
            if item.done:
                return
            for epoch, value in new:
                item.trial.report(value, epoch)
                item.reported.add(epoch)
            if self.tuning.pruner != "none" and item.trial.should_prune():
                item.stop_asked = True
                atomic_write_text(item.run_dir / STOP_EARLY_FILE, f"pruned after epoch {max(item.reported) + 1}\n")

    def _finish(self, item: _Trial, outcome: dict[str, Any]) -> None:
        optuna = import_optuna()
        state = optuna.trial.TrialState
        study = self.studies[item.label]
        head = f"[{item.label} {item.trial.number + 1}/{self.tuning.trials}] {item.name} ({params_text(item.params)}):"
        if "interrupted" in outcome:
            print(f"{head} interrupted", flush=True)
            return
        with self.lock:
            item.done = True
            if "summary" in outcome:
                value = objective_value(read_metrics(item.run_dir), len(item.config.models), self.tuning.objective)
                if value is None:
                    item.trial.set_user_attr("error", "the run recorded no validation accuracy")
                    study.tell(item.trial, state=state.FAIL)
                    print(f"{head} FAILED (no validation accuracy in its records)", flush=True)
                    return
                study.tell(item.trial, value)
                print(f"{head} validation top-1 {value:.2f} in {outcome.get('seconds', 0.0):.1f} s", flush=True)
            elif "stopped_early" in outcome:
                study.tell(item.trial, state=state.PRUNED)
                print(f"{head} pruned after epoch {max(item.reported, default=-1) + 1}", flush=True)
            else:
                item.trial.set_user_attr("error", outcome.get("error", "unknown"))
                study.tell(item.trial, state=state.FAIL)
                print(f"{head} FAILED ({outcome.get('error')})", flush=True)
