"""Evaluation of every network and of the group's ensemble (mean of softmax), reduced across ranks."""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from .distributed import all_reduce_sum
from ..group import Group


def autocast_context(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(group: Group, loader, device: torch.device, precision: str = "fp32") -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and CE of each network (``net{i}/...``) and of the ensemble (``ensemble/...``)."""
    was_training = group.training
    group.eval()
    n = len(group)
    # rows: networks then ensemble; columns: top1 correct, top5 correct, summed CE
    sums = torch.zeros(n + 1, 3, dtype=torch.float64, device=device)
    count = torch.zeros(1, dtype=torch.float64, device=device)
    for x, y in loader:
        with autocast_context(device, precision):
            logits = [net(x).float() for net in group.networks]
        probs = torch.stack([F.softmax(z, dim=1) for z in logits]).mean(dim=0)
        k = min(5, logits[0].shape[1])
        for row, scores in enumerate([*logits, probs.clamp_min(1e-12).log()]):
            top = scores.topk(k, dim=1).indices
            hits = top == y[:, None]
            sums[row, 0] += hits[:, 0].sum()
            sums[row, 1] += hits.any(dim=1).sum()
            sums[row, 2] += F.nll_loss(F.log_softmax(scores, 1) if row < n else scores, y, reduction="sum")
        count += y.shape[0]
    all_reduce_sum(sums)
    all_reduce_sum(count)
    group.train(was_training)
    total = max(float(count.item()), 1.0)
    values = sums.tolist()
    out = {}
    for row in range(n + 1):
        key = f"net{row}" if row < n else "ensemble"
        out[f"{key}/top1"] = 100.0 * values[row][0] / total
        out[f"{key}/top5"] = 100.0 * values[row][1] / total
        out[f"{key}/loss"] = values[row][2] / total
    return out
