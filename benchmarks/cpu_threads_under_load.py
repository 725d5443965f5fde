"""The quickstart's training step on a CPU that other processes use too: kdarena's thread choice vs fixed ones.

Run from the repository root::

    PYTHONPATH=. python benchmarks/cpu_threads_under_load.py --busy 0          # whatever else the machine runs
    PYTHONPATH=. python benchmarks/cpu_threads_under_load.py --busy 2          # plus two spinning processes
    PYTHONPATH=. python benchmarks/cpu_threads_under_load.py --busy 2 --kdarena-src OLD   # OLD: git archive 47a0f36 kdarena | tar -x -C OLD

Each setting runs in a fresh process (OpenMP reads its wait policy once, as torch loads), one after the
other, in a rotating order over ``--reps`` rounds so slow phases of a shared machine hit every setting:

* ``auto``: what ``kdarena train`` does with ``train.threads`` unset (a passive wait policy on a busy machine
  and threads from the free CPUs, see kdarena/cpu_threads.py); ``before``: the same from ``--kdarena-src``
  (torch's default threads, OpenMP's default policy);
* ``tN-POLICY``: ``train.threads=N`` with ``OMP_WAIT_POLICY`` = POLICY (``default``: unset), for N from 1
  to the usable CPUs: the best of these is the reference "best thread count".

The step is the quickstart's (configs/quickstart.yaml: two ResNet-20s, competitive distillation with the
paper's perturbation pool, batch 128, channels_last, precision auto) on synthetic Fashion-MNIST-shaped
data (uint8 1x28x28, 10 classes; speed does not depend on the pixels), timed by the Trainer's own
``train_step``: ``--warmup`` steps, then the median of ``--steps`` timed ones. ``--busy K`` starts K
processes that spin a CPU each for the whole measurement. Printed per setting: the median over rounds of
the median step time, the thread count the run used, and the 1-minute load average and the busy CPUs
(/proc/stat) seen as it started. ``--json`` writes every number.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(args) -> None:
    """One setting in this process: time the quickstart's step; print one JSON line."""
    import tempfile

    policy = os.environ.get("OMP_WAIT_POLICY", "default")  # as the OpenMP runtime reads it when torch loads first

    if args.before_import_torch:
        import torch  # noqa: F401  (the OpenMP runtime loads with the policy set by the parent, nothing else)
    from kdarena.config import load
    from kdarena.data import ArrayDataset
    from kdarena.data.build import DataBundle
    from kdarena.data.tensor_loader import TensorLoader
    from kdarena.engine.build import build_parts
    from kdarena.engine.distributed import DistInfo, resolve_device
    from kdarena.trainer import Trainer
    import torch

    try:
        from kdarena.cpu_threads import busy_cpus, usable_cpus

        busy = busy_cpus(usable_cpus())
    except ImportError:  # a kdarena from before it had them (--kdarena-src)
        busy = None
    load_avg = os.getloadavg()[0]
    overrides = ["train.progress=false", "train.tensorboard=false", "optim.epochs=200"]
    if args.threads:
        overrides.append(f"train.threads={args.threads}")
    config = load(ROOT / "configs" / "quickstart.yaml", overrides)
    g = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.randint(0, 256, (4096, 1, 28, 28), generator=g, dtype=torch.uint8),
                        torch.randint(0, 10, (4096,), generator=g), 10, (0.286,), (0.353,), name="synthetic-fmnist")

    def build(config, device, rank=0, world=1):
        loader = TensorLoader(data, config.data.batch_size, device=device, train=True, seed=config.seed,
                              rank=rank, world_size=world, channels_last=config.train.channels_last)
        test = TensorLoader(data, config.data.eval_batch_size, device=device, train=False)  # what inputs.json records
        return DataBundle(loader, None, test, 10, 1, [str(c) for c in range(10)])

    device = resolve_device(config.train.device, DistInfo())
    parts = build_parts(config, device, data_override=build)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(config, run_dir=Path(tmp) / "run", force=True, parts=parts)
        batches = iter(trainer.data.train.iterate(0))
        times = []
        for k in range(args.warmup + args.steps):
            x, y = next(batches)
            start = time.perf_counter()
            trainer.train_step(x, y)
            trainer.loop.global_step += 1
            if k >= args.warmup:
                times.append(time.perf_counter() - start)
        trainer.metrics.close()
    print(json.dumps({"step_s": statistics.median(times), "threads": torch.get_num_threads(),
                      "policy": policy if args.before_import_torch else os.environ.get("OMP_WAIT_POLICY", "default"),
                      "busy_cpus": busy, "load1": load_avg}))


def spinners(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def run_setting(name: str, args) -> dict:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    env.pop("OMP_NUM_THREADS", None)
    command = [sys.executable, __file__, "--child", "--warmup", str(args.warmup), "--steps", str(args.steps)]
    env["PYTHONPATH"] = str(Path(args.kdarena_src).resolve()) if name == "before" else str(ROOT)
    if name not in ("auto", "before"):
        threads, policy = name[1:].split("-")
        command += ["--threads", threads, "--before-import-torch"]
        if policy != "default":
            env["OMP_WAIT_POLICY"] = policy.upper()
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--before-import-torch", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--busy", type=int, default=0, help="spinning processes started beside the runs")
    parser.add_argument("--reps", type=int, default=3, help="rounds over every setting")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--settings", default=None, help="comma-separated (default: auto and tN-passive, tN-default)")
    parser.add_argument("--kdarena-src", default=None, help="a kdarena source tree whose 'auto' is the setting 'before'")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    settings = args.settings.split(",") if args.settings else (
        ["auto"] + (["before"] if args.kdarena_src else []) + [f"t{n}-{p}" for n in range(1, cpus + 1) for p in ("passive", "default")])
    busy = spinners(args.busy)
    rows: dict[str, list[dict]] = {s: [] for s in settings}
    try:
        for rep in range(args.reps):
            order = settings[rep % len(settings):] + settings[:rep % len(settings)]
            for name in order:
                rows[name].append(run_setting(name, args))
                print(f"round {rep + 1} {name}: {rows[name][-1]}", flush=True)
    finally:
        for process in busy:
            process.kill()
    print(f"\n{cpus} usable CPUs, {args.busy} spinning processes started beside, {args.reps} rounds, "
          f"median of {args.steps} steps after {args.warmup}; 'before' is 'auto' from {args.kdarena_src}")
    print(f"{'setting':<16}{'step s':>8}{'threads':>9}{'load1':>7}{'busy CPUs':>11}")
    summary = {}
    for name, results in rows.items():
        step = statistics.median(r["step_s"] for r in results)
        summary[name] = {"step_s": step, "runs": results}
        print(f"{name:<16}{step:>8.3f}{results[0]['threads']:>9}{statistics.median(r['load1'] for r in results):>7.1f}"
              f"{statistics.median(r['busy_cpus'] or 0 for r in results):>11.2f}")
    fixed = {k: v["step_s"] for k, v in summary.items() if k not in ("auto", "before")}
    if fixed and "auto" in summary:
        best = min(fixed, key=fixed.get)
        print(f"auto / best fixed ({best}): {summary['auto']['step_s'] / fixed[best]:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpus": cpus, "busy": args.busy, "settings": summary}, indent=1))


if __name__ == "__main__":
    main()
