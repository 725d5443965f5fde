"""Competitive distillation with the Python API, on scikit-learn's 8x8 digits (< 1 minute on a CPU).

Two networks of different widths train together: at every step the one with the lower
cross-entropy teaches the other, and one of them, at random, sees a perturbed batch.

    python examples/quickstart.py [--seed 0] [--epochs 15]
"""
import argparse

import torch

from kdarena import CompetitiveDistillation, Group
from kdarena.data import TensorLoader, load_arrays
from kdarena.models import create
from kdarena.perturb import PerturbationScheduler

parser = argparse.ArgumentParser()
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--epochs", type=int, default=15)
args = parser.parse_args()
torch.manual_seed(args.seed)
torch.set_num_threads(1)  # networks this small gain nothing from more threads

# Data: 1,437 training and 360 test images of 1x8x8, held in memory as uint8.
train_set, test_set = load_arrays("digits")
train_loader = TensorLoader(train_set, batch_size=64, train=True, seed=args.seed)
test_loader = TensorLoader(test_set, batch_size=512, train=False)

# A group of two networks; Group(x) runs each on x, Group([x0, x1]) gives each its own input.
classes, channels = train_set.num_classes, train_set.channels
group = Group([create("convnet", num_classes=classes, in_channels=channels, width=16),
               create("convnet", num_classes=classes, in_channels=channels, width=8)])
method = CompetitiveDistillation(alpha=1.0, beta=0.0, temperature=1.0)  # the paper's rule
perturber = PerturbationScheduler(len(group), ops="paper", every=1, seed=args.seed)
optimizer = torch.optim.AdamW(group.parameters(), lr=3e-3, weight_decay=5e-4)
scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=args.epochs * len(train_loader))

teacher_counts = [0] * len(group)
step = 0
for epoch in range(args.epochs):
    group.train()
    for x, y in train_loader.iterate(epoch):
        # One network, chosen at random, gets a perturbed view (mixup targets are MixedTarget).
        decision = perturber.decide(step)
        inputs, targets = [x] * len(group), [y] * len(group)
        if decision is not None:
            inputs[decision.network], targets[decision.network] = perturber.apply(decision, x, y)
        out = group(inputs)
        losses = method.compute(out.logits, targets)  # lowest CE teaches; students add KL to it
        optimizer.zero_grad(set_to_none=True)
        losses.total.backward()  # teacher outputs are detached: one backward serves every network
        optimizer.step()
        scheduler.step()
        teacher_counts[losses.teacher] += 1
        step += 1


@torch.no_grad()
def accuracy(net, loader):
    net.eval()
    hits = sum((net(x).argmax(1) == y).sum().item() for x, y in loader)
    return 100.0 * hits / loader.num_samples


for i, net in enumerate(group.networks):
    print(f"network {i}: test accuracy {accuracy(net, test_loader):.2f}%  teacher share {teacher_counts[i] / step:.2f}")
