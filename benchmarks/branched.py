"""A branched ResNet-32 with 3 branches against 3 separate ResNet-32: parameters and CPU step time.

    OMP_NUM_THREADS=1 python benchmarks/branched.py [--steps 10] [--batch 64] [--model resnet32]

Parameter counts are exact (CIFAR-100 heads, 100 classes). A step is forward, the method's loss,
backward and an SGD step on random 32x32 images in fp32, on one CPU thread; the time reported is
the median over ``--steps`` steps after two warm-up steps. Compared: 3 separate networks under
DML, the branched model under DML (no gate) and under ONE (with its gate).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from kdarena import models
from kdarena.group import Group
from kdarena.methods import MethodContext, registry
from kdarena.models.branched import BranchedGroup


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() counts a shared tensor once


class Stepper:
    """One training step of a group under a method, on fixed random data."""

    def __init__(self, group: Group, method_name: str, batch: int, classes: int):
        self.group = group.train()
        self.method = registry.get(method_name)()
        self.method.setup(MethodContext(classes, 3, torch.device("cpu"), list(group.networks)))
        self.optimizer = torch.optim.SGD(group.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, 3, 32, 32, generator=generator)
        self.y = torch.randint(0, classes, (batch,), generator=generator)

    def __call__(self) -> float:
        start = time.perf_counter()
        out = self.group(self.x)
        losses = self.method.compute(out.logits, self.y, extras=out.extras)
        self.optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        self.optimizer.step()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet32")
    parser.add_argument("--branches", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    m, name = args.branches, args.model
    separate = Group([models.create(name, args.classes) for _ in range(m)])
    branched = BranchedGroup.build([f"branched:{name}"] * m, args.classes)
    one = BranchedGroup.build([f"branched:{name}"] * m, args.classes, gate=True)
    rows = [(f"{m} x {name} (separate), dml", separate, "dml"),
            (f"branched:{name} x {m}, dml (no gate)", branched, "dml"),
            (f"branched:{name} x {m}, one (gate)", one, "one")]
    base_params, base_time = count(separate), None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch}, fp32, "
          f"median of {args.steps} steps after 2 warm-up steps, groups interleaved step by step")
    print(f"{'group':40s} {'parameters':>12s} {'vs separate':>12s} {'step s':>8s} {'vs separate':>12s}")
    steppers = [Stepper(group, method, args.batch, args.classes) for _, group, method in rows]
    times: list[list[float]] = [[] for _ in rows]
    for i in range(args.steps + 2):  # round robin: a load change on a shared machine hits every group alike
        for stepper, seen in zip(steppers, times):
            elapsed = stepper()
            if i >= 2:  # the first steps allocate
                seen.append(elapsed)
    for (label, group, _), seen in zip(rows, times):
        median = statistics.median(seen)
        base_time = base_time or median
        print(f"{label:40s} {count(group):12,d} {count(group) / base_params:12.2f} {median:8.3f} {median / base_time:12.2f}")

if __name__ == "__main__":
    main()
