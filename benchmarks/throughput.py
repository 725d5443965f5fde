"""Training throughput of a group: the naive research-code way vs kdarena's trainer, side by side.

Run from the repository root::

    PYTHONPATH=. python benchmarks/throughput.py --quick                 # 1-2 min, CPU
    PYTHONPATH=. python benchmarks/throughput.py --json runs/tp.json     # full CPU run (<= ~15 min)
    PYTHONPATH=. python benchmarks/throughput.py --device cuda --variants naive-w2,loop-fp32,loop-bf16,fused-bf16

Variants (``--variants``, comma separated; each is a base and ``-``-joined tokens):

* ``naive``  -- what research code usually does: a ``torch.utils.data.DataLoader`` over a Dataset
  that transforms each image in plain torch (random crop with 4-pixel zero padding, horizontal
  flip, normalisation; the equivalent of the torchvision CIFAR recipe minus the PIL round trip,
  i.e. *cheaper* than the real thing), then a Python loop: every network's forward, the CE of
  each, the best network picked with a host sync, then per network loss = CE + KL(best || it),
  its own ``zero_grad`` / ``backward`` / ``step`` / LR-scheduler step and a ``loss.item()`` for
  logging. fp32, NCHW, n optimizers, n backward passes. Token ``w<k>``: ``num_workers=k``
  (default 0 on CPU, 2 on CUDA); batches are moved to the device with ``non_blocking`` from
  pinned memory on CUDA.
* ``loop``   -- kdarena's real :class:`~kdarena.trainer.Trainer` (``Trainer.__init__`` builds the
  group, method, optimizer, scheduler; ``Trainer.train_step`` runs each step) fed by the real
  :class:`~kdarena.data.TensorLoader` with the CIFAR augmentation (crop 4 + flip) on the device.
  Only the data is replaced (``build_parts(..., data_override=...)``), to serve synthetic CIFAR-shaped data (uint8 3x32x32, 10
  classes) instead of reading CIFAR from disk. Method: CD (alpha=1, beta=0, i.e. CE + KL to the
  best, like ``naive``); the input perturbation is off unless the ``perturb`` token is given
  (``naive`` does no perturbation).
* ``fused``  -- as ``loop`` with ``train.fused=true`` (identical networks as one vmapped forward).
* ``solo``   -- one network of the group's architecture trained alone by the same Trainer
  (method ``independent``): the denominator of the group overhead ratio.

Tokens for loop/fused/solo: ``fp32`` / ``bf16`` (default) / ``fp16`` (autocast precision),
``compile`` (``train.compile``), ``nocl`` (``train.channels_last=false``), ``perturb``.

What is reported, per group (``--models``, e.g. ``resnet20x2``):

* the median over ``--reps`` repetitions of the time of ``--steps`` training steps, as step time,
  images/s (data-set images per second; every image trains all n networks) and network-images/s
  (n x images/s, the work done);
* ``x base``: the median over repetitions of t_naive / t_variant, pair by pair (the variants are
  timed back to back within a repetition, in a rotating order, so slow phases of a shared machine
  hit both sides of a pair alike); ``--baseline VARIANT`` divides by another variant instead;
* ``overhead``: t_group / (sum over its networks of t_solo), pair by pair (1.0 = a group costs no
  more than training its networks one after the other alone with the same settings);
* data share: time for the loader alone to produce ``--steps`` batches / time of ``--steps``
  steps, for the TensorLoader of the first ``loop`` variant and for the naive DataLoader;
* an epoch time estimated as (50000 // batch) x the median step time; on CUDA the peak memory of
  each variant: what it keeps allocated after warm-up (model, grads, optimizer state, its copy of
  the data set for Trainer variants) + the peak allocated during its timed steps above that (all
  variants share one process, so the raw peak would count the others too);
* on CPU also the process CPU time per step (all threads of this process) and the speed-up and
  overhead recomputed from CPU times: on a machine shared with other jobs, wall-clock time is
  mostly a measure of the neighbours, CPU time much less so (only meaningful for a naive variant
  with ``num_workers=0``, whose loader work stays in this process).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kdarena import models  # noqa: E402
from kdarena.data import ArrayDataset, TensorLoader  # noqa: E402

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CIFAR_TRAIN = 50_000
FULL_MODELS = "resnet20x2,resnet32x2,wrn16_2x2,resnet20x3,resnet20x4"


# ---------------------------------------------------------------------------------------------- data
def synthetic_cifar(n: int, seed: int = 0, size: int = 32, classes: int = 10) -> ArrayDataset:
    """Random uint8 images (speed does not depend on the pixels): CIFAR-shaped, or e.g. 64x64 with 200 classes."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, classes, (n,), generator=g)
    return ArrayDataset(images, labels, classes, CIFAR_MEAN, CIFAR_STD, name=f"synthetic-{size}px-{classes}")


class NaiveCifar(torch.utils.data.Dataset):
    """Per-image transforms in plain torch: ToTensor, RandomCrop(32, padding=4), RandomHorizontalFlip, Normalize."""

    def __init__(self, data: ArrayDataset, padding: int = 4):
        self.images, self.labels, self.padding = data.images, data.labels, padding
        self.mean = torch.tensor(data.mean).view(3, 1, 1)
        self.std = torch.tensor(data.std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = self.images[i].float().div(255.0)
        p = self.padding
        h, w = img.shape[1:]
        img = F.pad(img, (p, p, p, p))
        dy, dx = torch.randint(0, 2 * p + 1, (2,)).tolist()
        img = img[:, dy:dy + h, dx:dx + w]
        if torch.rand(()) < 0.5:
            img = img.flip(-1)
        img = (img - self.mean) / self.std
        return img, int(self.labels[i])


# ---------------------------------------------------------------------------------------------- variants
@dataclass
class Variant:
    name: str
    base: str
    precision: str = "bf16"
    compile: bool = False
    graphs: bool = False  # compile with CUDA graphs (mode reduce-overhead)
    channels_last: bool = True
    perturb: bool = False
    workers: int | None = None


def parse_variant(spec: str) -> Variant:
    parts = spec.strip().split("-")
    base = parts[0]
    if base not in ("naive", "loop", "fused", "solo"):
        raise SystemExit(f"unknown variant {spec!r}: the base must be naive, loop, fused or solo")
    v = Variant(spec.strip(), base, precision="fp32" if base == "naive" else "bf16")
    for token in parts[1:]:
        if token in ("fp32", "bf16", "fp16") and base != "naive":
            v.precision = token
        elif token == "compile" and base != "naive":
            v.compile = True
        elif token == "graphs" and base != "naive":
            v.compile = v.graphs = True
        elif token == "nocl" and base != "naive":
            v.channels_last = False
        elif token == "perturb" and base in ("loop", "fused"):
            v.perturb = True
        elif base == "naive" and token.startswith("w") and token[1:].isdigit():
            v.workers = int(token[1:])
        else:
            raise SystemExit(f"variant {spec!r}: token {token!r} does not apply to {base}")
    return v


def parse_group(spec: str) -> list[str]:
    """``resnet20x2`` -> [resnet20, resnet20]; ``resnet20+resnet32`` -> a mixed group."""
    spec = spec.strip()
    if "+" in spec:
        return spec.split("+")
    name, sep, count = spec.rpartition("x")
    if not sep or not count.isdigit():
        raise SystemExit(f"bad group {spec!r}: use NAMExN (resnet20x2) or NAME+NAME")
    return [name] * int(count)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """Something that trains for ``steps`` steps; ``run`` returns the seconds it took."""

    n: int
    device: torch.device

    def step(self) -> None:
        raise NotImplementedError

    def run(self, steps: int) -> float:
        sync(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.device)
        return time.perf_counter() - start

    def data_seconds(self, steps: int) -> float | None:
        return None

    def close(self) -> None:
        pass


class NaiveRunner(Runner):
    def __init__(self, names: list[str], data: ArrayDataset, args, v: Variant):
        self.device = torch.device(args.device)
        self.n = len(names)
        torch.manual_seed(args.seed)
        self.nets = [models.create(name, num_classes=args.classes, in_channels=3).to(self.device).train() for name in names]
        self.opts = [torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4) for net in self.nets]
        self.scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=200 * (CIFAR_TRAIN // args.batch)) for opt in self.opts]
        workers = v.workers if v.workers is not None else (2 if self.device.type == "cuda" else 0)
        self.loader = torch.utils.data.DataLoader(
            NaiveCifar(data), batch_size=args.batch, shuffle=True, drop_last=True, num_workers=workers,
            pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
        )
        self._it = iter(self.loader)
        self.log: list[float] = []

    def _next(self):
        try:
            return next(self._it)
        except StopIteration:
            self._it = iter(self.loader)
            return next(self._it)

    def step(self) -> None:
        x, y = self._next()
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        outs = [net(x) for net in self.nets]
        ces = [F.cross_entropy(o, y) for o in outs]
        best = int(torch.stack([c.detach() for c in ces]).argmin())  # host sync, as usual in research code
        for i, (opt, sched) in enumerate(zip(self.opts, self.scheds)):
            loss = ces[i]
            if i != best:
                loss = loss + F.kl_div(F.log_softmax(outs[i], 1), F.softmax(outs[best].detach(), 1), reduction="batchmean")
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            self.log.append(loss.item())
        if len(self.log) > 10_000:
            self.log.clear()

    def data_seconds(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            x, y = self._next()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        sync(self.device)
        return time.perf_counter() - start

    def close(self) -> None:
        self._it = None  # stops persistent workers


def synthetic_data(data: ArrayDataset):
    """A data builder for ``build_parts``: ``data`` served exactly as build_data serves CIFAR."""
    from kdarena.data.build import DataBundle

    def build(config, device, rank=0, world=1):
        d = config.data
        loader = TensorLoader(data, d.batch_size, device=device, train=True, seed=config.seed, crop_padding=4, flip=True,
                              rank=rank, world_size=world, channels_last=config.train.channels_last)
        return DataBundle(loader, None, None, data.num_classes, data.channels, list(data.classes))

    return build


class TrainerRunner(Runner):
    def __init__(self, names: list[str], data: ArrayDataset, args, v: Variant, run_root: Path):
        from kdarena.config import validate
        from kdarena.engine.build import build_parts
        from kdarena.engine.distributed import DistInfo, resolve_device
        from kdarena.trainer import Trainer

        self.n = len(names)
        raw = {
            "name": v.name, "seed": args.seed, "models": names,
            "data": {"name": "cifar10", "batch_size": args.batch},
            "method": {"name": "independent"} if v.base == "solo" else {"name": "cd", "alpha": 1.0, "beta": 0.0},
            "perturb": {"enabled": v.perturb},
            "optim": {"epochs": 200},
            "train": {"device": args.device, "precision": v.precision, "channels_last": v.channels_last,
                      "compile": v.compile, "cuda_graphs": v.graphs if v.compile else None,
                      "fused": v.base == "fused", "threads": args.threads,
                      "progress": False, "tensorboard": False},
        }
        config = validate(raw)
        device = resolve_device(config.train.device, DistInfo())
        parts = build_parts(config, device, data_override=synthetic_data(data))
        self.trainer = Trainer(config, run_dir=run_root / f"{'+'.join(names)}-{v.name}", force=True, parts=parts)
        self.device = self.trainer.device
        self.loader = self.trainer.data.train
        self._epoch = 0
        self._it = self.loader.iterate(0)

    def _next(self):
        try:
            return next(self._it)
        except StopIteration:
            self._epoch += 1
            self._it = self.loader.iterate(self._epoch)
            return next(self._it)

    def step(self) -> None:
        x, y = self._next()
        self.trainer.train_step(x, y)
        self.trainer.loop.global_step += 1

    def data_seconds(self, steps: int) -> float:
        """The loader alone, from its own iterator (the training order is not disturbed). The epoch
        plan (one permutation and the augmentation draws for 50k samples, made once per epoch) is
        drawn before the clock starts: per batch it costs 1/390 of its time."""
        epoch = self._epoch + 1000
        it = self.loader.iterate(epoch)
        next(it)
        sync(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            try:
                next(it)
            except StopIteration:
                epoch += 1
                it = self.loader.iterate(epoch)
                next(it)
        sync(self.device)
        return time.perf_counter() - start

    def close(self) -> None:
        metrics = getattr(self.trainer, "metrics", None)
        if metrics is not None:
            metrics.close()


# ---------------------------------------------------------------------------------------------- measurement
def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else None


@dataclass
class Measured:
    variant: Variant
    runner: Runner | None
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)  # CUDA: peak allocated during a timed block above its start
    resident: int = 0  # CUDA: memory the variant keeps (model, grads, optimizer state, device-resident data)
    data_times: list[float] = field(default_factory=list)
    warmup_s: float = 0.0
    error: str | None = None


def build_runner(names, data, args, v: Variant, run_root: Path) -> Runner:
    if v.base == "naive":
        return NaiveRunner(names, data, args, v)
    if v.base == "solo":
        raise AssertionError("solo runners are built per architecture")
    return TrainerRunner(names, data, args, v, run_root)


def measure_group(spec: str, variants: list[Variant], data: ArrayDataset, args, run_root: Path) -> dict[str, Any]:
    names = parse_group(spec)
    n = len(names)
    device = torch.device(args.device)
    entries: list[tuple[str, Measured]] = []  # (key, measured): key is the variant name or solo:<arch>:<variant>
    for v in variants:
        if v.base == "solo":
            for arch in sorted(set(names)):
                entries.append((f"{v.name}:{arch}", Measured(v, None)))
        else:
            entries.append((v.name, Measured(v, None)))
    for key, m in entries:
        label = f"{spec} {key}"
        try:
            arch_names = [key.split(":")[1]] if m.variant.base == "solo" else names
            before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            m.runner = TrainerRunner(arch_names, data, args, m.variant, run_root) if m.variant.base == "solo" else build_runner(names, data, args, m.variant, run_root)
            start = time.perf_counter()
            m.runner.run(args.warmup + (args.compile_warmup if m.variant.compile else 0))
            m.warmup_s = time.perf_counter() - start
            if device.type == "cuda":
                m.resident = torch.cuda.memory_allocated(device) - before
        except Exception as error:  # record and go on: one broken variant must not sink a device run
            m.error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            m.runner = None
            print(f"  [{label}] FAILED to build/warm up: {m.error}", file=sys.stderr)
            if args.verbose:
                traceback.print_exc()
    live = [(k, m) for k, m in entries if m.runner is not None]
    data_probe = next((m for k, m in live if m.variant.base == "loop"), None)
    naive_probe = next((m for k, m in live if m.variant.base == "naive"), None)
    for rep in range(args.reps):
        shift = rep % max(len(live), 1)
        for key, m in live[shift:] + live[:shift]:
            if m.runner is None:
                continue
            try:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    allocated = torch.cuda.memory_allocated(device)
                cpu_start = time.process_time()
                m.times.append(m.runner.run(args.steps))
                m.cpu_times.append(time.process_time() - cpu_start)
                if device.type == "cuda":
                    m.peaks.append(torch.cuda.max_memory_allocated(device) - allocated)
                if m is data_probe or m is naive_probe:
                    m.data_times.append(m.runner.data_seconds(args.steps))
            except Exception as error:
                m.error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                print(f"  [{spec} {key}] FAILED while timing: {m.error}", file=sys.stderr)
                if args.verbose:
                    traceback.print_exc()
                m.runner.close()
                m.runner = None
        done = ", ".join(f"{k} {1000 * m.times[-1] / args.steps:.0f}ms" for k, m in live if m.times and len(m.times) == rep + 1)
        print(f"  {spec} rep {rep + 1}/{args.reps}: {done}", flush=True)
    for _, m in entries:
        if m.runner is not None:
            m.runner.close()
            m.runner = None

    # ------------------------------------------------------------------ summary
    batch = args.batch
    by_key = dict(entries)
    if args.baseline:
        naive_key = args.baseline if args.baseline in by_key and by_key[args.baseline].times else None
    else:
        naive_key = next((k for k, m in entries if m.variant.base == "naive" and m.times), None)
    result: dict[str, Any] = {"group": spec, "models": names, "n": n, "batch": batch, "steps": args.steps,
                              "reps": args.reps, "baseline": naive_key, "variants": {}}
    for key, m in entries:
        t = median(m.times)
        step = t / args.steps if t is not None else None
        k_n = 1 if m.variant.base == "solo" else n
        row: dict[str, Any] = {
            "variant": m.variant.name, "base": m.variant.base, "precision": m.variant.precision,
            "compile": m.variant.compile, "channels_last": m.variant.channels_last, "perturb": m.variant.perturb,
            "error": m.error, "step_s_per_rep": [x / args.steps for x in m.times],
            "step_ms": 1000 * step if step else None,
            "images_per_s": batch / step if step else None,
            "network_images_per_s": k_n * batch / step if step else None,
            "epoch_s_estimate": (CIFAR_TRAIN // batch) * step if step else None,
            "warmup_s": round(m.warmup_s, 2),
            # all variants live in one process: per variant = what it keeps + the peak of its steps above that
            "peak_mem_mb": (m.resident + max(m.peaks)) / 2**20 if m.peaks else None,
            "resident_mem_mb": m.resident / 2**20 if m.peaks else None,
            "step_peak_mem_mb": max(m.peaks) / 2**20 if m.peaks else None,
        }
        if device.type == "cpu" and m.cpu_times:
            # process CPU time (all threads of this process): robust to other jobs taking turns on a shared machine
            row["cpu_ms"] = 1000 * median(m.cpu_times) / args.steps
        if naive_key and key != naive_key and m.times:
            # t_baseline / t_variant within each repetition, then the median (baseline: naive unless --baseline)
            pairs = list(zip(by_key[naive_key].times, m.times))
            row["baseline"] = naive_key
            row["speedup_vs_baseline"] = median([a / b for a, b in pairs])
            if by_key[naive_key].variant.base == "naive":
                row["speedup_vs_naive"] = row["speedup_vs_baseline"]
            if device.type == "cpu" and (by_key[naive_key].variant.workers or 0) == 0:
                cpu_pairs = list(zip(by_key[naive_key].cpu_times, m.cpu_times))
                row["speedup_vs_baseline_cpu_time"] = median([a / b for a, b in cpu_pairs])
        if m.variant.base in ("loop", "fused") and m.times:
            solo_key = f"solo-{m.variant.precision}" + ("-compile" if m.variant.compile else "") + ("-nocl" if not m.variant.channels_last else "")
            solos = [by_key.get(f"{solo_key}:{arch}") for arch in names]
            if all(s is not None and len(s.times) == len(m.times) for s in solos):
                overhead = [m.times[r] / sum(s.times[r] for s in solos) for r in range(len(m.times))]
                row["group_overhead"] = median(overhead)
                if device.type == "cpu":
                    row["group_overhead_cpu_time"] = median(
                        [m.cpu_times[r] / sum(s.cpu_times[r] for s in solos) for r in range(len(m.cpu_times))])
                row["group_overhead_vs"] = solo_key
        if m.data_times and m.times:
            row["data_share"] = median([d / t for d, t in zip(m.data_times, m.times)])
            row["data_ms_per_batch"] = 1000 * median(m.data_times) / args.steps
        result["variants"][key] = row
    return result


# ---------------------------------------------------------------------------------------------- report
def _fmt(value, spec: str) -> str:
    width = int("".join(c for c in spec.split(".")[0] if c.isdigit()) or 0)
    return "-".rjust(width) if value is None else format(value, spec)


def _x(res: dict[str, Any], key: str, row: dict[str, Any], suffix: str = "") -> str:
    if key == res.get("baseline"):
        return "base".rjust(7)
    return _fmt(row.get("speedup_vs_baseline" + suffix), "7.2f")


def table(results: list[dict[str, Any]]) -> str:
    """One line per (group, variant); CPU runs add process-CPU-time columns (robust on a shared machine)."""
    cpu = any("cpu_ms" in row for res in results for row in res["variants"].values())
    head = (f"{'group':<12} {'variant':<22} {'step ms':>8} {'img/s':>6} {'net-img/s':>9} {'x base':>7} {'overhead':>8} "
            f"{'data%':>6} {'epoch s':>7} " + (f"{'cpu ms':>7} {'x base':>7} {'overhd':>6}" if cpu else f"{'peak MB':>8}"))
    lines = [head, "-" * len(head)]
    if cpu:
        lines.insert(0, " " * (len(head) - 22) + "-- by CPU time ---")
    for number, res in enumerate(results):
        if number:
            lines.append("")
        for key, row in res["variants"].items():
            if row.get("error") and not row.get("step_ms"):
                lines.append(f"{res['group']:<12} {key:<22} FAILED: {row['error'][:80]}")
                continue
            share = row.get("data_share")
            line = (
                f"{res['group']:<12} {key:<22} {_fmt(row['step_ms'], '8.1f')} {_fmt(row['images_per_s'], '6.0f')} "
                f"{_fmt(row['network_images_per_s'], '9.0f')} {_x(res, key, row)} "
                f"{_fmt(row.get('group_overhead'), '8.3f')} {_fmt(100 * share if share is not None else None, '6.2f')} "
                f"{_fmt(row['epoch_s_estimate'], '7.1f')} "
            )
            if cpu:
                line += (f"{_fmt(row.get('cpu_ms'), '7.0f')} {_x(res, key, row, '_cpu_time')} "
                         f"{_fmt(row.get('group_overhead_cpu_time'), '6.3f')}")
            else:
                line += _fmt(row["peak_mem_mb"], "8.0f")
            lines.append(line)
    return "\n".join(lines)


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": cpu, "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--models", default=None, help=f"comma-separated groups NAMExN (default {FULL_MODELS}; --quick: resnet20x2)")
    p.add_argument("--variants", default=None,
                   help="comma-separated variants (default cpu: naive,loop-bf16,loop-fp32,loop-fp32-nocl,solo-bf16, "
                        "without loop-fp32-nocl with --quick; cuda: naive,loop-fp32,loop-bf16,fused-fp32,fused-bf16,solo-bf16)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per variant (default 5)")
    p.add_argument("--steps", type=int, default=None, help="training steps per repetition (default cpu 4, cuda 20; --quick cpu 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per variant first (default cpu 1, cuda 5)")
    p.add_argument("--compile-warmup", type=int, default=3, help="extra untimed steps for compiled variants")
    p.add_argument("--baseline", default=None, help="variant the 'x base' speed-ups divide (default: the naive variant)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--samples", type=int, default=CIFAR_TRAIN, help="synthetic training images (default 50000)")
    p.add_argument("--image-size", type=int, default=32, help="synthetic image side (default 32; 64 for Tiny-ImageNet)")
    p.add_argument("--classes", type=int, default=10, help="classes of the synthetic data and the models (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a 1-2 minute check: resnet20x2, 5 reps of 2 steps")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing variants")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="only merge earlier --json outputs (missing files are noted), print one table, write --json")
    args = p.parse_args(argv)
    if args.merge:
        return args
    cuda = args.device.startswith("cuda")
    if args.models is None:
        args.models = "resnet20x2" if args.quick else FULL_MODELS
    if args.variants is None:
        args.variants = ("naive,loop-fp32,loop-bf16,fused-fp32,fused-bf16,solo-bf16" if cuda
                         else "naive,loop-bf16,loop-fp32,solo-bf16" if args.quick
                         else "naive,loop-bf16,loop-fp32,loop-fp32-nocl,solo-bf16")
    if args.reps is None:
        args.reps = 5
    if args.steps is None:
        args.steps = 20 if cuda else (2 if args.quick else 4)
    if args.warmup is None:
        args.warmup = 5 if cuda else 1
    if args.quick and not cuda:
        args.samples = min(args.samples, 10_000)
    if args.reps < 1 or args.steps < 1:
        raise SystemExit("--reps and --steps must be >= 1")
    return args


def merge(paths: list[str], out: str | None) -> dict[str, Any]:
    """Concatenate the results of several runs (e.g. the eager and the compile phase of gpu.sh)."""
    merged: dict[str, Any] = {"runs": [], "results": [], "missing": []}
    for path in paths:
        if not Path(path).is_file():
            merged["missing"].append(path)
            continue
        run = json.loads(Path(path).read_text())
        merged["runs"].append({"file": path, "meta": run["meta"], "complete": run.get("complete", True)})
        merged["results"].extend(run["results"])
    for run in merged["runs"]:
        meta = run["meta"]
        state = "" if run["complete"] else "  (INCOMPLETE: stopped early, e.g. by a timeout)"
        print(f"{run['file']}: {meta.get('gpu', meta.get('cpu'))}, torch {meta['torch']}, {meta['date']}, {meta.get('seconds', '?')} s{state}")
    for path in merged["missing"]:
        print(f"{path}: MISSING (that phase failed or timed out before its first group)")
    print(table(merged["results"]))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(merged, indent=1))
        print(f"wrote {out}")
    return merged


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.merge:
        return merge(args.merge, args.json)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented the batching rule")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the Trainer sets it too; the naive side gets it as well
    variants = [parse_variant(s) for s in args.variants.split(",") if s.strip()]
    groups = [g for g in args.models.split(",") if g.strip()]
    info = machine_info(device)
    print(f"throughput: device={device} torch={torch.__version__} threads={args.threads} batch={args.batch} "
          f"reps={args.reps} steps={args.steps} {info.get('gpu', info['cpu'])}", flush=True)
    data = synthetic_cifar(args.samples, args.seed, args.image_size, args.classes)
    results: list[dict[str, Any]] = []
    start = time.perf_counter()
    out = {"meta": {**info, "command": " ".join([Path(sys.executable).name, *sys.argv]), "args": vars(args)},
           "results": results, "complete": False}

    def save() -> None:  # after every group, so a run stopped by a timeout keeps what it measured
        info["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
        info["seconds"] = round(time.perf_counter() - start, 1)
        out["meta"].update(info)
        if args.json:
            path = Path(args.json)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(out, indent=1))

    with tempfile.TemporaryDirectory(prefix="kdarena-throughput-") as tmp:
        for spec in groups:
            results.append(measure_group(spec, variants, data, args, Path(tmp)))
            save()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    out["complete"] = True
    save()
    print()
    print(table(results))
    print(f"\n{info['seconds']:.0f} s; x base = median of per-repetition t_base/t (base: naive unless --baseline); overhead = t_group / sum of t_solo; "
          f"data% = loader time / step time (TensorLoader on loop rows, DataLoader on the naive row)")
    if args.json:
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
