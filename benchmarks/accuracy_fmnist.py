"""Fashion-MNIST accuracy benchmark: independent vs DML vs competitive distillation, mean ± std over seeds.

Run from the repository root::

    PYTHONPATH=. python benchmarks/accuracy_fmnist.py                  # the benchmark (~40 min on 2 idle CPU cores)
    PYTHONPATH=. python benchmarks/accuracy_fmnist.py --smoke          # 1 seed, 1 epoch (~3 min): a check and a time estimate
    PYTHONPATH=. python benchmarks/accuracy_fmnist.py --epochs 10 --train-subset 60000   # bigger, e.g. on a free machine

Measured (2 cores, lightly loaded, fp32): one 1-epoch run of ResNet-20 x 2 on 15000 training images
(+ evaluation of 5000 val and 10000 test images) takes 31-35 s for every method (~650 training
images/s for the pair, ~8 s of evaluation per epoch), so a 5-epoch run takes ~2.6 min and the
15 runs ~40 min. With other jobs on the machine it was up to 5x slower.

It writes ``CONFIG.yaml`` into the experiment directory (default ``runs/fmnist-accuracy``, or
``runs/fmnist-accuracy-smoke`` with ``--smoke``), then runs ``kdarena sweep`` over the methods
independent, dml, cd (paper rule + paper perturbation pool), cd-code (the authors' released code:
distil from every better peer, their op pool every 10th batch) and cd-noperturb, seeds 0,1,2, then
``kdarena report`` and ``kdarena plot`` on it. Interrupted? Run the same command again: finished runs
are skipped, unfinished ones resume from their last checkpoint.

Setup (everything identical across methods and seeds except the method and the seed):
two CIFAR-style ResNet-20s on 28x28 grey images; data.train_subset samples of the 60k training
images (default 20000), of which data.val_size=5000 are held out for validation (model selection),
so 15000 train; the full 10k test set is only reported. SGD (Nesterov, momentum 0.9) lr 0.1, weight
decay 5e-4, batch 128, peak lr 0.05 after a linear warm-up of half an epoch, then cosine; fp32 (on
this CPU, without AMX, bf16 autocast trained 3-5x slower than fp32). Why not the paper's lr 0.1 from
step 0: in a 1-epoch check at lr 0.1 without warm-up, independent training reached 82% but DML
collapsed to ~20-24% for both networks, and CD's student stayed at 31-51% (its teacher won every
step); the initial logits of two fresh ResNet-20s here are far apart (KL ~1.2 at step 0), and the
distillation term then blows the students up in the first steps. With warm-up and lr 0.05 all
methods train normally. The numbers to read: the report's '@ best val' column
(test accuracy at each network's best-validation epoch) and its final 'CD vs DML' line.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import yaml

METHODS = "independent,dml,cd,cd-code,cd-noperturb"
SEEDS = "0,1,2"
FULL_EPOCHS = 5


def benchmark_config(args: argparse.Namespace) -> dict:
    return {
        "name": "fmnist-accuracy",
        "seed": 0,
        "output": "runs",
        "models": args.models.split(","),
        "data": {"name": "fashion_mnist", "val_size": 5000, "val_seed": 0, "batch_size": 128,
                 "train_subset": args.train_subset},
        "method": {"name": "cd", "alpha": 1.0, "beta": 0.0, "temperature": 1.0, "rule": "best"},
        "perturb": {"enabled": True, "ops": "paper", "every": 1},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5.0e-4,
                  "epochs": args.epochs, "schedule": "cosine", "warmup_epochs": 0.5},
        "train": {"precision": "fp32", "threads": args.threads, "progress": False, "tensorboard": False,
                  "eval_every": 1, "checkpoint_every": 1},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="1 seed, 1 epoch (a check, and a time estimate for the full run)")
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--seeds", default=None, help=f"default {SEEDS} ({'0'} with --smoke)")
    parser.add_argument("--epochs", type=int, default=None, help=f"default {FULL_EPOCHS} (1 with --smoke)")
    parser.add_argument("--train-subset", type=int, default=20000, help="training images used, validation included")
    parser.add_argument("--models", default="resnet20,resnet20")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per run (train.threads)")
    parser.add_argument("--out", default=None, help="experiment directory")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run (e.g. train.device=cuda)")
    args = parser.parse_args(argv)
    full_epochs, full_seeds = FULL_EPOCHS, len(SEEDS.split(","))
    if args.epochs is None:
        args.epochs = 1 if args.smoke else full_epochs
    if args.seeds is None:
        args.seeds = "0" if args.smoke else SEEDS
    out = Path(args.out or ("runs/fmnist-accuracy-smoke" if args.smoke else "runs/fmnist-accuracy"))

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)  # per-epoch lines
    from kdarena.experiments.plot import plot_path
    from kdarena.experiments.report import write_report
    from kdarena.experiments.sweep import SweepError, run_sweep

    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "CONFIG.yaml"
    config_path.write_text(yaml.safe_dump(benchmark_config(args), sort_keys=False))
    start = time.perf_counter()
    status = 0
    try:
        records = run_sweep(config_path, args.overrides, args.methods, args.seeds, out)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (e.g. timeout): the run checkpointed; the same command resumes
        print(f"interrupted; run the same command again to resume ({out / 'sweep.json'} lists the runs)", file=sys.stderr)
        return 130
    except SweepError as error:  # some runs failed; report the others
        print(f"kdarena: {error}", file=sys.stderr)
        records, status = json.loads((out / "sweep.json").read_text())["runs"], 1
    elapsed = time.perf_counter() - start

    print()
    try:
        print(write_report([out]))
        for path in plot_path(out):
            print(path)
    except (ImportError, FileNotFoundError) as error:
        print(f"(no report or plots: {error})")

    trained = [r for r in records if r["status"] in ("trained", "resumed", "restarted")]
    print(f"\nwall time of this invocation: {elapsed / 60:.1f} min for {len(trained)} trained run(s)")
    for r in records:
        print(f"  {r['label']}-seed{r['seed']}: {r['status']}, {r['seconds']:.0f} s")
    if trained:
        per_run = sum(r["seconds"] for r in trained) / len(trained)
        n_methods = len({r["label"] for r in records})
        estimate = per_run * (full_epochs / args.epochs) * n_methods * full_seeds
        print(f"  mean {per_run:.0f} s per run at {args.epochs} epoch(s); the full benchmark "
              f"({n_methods} methods x {full_seeds} seeds x {full_epochs} epochs) would take about {estimate / 60:.0f} min "
              f"on this machine under its current load")
        timing = {"epochs": args.epochs, "train_subset": args.train_subset, "models": args.models,
                  "seconds_per_run": per_run, "estimated_full_minutes": estimate / 60, "runs": records}
        (out / "timing.json").write_text(json.dumps(timing, indent=2) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
