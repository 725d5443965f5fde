"""Real-image data: decode time of image archives (cold and cached) and training throughput from the
decoded cache versus the CIFAR-10 python-pickle path (same model, batch, loader and seed).

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/image_data.py \\
        --cifar PATH/cifar10-jpeg.tar.gz --tiny PATH/tiny-imagenet-32.tar.gz

Archive paths may also come from $KDARENA_DATA (a folder holding cifar10-jpeg.tar.gz and
tiny-imagenet-32.tar.gz).  Cold decodes use a fresh temporary cache; the pickle copy of CIFAR-10 is
written from the decoded arrays into a temporary folder in the format of cifar-10-python.tar.gz, so
both paths train on identical pixels.  Training steps of the two paths are interleaved one by one
(order alternating) so the load of a shared machine hits both alike; img/s = batch / median step.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch


def decode_times(path: str, workers: int, image_size: int) -> dict:
    from kdarena.data.images import load_image_set

    t = time.perf_counter()
    train, test, info = load_image_set(path, image_size=image_size, workers=workers, progress=False)
    cold = time.perf_counter() - t
    t = time.perf_counter()
    _, _, again = load_image_set(path, image_size=image_size, workers=workers, progress=False)
    cached = time.perf_counter() - t
    assert again.from_cache and not info.from_cache
    return dict(archive=os.path.basename(path), train=len(train), test=len(test), classes=len(info.classes),
                cold_s=round(cold, 2), decode_s=round(info.decode_seconds, 2), cached_s=round(cached, 2),
                mean=[round(v, 4) for v in info.mean], std=[round(v, 4) for v in info.std])


def write_cifar_pickles(train, test, classes, root: str) -> str:
    """The decoded arrays in the layout and format of cifar-10-python.tar.gz (pickle protocol 4:
    bytes without the _codecs global that kdarena's restricted unpickler refuses)."""
    d = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(d)
    x, y = train.images.numpy().reshape(len(train), -1), train.labels.numpy()
    for i in range(5):
        part = slice(i * len(train) // 5, (i + 1) * len(train) // 5)
        with open(os.path.join(d, f"data_batch_{i + 1}"), "wb") as f:
            pickle.dump({b"data": np.ascontiguousarray(x[part]), b"labels": y[part].tolist()}, f, protocol=4)
    with open(os.path.join(d, "test_batch"), "wb") as f:
        pickle.dump({b"data": test.images.numpy().reshape(len(test), -1), b"labels": test.labels.numpy().tolist()}, f, protocol=4)
    with open(os.path.join(d, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in classes]}, f, protocol=4)
    return root


def paired_step_times(bundles: dict, steps: int, precision: str, channels_last: bool, warmup: int = 3) -> dict:
    """Seconds of each training step (data + forward + backward + update) for every path, the paths'
    steps interleaved one by one (order alternating) so a busy phase of a shared machine hits both."""
    from kdarena import models

    state = {}
    for k, bundle in bundles.items():
        torch.manual_seed(0)
        model = models.create("resnet20", bundle.num_classes, bundle.in_channels)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
        state[k] = (model, opt, iter(bundle.train.iterate(0)))
    times: dict[str, list[float]] = {k: [] for k in bundles}
    keys = list(bundles)
    for i in range(warmup + steps):
        for k in (keys if i % 2 == 0 else keys[::-1]):
            model, opt, batches = state[k]
            t = time.perf_counter()
            x, y = next(batches)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i >= warmup:
                times[k].append(time.perf_counter() - t)
    return times


def loader_ms(bundle, batches: int = 100) -> float:
    """Milliseconds per training batch of the data path alone (gather, crop, flip, normalise)."""
    t = time.perf_counter()
    for i, _ in enumerate(bundle.train.iterate(1)):
        if i + 1 == batches:
            break
    return 1000 * (time.perf_counter() - t) / batches


def main() -> int:
    env = os.environ.get("KDARENA_DATA", "")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cifar", default=os.path.join(env, "cifar10-jpeg.tar.gz") if env else None)
    p.add_argument("--tiny", default=os.path.join(env, "tiny-imagenet-32.tar.gz") if env else None)
    p.add_argument("--workers", type=int, default=2, help="decode processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads for training")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=60, help="timed training steps per path (interleaved)")
    p.add_argument("--rounds", type=int, default=3, help="timings of the data path alone (100 batches each)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--decode-only", action="store_true", help="only the decode timings")
    p.add_argument("--cache", help="use this decoded-image cache and skip the decode timings (throughput only)")
    args = p.parse_args()
    if not args.cifar or not os.path.isfile(args.cifar):
        p.error("give --cifar PATH/cifar10-jpeg.tar.gz (or set KDARENA_DATA to its folder)")
    torch.set_num_threads(args.threads)
    from kdarena.config import load
    from kdarena.data.build import build_data
    from kdarena.data.images import load_image_set

    results: dict = dict(machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                         python=platform.python_version(), torch=torch.__version__, numpy=np.__version__,
                         date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), decode=[])
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["KDARENA_CACHE"] = args.cache or os.path.join(tmp, "cache")  # cold: nothing decoded yet
        for path in (args.cifar, args.tiny) if not args.cache else ():
            if path and os.path.isfile(path):
                results["decode"].append(decode_times(path, args.workers, 32))
                print(json.dumps(results["decode"][-1]), flush=True)
        if args.decode_only:
            print(json.dumps(results, indent=1))
            return 0
        train, test, info = load_image_set(args.cifar, image_size=32, progress=False)
        pickles = write_cifar_pickles(train, test, info.classes, os.path.join(tmp, "pickles"))
        common = [f"data.batch_size={args.batch}", "data.val_size=5000", "train.progress=false", "data.crop_padding=4",
                  "data.flip=true", f"data.mean={list(info.mean)}", f"data.std={list(info.std)}",
                  f"train.channels_last={not args.no_channels_last}"]
        paths = {
            "pickle": load(None, ["data.name=cifar10", f"data.root={pickles}"] + common),
            "archive": load(None, ["data.name=imagefolder", f"data.root={args.cifar}", "data.image_size=32"] + common),
        }
        bundles = {k: build_data(c, torch.device("cpu")) for k, c in paths.items()}
        same = all(torch.equal(a[0], b[0]) for a, b in zip(bundles["pickle"].train.iterate(0), bundles["archive"].train.iterate(0)))
        data_ms = {k: [] for k in bundles}
        for r in range(args.rounds):
            for k in (("pickle", "archive") if r % 2 == 0 else ("archive", "pickle")):
                data_ms[k].append(loader_ms(bundles[k]))
        times = paired_step_times(bundles, args.steps, args.precision, not args.no_channels_last)
        rates = {k: [args.batch / t for t in ts] for k, ts in times.items()}
    med = {k: args.batch / statistics.median(ts) for k, ts in times.items()}
    results["throughput"] = dict(model="resnet20", batch=args.batch, threads=args.threads, precision=args.precision,
                                 paired_steps=args.steps, loader_rounds=args.rounds, identical_batches=same,
                                 img_s_quartiles={k: [round(q, 1) for q in statistics.quantiles(vs, n=4)] for k, vs in rates.items()},
                                 median_img_s={k: round(v, 1) for k, v in med.items()},
                                 archive_over_pickle=round(med["archive"] / med["pickle"], 3),
                                 data_ms_per_batch={k: round(statistics.median(v), 2) for k, v in data_ms.items()})
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
