"""Time the authors' released training loop against kdarena's, side by side.

The authors' code (github.com/XiaoleiDiao/Competitive-Distillation) is NOT part of this repository.
Fetch it yourself and point ``--code`` at the folder::

    git clone https://github.com/XiaoleiDiao/Competitive-Distillation /tmp/cd-authors
    git -C /tmp/cd-authors checkout 4aaf9b9
    python3 -m venv /tmp/venv-authors
    /tmp/venv-authors/bin/pip install torch torchvision einops tqdm   # their imports (wandb is stubbed)

    PYTHONPATH=. .venv/bin/python benchmarks/authors_code.py --code /tmp/cd-authors \\
        --authors-python /tmp/venv-authors/bin/python --json runs/bench/authors_code.json

What runs (ResNet-32 x 2, CIFAR-100 format, competitive distillation as their code does it):

* ``authors``: their ``train_competitive_distillation.train_one_epoch`` itself, on the models,
  optimizers (AdamW, their ``utils.get_optimizer``) and DataLoader (their ``datasets.dataset.cifar100``:
  Resize, flip, rotation 15, ToTensor, Normalize, one image at a time with PIL) that their own
  functions build. The harness only patches, at run time and in its own process: ``.cuda()`` and
  ``torch.cuda.device_count`` (CPU), ``wandb`` (a stub), torchvision's CIFAR integrity check (the
  data set is synthetic), ``transforms.Resize`` (to ``--sizes``: their ``--input_size`` flag never
  reaches the CIFAR transforms, which always upsample to 224), ``num_workers`` (0: the loader works
  in the timed process, on the same one thread) and the batch size. Their LR scheduler is not
  built (it only runs once per epoch). Steps are counted by the batches the loop pulls.
* ``kdarena-fp32`` / ``kdarena-default``: kdarena's real ``Trainer`` built from
  ``configs/paper/cifar100_authors_code.yaml`` (keys this kdarena does not know yet are dropped and
  listed in the output), each step ``Trainer.train_step`` fed by the real loader; ``fp32`` is
  ``train.precision=fp32 train.channels_last=false`` (their numerics and layout), ``default`` is
  kdarena's defaults (bf16 autocast + channels_last). At 224x224 the CIFAR loader is fed images
  stored at 224x224 (upsampled once, bilinear, before the clock starts): kdarena's CIFAR loader
  does not resize.

Both sides use ONE thread (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``, ``train.threads=1``).
Each side is a long-lived worker process (their loop needs torchvision; kdarena's venv may not load
it), built and warmed up once; then rounds alternate: every worker runs ``--block`` steps while the
others wait idle, in an order that rotates from round to round. img/s = median over rounds; each
ratio = median over rounds of t_authors / t_kdarena measured in the same round.

The data are synthetic (random uint8 images in the CIFAR-100 python-pickle format, written to
``--data`` unless it already holds ``cifar-100-python/``): speed does not depend on pixel values.
Accuracy is not measured here.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "paper" / "cifar100_authors_code.yaml"
MODELS = "resnet32,resnet32"


# ---------------------------------------------------------------------------------------------- data
def write_synthetic_cifar100(folder: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Random uint8 images in the CIFAR-100 'python version' layout (train, test, meta pickles)."""
    import numpy as np

    top = folder / "cifar-100-python"
    if (top / "train").exists():
        return folder
    top.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, size=n).tolist()
        coarse = [f // 5 for f in fine]
        # str keys, pickle protocol 4: readable by torchvision (encoding latin1) and by kdarena's
        # restricted unpickler (encoding bytes) alike
        record = {"filenames": [f"{split}_{i}.png" for i in range(n)], "batch_label": split,
                  "fine_labels": fine, "coarse_labels": coarse, "data": data}
        with open(top / split, "wb") as f:
            pickle.dump(record, f, protocol=4)
    meta = {"fine_label_names": [f"class{i}" for i in range(100)], "coarse_label_names": [f"super{i}" for i in range(20)]}
    with open(top / "meta", "wb") as f:
        pickle.dump(meta, f, protocol=4)
    return folder


# ---------------------------------------------------------------------------------------------- worker protocol
class Channel:
    """Commands on stdin ('run K' / 'quit'); replies as JSON lines on the real stdout. Everything the
    code under test prints goes to stderr, so it cannot corrupt the protocol."""

    def __init__(self) -> None:
        self.out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr

    def send(self, **message) -> None:
        self.out.write(json.dumps(message) + "\n")
        self.out.flush()

    def receive(self) -> int | None:
        line = sys.stdin.readline()
        if not line or line.strip() == "quit":
            return None
        return int(line.split()[1])


# ---------------------------------------------------------------------------------------------- authors' side
def authors_worker(args) -> None:
    channel = Channel()
    import torch

    torch.set_num_threads(1)
    code = Path(args.code).resolve()
    sys.path.insert(0, str(code))
    work = Path(tempfile.mkdtemp(prefix="cd-authors-run-"))
    (work / "data").mkdir()
    (work / "data" / "cifar100").symlink_to(Path(args.data).resolve(), target_is_directory=True)
    (work / "result").mkdir()
    os.chdir(work)  # their data paths are relative ('data/cifar100/')

    # --- run-time patches (nothing of their code is edited) ---
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.cuda.device_count = lambda: 0
    wandb = types.ModuleType("wandb")
    wandb.init = wandb.log = wandb.finish = lambda *a, **k: None
    wandb.config = types.SimpleNamespace(update=lambda *a, **k: None)
    sys.modules["wandb"] = wandb
    import torchvision
    import torchvision.datasets.cifar as tv_cifar
    import torchvision.transforms as T

    tv_cifar.check_integrity = lambda *a, **k: True
    tv_cifar.CIFAR10._check_integrity = lambda self: True
    size = args.size
    original_resize = T.Resize

    class Resize(original_resize):  # their CIFAR transforms hard-code Resize(224)
        def __init__(self, _size, *a, **k):
            super().__init__(size, *a, **k)

    T.Resize = Resize

    import train_competitive_distillation as tcd  # noqa: E402  (their module)
    import utils  # noqa: E402  (their module)

    sys.argv = ["train_competitive_distillation.py", "--model", MODELS, "--batch_size", str(args.batch),
                "--num_workers", "0", "--input_size", str(size)]
    run_args = tcd.parse_args()
    run_args.epochs = 1
    utils.set_random_seed(run_args.seed)
    criterion_ce = torch.nn.CrossEntropyLoss()
    criterion_kl = torch.nn.KLDivLoss(reduction="batchmean")
    model_names, models, train_loader, _ = utils.get_model_and_dataset(run_args)
    optimizers = utils.get_optimizer(run_args, models, len(models))
    for m in models:
        m.train()

    class Paced:
        """Their DataLoader, handed out K batches per 'run K' command; the block's time runs from the
        command to the moment the loop asks for the batch after its K-th step."""

        def __init__(self, loader):
            self.loader, self.dataset = loader, loader.dataset

        def __len__(self) -> int:
            return 10**6

        def __iter__(self):
            it = iter(self.loader)
            while True:
                k = channel.receive()
                if k is None:
                    return
                start = time.perf_counter()
                for _ in range(k):
                    try:
                        batch = next(it)
                    except StopIteration:
                        it = iter(self.loader)
                        batch = next(it)
                    yield batch
                channel.send(seconds=time.perf_counter() - start, steps=k)

    losses = [utils.Totoal_Meter(1, len(train_loader.dataset)) for _ in models]
    channel.send(ready=True, torch=torch.__version__, torchvision=torchvision.__version__, cpu=torch.backends.cpu.get_cpu_capability(),
                 threads=torch.get_num_threads(), batch=args.batch, size=size)
    tcd.train_one_epoch(0, models, Paced(train_loader), optimizers, criterion_ce, criterion_kl, losses, run_args)


# ---------------------------------------------------------------------------------------------- kdarena's side
def kdarena_worker(args) -> None:
    channel = Channel()
    sys.path.insert(0, str(args.kdarena_root))
    import dataclasses

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    from kdarena import config as kconfig
    from kdarena.trainer import Trainer

    raw = kconfig.read_yaml(CONFIG)  # this checkout's config (the kdarena under test may be an older snapshot)
    dropped = []
    sections = {name: kconfig.Config.model_fields[name].annotation for name in ("data", "perturb", "optim", "method", "train")}
    for name, section in sections.items():
        for key in list(raw.get(name, {}) or {}):
            if key not in section.model_fields:
                dropped.append(f"{name}.{key}")
                raw[name].pop(key)
    tokens = args.variant.split("-")  # default | fp32 (= fp32 + NCHW, their numerics and layout) | bf16-nocl | fp32-cl
    overrides = [f"data.root={Path(args.data).resolve()}", "data.download=false", "data.val_size=0",
                 f"data.batch_size={args.batch}", "train.device=cpu", "train.threads=1",
                 "train.progress=false", "train.tensorboard=false", f"output={tempfile.mkdtemp(prefix='kd-bench-')}"]
    if "fp32" in tokens:
        overrides += ["train.precision=fp32", "train.channels_last=" + ("true" if "cl" in tokens else "false")]
    elif "bf16" in tokens:
        overrides += ["train.precision=bf16", "train.channels_last=" + ("false" if "nocl" in tokens else "true")]
    config = kconfig.validate(kconfig.apply_overrides(raw, overrides))

    if args.size != 32:  # serve the CIFAR arrays stored at size x size (upsampled once, before timing)
        import kdarena.data.build as build_module

        original = build_module.load_arrays

        def upsampled(*a, **k):
            out = []
            for ds in original(*a, **k):
                chunks = [F.interpolate(ds.images[i:i + 64].float(), size=(args.size, args.size), mode="bilinear",
                                        align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
                          for i in range(0, len(ds.images), 64)]
                out.append(dataclasses.replace(ds, images=torch.cat(chunks).contiguous()))
            return tuple(out)

        build_module.load_arrays = upsampled
    trainer = Trainer(config, run_dir=Path(config.output) / "run", force=True)
    trainer.group.train()
    loader = trainer.data.train
    shape = tuple(next(iter(loader.iterate(0)))[0].shape)
    if shape[-2:] != (args.size, args.size):
        raise RuntimeError(f"kdarena's loader serves {shape}, not {args.size}x{args.size}: the data layer moved; update the harness")
    state = {"epoch": 0}
    it = loader.iterate(0)

    def next_batch():
        nonlocal it
        try:
            return next(it)
        except StopIteration:
            state["epoch"] += 1
            it = loader.iterate(state["epoch"])
            return next(it)

    import kdarena

    channel.send(ready=True, torch=torch.__version__, cpu=torch.backends.cpu.get_cpu_capability(), kdarena=str(Path(kdarena.__file__).parent), threads=torch.get_num_threads(), batch=args.batch, size=args.size,
                 precision=config.train.precision, channels_last=config.train.channels_last, dropped=dropped)
    while (k := channel.receive()) is not None:
        start = time.perf_counter()
        for _ in range(k):
            x, y = next_batch()
            trainer.train_step(x, y)
            trainer.loop.global_step += 1
        channel.send(seconds=time.perf_counter() - start, steps=k)


# ---------------------------------------------------------------------------------------------- orchestration
class Worker:
    def __init__(self, name: str, cmd: list[str], log: Path):
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        env.pop("PYTHONPATH", None)
        self.name, self.log = name, open(log, "a")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} exited (rc {self.proc.wait()}); see {self.log.name}")
        return json.loads(line)

    def run(self, steps: int) -> float:
        self.proc.stdin.write(f"run {steps}\n")
        self.proc.stdin.flush()
        return self._read()["seconds"]

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except Exception:
            self.proc.kill()
        self.log.close()


def measure(size: int, batch: int, warmup: int, rounds: int, block: int, variants: list[str], args, log: Path) -> dict:
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--data", str(args.data), "--size", str(size), "--batch", str(batch), "--kdarena-root", str(args.kdarena_root)]
    workers = {}
    try:  # built one after the other, so no two builds compete for the cores
        workers["authors"] = Worker("authors", [args.authors_python, me[1], "--worker", "authors", "--code", str(args.code)] + common, log)
        for variant in variants:
            workers[f"kdarena-{variant}"] = Worker(f"kdarena-{variant}", me + ["--worker", "kdarena", "--variant", variant] + common, log)
        names = list(workers)
        for name in names:
            workers[name].run(warmup)
        times = {name: [] for name in names}
        for r in range(rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                times[name].append(workers[name].run(block))
            print(f"  {size}x{size} round {r + 1}/{rounds}: " + "  ".join(f"{n} {batch * block / times[n][-1]:.2f} img/s" for n in names), flush=True)
    finally:
        for w in workers.values():
            w.close()
    result = {"size": size, "batch": batch, "warmup_steps": warmup, "rounds": rounds, "steps_per_round": block,
              "workers": {n: w.info for n, w in workers.items()}, "seconds": times, "variants": {}}
    for name in names:
        per_round = [batch * block / t for t in times[name]]
        entry = {"img_s": statistics.median(per_round), "img_s_rounds": per_round}
        if name != "authors":
            entry["x_authors"] = statistics.median(a / k for a, k in zip(times["authors"], times[name]))
        result["variants"][name] = entry
    return result


def cpu_flags() -> str:
    """The CPU model and its vector extensions (bf16 autocast is only fast with native bf16: AVX-512 bf16 or AMX)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return model + ": " + " ".join(sorted(f for f in flags if f.startswith(("avx", "amx"))))


def table(results: list[dict]) -> str:
    lines = ["| input | batch | loop | img/s (median) | x authors (median of per-round ratios) |", "|---|---|---|---|---|"]
    for res in results:
        for name, v in res["variants"].items():
            ratio = "1.00" if name == "authors" else f"{v['x_authors']:.2f}"
            lines.append(f"| {res['size']}x{res['size']} | {res['batch']} | {name} | {v['img_s']:.2f} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--code", type=Path, help="folder with the authors' code (their commit 4aaf9b9)")
    p.add_argument("--authors-python", default=sys.executable, help="interpreter with torch + torchvision for their code")
    p.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "kdarena-synthetic-cifar100")
    p.add_argument("--sizes", default="32,224")
    p.add_argument("--variants", default="fp32,default",
                   help="kdarena variants at 32x32: fp32 (fp32 + NCHW), default (bf16 + channels_last), bf16-nocl, fp32-cl")
    p.add_argument("--variants224", default="fp32", help="kdarena variants at 224x224 (bf16 on a CPU without native bf16 is very slow)")
    p.add_argument("--batch32", type=int, default=84)
    p.add_argument("--batch224", type=int, default=42)
    p.add_argument("--warmup32", type=int, default=2)
    p.add_argument("--rounds32", type=int, default=4)
    p.add_argument("--block32", type=int, default=1, help="steps per worker per round at 32x32")
    p.add_argument("--warmup224", type=int, default=1)
    p.add_argument("--rounds224", type=int, default=2)
    p.add_argument("--block224", type=int, default=1)
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--kdarena-root", type=Path, default=ROOT,
                   help="kdarena checkout to time (default: this one), e.g. a `git archive` snapshot of a commit")
    p.add_argument("--json", type=Path)
    # worker mode (internal)
    p.add_argument("--worker", choices=["authors", "kdarena"])
    p.add_argument("--variant", default="default")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=84)
    args = p.parse_args(argv)
    if args.worker == "authors":
        return authors_worker(args)
    if args.worker == "kdarena":
        return kdarena_worker(args)
    if args.code is None or not (args.code / "train_competitive_distillation.py").exists():
        p.error("--code must point at a checkout of XiaoleiDiao/Competitive-Distillation")
    args.variants = [v for v in args.variants.split(",") if v]
    args.variants224 = [v for v in args.variants224.split(",") if v]
    write_synthetic_cifar100(args.data, args.n_train, 100)
    log = Path(tempfile.gettempdir()) / "kdarena-authors-bench.log"
    started, load_before = time.time(), os.getloadavg()
    results = []
    for size in [int(s) for s in args.sizes.split(",") if s]:
        big = size != 32
        batch, warmup, rounds, block = ((args.batch224, args.warmup224, args.rounds224, args.block224) if big
                                        else (args.batch32, args.warmup32, args.rounds32, args.block32))
        print(f"{size}x{size}, batch {batch}: {warmup} warm-up steps, {rounds} rounds x {block} steps per loop", flush=True)
        variants = args.variants224 if big else args.variants
        results.append(measure(size, batch, warmup, rounds, block, variants, args, log))
    commit = subprocess.run(["git", "-C", str(args.code), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = {"command": " ".join(sys.argv), "authors_commit": commit or None, "machine": platform.platform(), "cpu": cpu_flags(),
           "cpus": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg(), "seconds_total": time.time() - started,
           "date": time.strftime("%Y-%m-%d %H:%M"), "results": results}
    print(table(results))
    for res in results:
        for name, info in res["workers"].items():
            print(f"  {res['size']}: {name}: {info}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
