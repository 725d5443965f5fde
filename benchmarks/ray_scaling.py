"""The same sweep on 1 node vs 2 nodes of a Ray cluster on this machine (``kdarena sweep --engine ray``).

A ``ray.cluster_utils.Cluster`` on the loopback address: a head with 0 CPUs (it schedules, it does
not train) and ``--nodes`` worker nodes of 1 CPU each; every run asks for 1 CPU and trains with one
thread. The sweep is 8 runs (independent and DML x 4 seeds, two ConvNets on sklearn's digits,
``--epochs`` epochs). Each repetition times the whole sweep into a fresh folder (Ray connecting,
probing storage and scheduling included; starting a node not), 1 node and 2 nodes alternating (the
second worker node added or removed in between) so a busy phase of a shared machine hits both; the
result is the median wall time of each and the median of the pairwise ratios. On 2 cores the ideal is 2x.

    python benchmarks/ray_scaling.py --reps 3 --out runs/ray_scaling   # ~5 min on a quiet 2-core machine
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray is imported: nodes on 127.0.0.1

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from kdarena.experiments.sweep import run_sweep  # noqa: E402

METHODS, SEEDS = "independent,dml", "0,1,2,3"


def timed_sweep(config: Path, address: str, out: Path) -> tuple[float, float, dict[str, int]]:
    """Wall time of the whole sweep, the sum of its runs' own wall times, and how many runs each node trained."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    run_sweep(config, [], METHODS, SEEDS, out, engine="ray", address=address)
    seconds = time.perf_counter() - start
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    per_node: dict[str, int] = {}
    for run in runs:
        per_node[run["node"][:12]] = per_node.get(run["node"][:12], 0) + 1
    return seconds, sum(run["seconds"] for run in runs), per_node


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/ray_scaling")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()

    from ray.cluster_utils import Cluster

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = out / "digits.yaml"
    config.write_text(yaml.safe_dump({
        "name": "ray-scaling", "output": str(out), "models": ["convnet", "convnet"],
        "data": {"name": "digits", "val_size": 200, "batch_size": 128}, "perturb": {"enabled": False},
        "optim": {"epochs": args.epochs}, "train": {"progress": False, "tensorboard": False, "threads": 1}}))
    load = os.getloadavg()
    times: dict[int, list[float]] = {1: [], 2: []}
    run_seconds: dict[int, list[float]] = {1: [], 2: []}
    spread: dict[int, dict[str, int]] = {}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        workers = [cluster.add_node(num_cpus=1)]
        for rep in range(args.reps):
            for nodes in (1, 2) if rep % 2 == 0 else (2, 1):
                while len(workers) < nodes:  # nodes are added and removed between sweeps, never during one
                    workers.append(cluster.add_node(num_cpus=1))
                while len(workers) > nodes:
                    cluster.remove_node(workers.pop())
                cluster.wait_for_nodes()
                seconds, in_runs, spread[nodes] = timed_sweep(config, cluster.address, out / f"{nodes}node")
                times[nodes].append(seconds)
                run_seconds[nodes].append(in_runs)
                print(f"rep {rep}: {nodes} node(s): {seconds:.1f} s (runs' own wall times add up to {in_runs:.1f} s), "
                      f"runs per node {spread[nodes]}", flush=True)
    finally:
        cluster.shutdown()
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
        "load_before": [round(x, 2) for x in load], "load_after": [round(x, 2) for x in os.getloadavg()],
        "epochs": args.epochs, "runs": 8, "seconds": times, "runs_own_seconds": run_seconds,
        "median_s": {n: statistics.median(t) for n, t in times.items()},
        "speedup": statistics.median([a / b for a, b in zip(times[1], times[2])]),
        "runs_per_node": spread,
    }
    (out / "ray_scaling.json").write_text(json.dumps(result, indent=2))
    print(f"8 runs: 1 node {result['median_s'][1]:.1f} s, 2 nodes {result['median_s'][2]:.1f} s (median of {args.reps}); "
          f"speed-up {result['speedup']:.2f}x (pair by pair); load {result['load_before']} -> {result['load_after']}")


if __name__ == "__main__":
    main()
