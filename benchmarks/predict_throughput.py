"""``kdarena predict`` against ``kdarena eval`` on the same images: images per second, CPU, one thread.

Run from the repository root, on a finished run and the data set it was trained on::

    PYTHONPATH=. python benchmarks/predict_throughput.py --run RUN_DIR --data ../shared/data/cifar10-jpeg.tar.gz \\
        --repeats 5 --json benchmarks/results/predict_throughput_cpu.json

Timed, each end to end in this process (one intra-op thread, one decode process), ``--repeats``
times in alternating order, median reported:

* ``eval``: :func:`kdarena.engine.evaluation_cli.evaluate_checkpoint` on ``checkpoints/best.pt``
  (what ``kdarena eval`` runs: rebuild the data from the run's config, here the decoded-image
  cache, then every network and the ensemble over the test split);
* ``predict``: :func:`kdarena.deploy.predict.predict` with the run's best network exported as
  safetensors (read the archive, decode the test split, one network over it);
* ``decode``: the decoding alone (:func:`kdarena.data.decode.decode_all` on the same files), the
  part of ``predict`` that ``eval`` does not repeat (its cache holds decoded pixels).

Both must report the same top-1 (checked on every repetition).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kdarena import __version__
from kdarena.data.decode import decode_all
from kdarena.data.sources import open_source, parse_layout
from kdarena.deploy.export import export_run
from kdarena.deploy.predict import predict
from kdarena.engine.evaluation_cli import evaluate_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a finished kdarena run with a validation split")
    parser.add_argument("--data", required=True, help="the folder or archive the run was trained on")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model = str(Path(tmp) / "net.safetensors")
        card = export_run(args.run, model)
        net = card["network"]
        source = open_source(args.data)
        rels = [rel for rel, _ in parse_layout(source).test]
        size, channels = card["preprocessing"]["size"][0], card["input"]["shape"][0]
        times: dict[str, list[float]] = {"eval": [], "predict": [], "decode": []}
        top1 = {}
        for rep in range(args.repeats):
            order = ["eval", "predict", "decode"] if rep % 2 == 0 else ["decode", "predict", "eval"]
            for what in order:
                start = time.perf_counter()
                if what == "eval":
                    top1["eval"] = evaluate_checkpoint(str(Path(args.run) / "checkpoints" / "best.pt"), "test")[f"{net}/top1"]
                elif what == "predict":
                    top1["predict"] = predict(model, [args.data], workers=1, progress=False).summary()["top1"]
                else:
                    decode_all(source.items(rels), size, channels, workers=1, progress=False)
                times[what].append(time.perf_counter() - start)
            assert top1["eval"] == top1["predict"], top1
            print(f"repeat {rep + 1}: " + "  ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    n = len(rels)
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {torch.get_num_threads()} thread",
        "cpu": _cpu_name(), "kdarena": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "run": args.run, "data": args.data, "network": net, "architecture": card["architecture"], "images": n,
        "precision": card["config"]["train"]["precision"], "repeats": args.repeats, "top1": top1["predict"],
        "median_seconds": {k: statistics.median(v) for k, v in times.items()},
        "images_per_second": {k: n / statistics.median(v) for k, v in times.items()},
        "all_seconds": times,
    }
    print(json.dumps({k: result[k] for k in ("images", "top1", "median_seconds", "images_per_second")}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
