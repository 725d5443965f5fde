"""Command line: ``kdarena train | eval | export | predict | models | methods | sweep | tune | confirm | report | plot | data``.

Bad input exits with status 2 and a one-line message; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
import warnings
from pathlib import Path

from .errors import UserError
from .version import __version__



def _one_line(error: BaseException) -> str:
    """The message on one line (multi-line messages, e.g. 'Searched: ...' lists, are joined).

    An error re-raised from a DataLoader worker carries the worker's traceback: keep its last line.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        name, sep, rest = lines[-1].partition(": ")
        lines = [rest if sep and all(part.isidentifier() for part in name.split(".")) else lines[-1]]
    return " ".join(lines) or type(error).__name__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdarena", description="Competitive distillation and its baselines for groups of networks.")
    parser.add_argument("--version", action="version", version=f"kdarena {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser("train", help="train a group from a YAML config")
    train.add_argument("config", nargs="?", help="YAML config (optional with --resume)")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=0.05 method.name=dml")
    train.add_argument("--out", help="run directory (default: OUTPUT/NAME from the config)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    train.add_argument("--force", action="store_true", help="move an existing run directory aside instead of refusing")
    train.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    ev = sub.add_parser("eval", help="evaluate every network of a checkpoint")
    ev.add_argument("checkpoint", help="a checkpoint file, e.g. RUN/checkpoints/best.pt or last.pt")
    ev.add_argument("--split", choices=["test", "val"], default="test")
    ev.add_argument("overrides", nargs="*", help="key=value overrides (e.g. data.root=...)")
    ev.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    export = sub.add_parser("export", help="one network (or the ensemble) of a run as safetensors, TorchScript or ONNX, with a model card")
    export.add_argument("run_dir", help="a run folder written by kdarena train")
    export.add_argument("--out", required=True, help="the file to write (FILE.card.json and FILE.card.md go beside it)")
    export.add_argument("--network", default="best", help="best (highest validation top-1), ensemble, or an index (default: best)")
    export.add_argument("--checkpoint", choices=["best", "last"], default="best", help="the weights of the best-validation or the last epoch")
    export.add_argument("--format", choices=["safetensors", "torchscript", "onnx"], help="default: from the suffix of --out")
    export.add_argument("overrides", nargs="*", help="key=value overrides of the run's config (e.g. data.root=...)")
    export.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    predict = sub.add_parser("predict", help="classify images with an exported network or a run; accuracy on labelled ones")
    predict.add_argument("model", help="a safetensors file from kdarena export, or a run folder")
    predict.add_argument("inputs", nargs="+", help="image files, folders or .tar/.tar.gz/.zip archives; with a run folder, "
                         "key=value overrides of its config too (data.root=... for a run whose data moved)")
    predict.add_argument("--top-k", type=int, default=5, help="classes shown per image")
    predict.add_argument("--format", choices=["table", "json", "csv"], default="table", help="table (default), or one record per image")
    predict.add_argument("--batch-size", type=int, default=None, help="default: the run's data.eval_batch_size")
    predict.add_argument("--workers", type=int, default=1, help="decode processes")
    predict.add_argument("--cache-max-gb", type=float, default=None, help="memory an input archive's bytes may take, GB (default 1; a folder is streamed)")
    predict.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"],
                         help="default: fp32 for an exported file (as onnxruntime runs it); a run folder's train.precision, as kdarena eval")
    predict.add_argument("--network", default="best", help="with a run folder: best, ensemble or an index")
    predict.add_argument("--checkpoint", choices=["best", "last"], default="best", help="with a run folder")
    predict.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    sub.add_parser("models", help="list the registered models")
    sub.add_parser("methods", help="list the registered methods with their papers, options and sweep presets")

    sweep = sub.add_parser("sweep", help="run methods x seeds into one experiment directory")
    sweep.add_argument("config", help="YAML config every run starts from")
    sweep.add_argument("overrides", nargs="*", help="key=value overrides for every run, e.g. optim.epochs=30")
    sweep.add_argument("--methods", default="independent,dml,cd", help="comma-separated; a name may carry overrides: cd:perturb.every=10")
    sweep.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, each run with every method (default 0,1,2)")
    sweep.add_argument("--out", help="experiment directory (default: OUTPUT/NAME-sweep); with --engine ray a folder every node sees")
    _engine_options(sweep)

    tune = sub.add_parser("tune", help="tune each method on validation with the same budget (Optuna); writes a plan to confirm")
    tune.add_argument("config", help="YAML config every trial starts from (it must hold a validation split: data.val_size > 0)")
    tune.add_argument("overrides", nargs="*", help="key=value overrides for every trial, e.g. data.val_size=0.1")
    tune.add_argument("--methods", required=True, help="comma-separated methods, each tuned in its own study; a name may carry overrides")
    tune.add_argument("--space", action="append", required=True, metavar="KEY=DIST",
                      help="a method.* or optim.* key and its range: choice(1,4), uniform(0.1,0.9), loguniform(0.01,0.2), int(1,8); repeatable")
    tune.add_argument("--trials", type=int, required=True, help="trials per method (the same for every method)")
    tune.add_argument("--epochs", type=int, help="epochs of every trial (default: the config's optim.epochs)")
    tune.add_argument("--objective", choices=["last", "best"], default="last",
                      help="a trial's value: validation top-1 (mean over the networks) at the last epoch (default) or at each network's best epoch")
    tune.add_argument("--pruner", choices=["median", "halving", "none"], default="median",
                      help="stop hopeless trials on their per-epoch validation top-1: median (default), halving (successive halving), none")
    tune.add_argument("--seed", type=int, help="the samplers' seed (default: the config's seed)")
    tune.add_argument("--at-once", type=int, help="trials of each method trained at the same time (default: --jobs / methods, at least 1)")
    tune.add_argument("--out", required=True, help="the tuning folder: studies, trials, table, plots, plan.yaml; the same command continues it")
    _engine_options(tune)

    confirm = sub.add_parser("confirm", help="run a tuned plan on fresh seeds; paired differences with corrected intervals")
    confirm.add_argument("plan", help="a plan from kdarena tune (DIR/plan.yaml); frozen by its sha256 while it is confirmed")
    confirm.add_argument("--seeds", required=True, help="fresh seeds, none used in tuning: 100-109, or 0,1,2")
    confirm.add_argument("--baseline", help="a method of the plan every other one is compared with (default: every pair)")
    confirm.add_argument("--out", help="where the runs and confirm.md go (default: confirm/ beside the plan)")
    _engine_options(confirm)

    report = sub.add_parser("report", help="tables of mean +- std over seeds from experiment directories")
    report.add_argument("dirs", nargs="+", help="experiment directories (from kdarena sweep) or folders of runs")
    report.add_argument("--out", help="where to write report.md and report.csv (default: the first directory)")
    report.add_argument("--best-on-test", action="store_true", help="also report the best test accuracy (selected on test; labelled so)")
    report.add_argument("--baseline", default=None,
                        help="comma-separated methods every other method is compared with, seed by seed (paired 95%% intervals); "
                             "a named method without runs is an error (exit 2). Default: independent,dml, each only if it has runs")
    report.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    plot = sub.add_parser("plot", help="PNG plots of a run or an experiment directory")
    plot.add_argument("path", help="a run folder or an experiment directory")
    plot.add_argument("--out", help="folder for the PNGs (default: PATH/plots)")
    plot.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    data = sub.add_parser("data", help="look at a data set (kdarena data inspect ROOT) or the decoded-image cache (kdarena data cache)")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    inspect = data_sub.add_parser("inspect", help="classes, counts, size, mean/std, cache; a PNG grid of samples per class")
    inspect.add_argument("root", help="a folder or .tar/.tar.gz/.zip of train/ and val/ (or test/) class folders")
    # the names live in kdarena.data.registry, checked in _cmd_data: importing it here would load torch for --help
    inspect.add_argument("--name", default="imagefolder", help="the image-set loader that reads ROOT (default: imagefolder)")
    inspect.add_argument("--image-size", type=int, default=None, help="resize on decode (default: the images' own size up to 64 px)")
    inspect.add_argument("--out", help="PNG of sample images (default: NAME-samples.png here)")
    inspect.add_argument("--workers", type=int, default=2, help="decode processes")
    inspect.add_argument("--cache-max-gb", type=float, default=4.0)
    inspect.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    cache = data_sub.add_parser("cache", help="list the decoded-image cache (default) or prune its stale entries")
    cache.add_argument("--list", action="store_true", help="each entry: size on disk, images, source, stale or not (the default)")
    cache.add_argument("--prune", action="store_true", help="remove stale entries: damaged, or their source gone or changed")
    cache.add_argument("--all", action="store_true", help="with --prune: remove every entry")
    cache.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return parser


def _engine_options(parser: argparse.ArgumentParser) -> None:
    """Where the runs of a sweep, a tuning or a confirmation train (the registry kdarena.experiments.engines)."""
    from .experiments import engines

    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once in separate processes (each gets cores/jobs threads "
                        "unless train.threads is set); several small runs fill a GPU")
    parser.add_argument("--engine", choices=engines.names(), default="local",
                        help="where the runs train: local (this machine, --jobs at once) or ray (a Ray cluster; pip install 'kdarena[ray]')")
    parser.add_argument("--address", help="--engine ray: the cluster to join (auto, HOST:PORT, ray://HOST:10001); default: Ray embedded here")
    parser.add_argument("--gpus-per-run", type=float, help="--engine ray: GPUs each run asks for (0.25: four runs share a GPU); default 1 for a CUDA run")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")


def _cmd_train(args) -> int:
    from . import config as cfg
    from .records.folder import RunDirError, config_path
    from .trainer import Interrupted, train

    if args.resume:
        run_dir = Path(args.resume)
        base = config_path(run_dir)
        overrides = ([args.config] if args.config and "=" in args.config else []) + list(args.overrides)
        if args.config and "=" not in args.config and Path(args.config).resolve() != base.resolve():
            logging.getLogger("kdarena").info("resuming with the run's own config.yaml; %s is not used", args.config)
        if not base.is_file():

            raise RunDirError(f"cannot resume: {run_dir} holds no run (no config.yaml)")
        config = cfg.load(base, overrides)
    else:
        if not args.config:
            raise cfg.ConfigError("kdarena train needs a CONFIG file (e.g. configs/quickstart.yaml) or --resume RUN_DIR")
        config = cfg.load(args.config, args.overrides)
        run_dir = Path(args.out) if args.out else None
    try:
        summary = train(config, run_dir=run_dir, resume=bool(args.resume), force=args.force)
    except Interrupted as stop:
        print(f"kdarena: {stop}", file=sys.stderr)
        return 128 + stop.signum
    if summary.get("networks"):
        from .records.summary import Summary

        print(Summary.model_validate(summary).table())
    return 0


def _cmd_eval(args) -> int:
    from .engine.evaluation_cli import evaluate_checkpoint

    results = evaluate_checkpoint(args.checkpoint, args.split, args.overrides)
    for key, value in results.items():
        print(f"{key:<24} {value:8.2f}" if isinstance(value, float) else f"{key:<24} {value}")
    return 0


def _cmd_export(args) -> int:
    from .deploy.card import card_paths
    from .deploy.export import export_run

    card = export_run(args.run_dir, args.out, args.network, args.checkpoint, args.format, args.overrides)
    print(f"{args.out}: {card['network']} ({' + '.join(card['architecture'])}) as {card['format']}, sha256 {card['sha256']}")
    print(f"model card: {card_paths(args.out)[0]} and {card_paths(args.out)[1]}")
    return 0


def _cmd_predict(args) -> int:
    from .deploy.predict import predict, render, summary_line

    from .config import Config

    # data.root=... among the inputs is an override of the run's config, not an image
    is_override = re.compile(rf"^({'|'.join(Config.model_fields)})\.[\w.]+=").match
    overrides = [token for token in args.inputs if is_override(token)]
    inputs = [token for token in args.inputs if not is_override(token)]
    result = predict(args.model, inputs, args.top_k, args.batch_size, args.workers, args.network,
                     args.checkpoint, args.precision, max_archive_gb=args.cache_max_gb, overrides=overrides)
    for note in result.notes:
        print(note, file=sys.stderr)
    print(render(result, args.format))
    if args.format == "csv":
        print(summary_line(result), file=sys.stderr)
    return 0


def _cmd_models(args) -> int:
    from . import models

    for name in models.available():
        print(name)
    print("timm:NAME  (any timm model, with pip install 'kdarena[timm]')")
    return 0


def _cmd_methods(args) -> int:
    from .methods import registry

    for name in registry.names():
        method = registry.get(name)
        print(f"{name}: {method.label}")
        if method.paper:
            print(f"    paper:   {method.paper}")
        options = []
        for key, field in method.Params.model_fields.items():
            if key == "name":
                continue
            default = "required" if field.is_required() else repr(field.default)
            options.append(f"{key}={default}")
        print(f"    options: {', '.join(options) or '-'}")
        if method.presets:
            print(f"    presets: {', '.join(method.presets)}")
    return 0


def _cmd_sweep(args) -> int:
    from .experiments.sweep import run_sweep

    run_sweep(args.config, args.overrides, args.methods, args.seeds, args.out, jobs=args.jobs, engine=args.engine,
              address=args.address, gpus_per_run=args.gpus_per_run)
    return 0


def _cmd_tune(args) -> int:
    from .experiments.tune import import_optuna, tune

    optuna = import_optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # kdarena prints one line a trial
    print(tune(args.config, args.overrides, args.methods, args.space, args.trials, args.out, epochs=args.epochs,
               objective=args.objective, pruner=args.pruner, seed=args.seed, jobs=args.jobs, engine=args.engine,
               address=args.address, gpus_per_run=args.gpus_per_run, at_once=args.at_once))
    return 0


def _cmd_confirm(args) -> int:
    from .experiments.confirm import confirm

    print(confirm(args.plan, args.seeds, args.baseline, args.out, jobs=args.jobs, engine=args.engine, address=args.address,
                  gpus_per_run=args.gpus_per_run))
    return 0


def _cmd_report(args) -> int:
    from .experiments.report import write_report

    baselines = None if args.baseline is None else [b.strip() for b in args.baseline.split(",") if b.strip()]
    print(write_report(args.dirs, args.out, best_on_test=args.best_on_test, baselines=baselines))
    return 0


def _cmd_plot(args) -> int:
    from .experiments.plot import plot_path

    for path in plot_path(args.path, args.out):
        print(path)
    return 0


def _cmd_data(args) -> int:
    if args.data_command == "cache":
        from .data import cache_admin

        removed = args.prune or args.all
        print(cache_admin.report(cache_admin.prune(args.all) if removed else cache_admin.entries(), removed=removed))
        return 0
    from .data.inspect import inspect_images
    from .data.registry import IMAGE_SETS

    if args.name not in IMAGE_SETS:
        raise UserError(f"--name {args.name!r} names no image-set loader; give one of {', '.join(IMAGE_SETS)}")
    text, _ = inspect_images(args.root, args.name, args.image_size, args.out, workers=args.workers, cache_max_gb=args.cache_max_gb)
    print(text)
    return 0


COMMANDS = {"train": _cmd_train, "eval": _cmd_eval, "export": _cmd_export, "predict": _cmd_predict, "models": _cmd_models, "methods": _cmd_methods, "sweep": _cmd_sweep, "tune": _cmd_tune, "confirm": _cmd_confirm, "report": _cmd_report, "plot": _cmd_plot, "data": _cmd_data}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # key=value overrides may come after options (`train CONFIG --out DIR optim.lr=0.1`), which
    # argparse leaves unparsed: collect them into the overrides list.
    args, extra = parser.parse_known_args(argv)
    stray = [token for token in extra if "=" not in token or token.startswith("-")]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides or []) + extra
    if not args.command:
        parser.print_help()
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    warnings.formatwarning = lambda message, *_, **__: f"kdarena: warning: {message}\n"  # one line, not the source line
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("kdarena: interrupted", file=sys.stderr)
        return 130
    except UserError as error:  # bad input: one line; anything else is a bug of ours and keeps its traceback
        if args.debug:
            raise
        print(f"kdarena: error: {_one_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
