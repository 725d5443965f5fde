"""Evaluation of every network and of the group's ensemble (mean of softmax), reduced across ranks."""
from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..progress import progress_bar
from .distributed import all_reduce_sum
from ..group import Group
from ..records.epoch import BEFORE_TRAINING, accuracy_key, is_before_training, selection_split


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 where the hardware computes in it natively (CUDA with bf16, CPUs with AVX-512 BF16 or
    AMX), fp32 elsewhere -- on a CPU without native bf16, bf16 autocast is emulated and several times slower."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return "bf16"
    return "fp32"


def autocast_context(device: torch.device, precision: str):
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate_networks(networks: Sequence[nn.Module], loader, device: torch.device, precision: str = "fp32",
                      ensemble: bool = True, progress: str | None = None) -> list[dict[str, float]]:
    """Top-1 / top-5 accuracy (%) and mean CE of each network, then (``ensemble``) of the mean of their softmax;
    ``progress``: shown as the description of a progress bar over the batches (None: no bar)."""
    modes = [net.training for net in networks]
    for net in networks:
        net.eval()
    n = len(networks)
    rows = n + (1 if ensemble else 0)
    # rows: networks then ensemble; columns: top1 correct, top5 correct, summed CE
    sums = torch.zeros(rows, 3, dtype=torch.float64, device=device)
    count = torch.zeros(1, dtype=torch.float64, device=device)
    bar = progress_bar(len(loader), progress, unit="batches") if progress else None
    for x, y in loader:
        with autocast_context(device, precision):
            logits = [net(x).float() for net in networks]
        scores_all = list(logits)
        if ensemble:
            probs = torch.stack([F.softmax(z, dim=1) for z in logits]).mean(dim=0)
            scores_all.append(probs.clamp_min(1e-12).log())
        k = min(5, logits[0].shape[1])
        for row, scores in enumerate(scores_all):
            top = scores.topk(k, dim=1).indices
            hits = top == y[:, None]
            sums[row, 0] += hits[:, 0].sum()
            sums[row, 1] += hits.any(dim=1).sum()
            sums[row, 2] += F.nll_loss(F.log_softmax(scores, 1) if row < n else scores, y, reduction="sum")
        count += y.shape[0]
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    all_reduce_sum(sums)
    all_reduce_sum(count)
    for net, mode in zip(networks, modes):
        net.train(mode)
    total = max(float(count.item()), 1.0)
    return [{"top1": 100.0 * v[0] / total, "top5": 100.0 * v[1] / total, "loss": v[2] / total} for v in sums.tolist()]


def evaluate(group: Group, loader, device: torch.device, precision: str = "fp32", progress: str | None = None) -> dict[str, float]:
    """Every network of the group (``net{i}/top1``, ``/top5``, ``/loss``) and their ensemble (``ensemble/...``)."""
    results = evaluate_networks(list(group.networks), loader, device, precision, progress=progress)
    names = [f"net{i}" for i in range(len(group))] + ["ensemble"]
    return {f"{name}/{key}": value for name, result in zip(names, results) for key, value in result.items()}


def evaluate_network(network: nn.Module, loader, device: torch.device, precision: str = "fp32",
                     progress: str | None = None) -> dict[str, float]:
    """One network alone: ``{"top1", "top5", "loss"}``."""
    return evaluate_networks([network], loader, device, precision, ensemble=False, progress=progress)[0]


def evaluate_splits(group: Group, extra: dict[str, nn.Module], data, device: torch.device, precision: str,
                    progress: bool = False) -> dict[str, float]:
    """``net{i}/{split}_top1`` etc. for the val and test splits, for the group, its ensemble and ``extra`` networks,
    and ``eval_seconds``, the time it took; ``progress``: a bar (or plain lines) per split and network."""
    started = time.perf_counter()
    record: dict[str, float] = {}
    for split, loader in (("val", data.val), ("test", data.test)):
        if loader is None:
            continue
        for key, value in evaluate(group, loader, device, precision, f"evaluating {split}" if progress else None).items():
            name, metric = key.split("/")
            record[f"{name}/{split}_{metric}"] = value
        for name, network in extra.items():  # e.g. temporal-mean copies
            for metric, value in evaluate_network(network, loader, device, precision, f"evaluating {name} on {split}" if progress else None).items():
                record[f"{name}/{split}_{metric}"] = value
    record["eval_seconds"] = time.perf_counter() - started
    return record


def start_record(group: Group, extra: dict[str, nn.Module], data, device: torch.device, precision: str,
                 progress: bool = False) -> dict:
    """The evaluation of a run's starting weights (``weights``) before its first epoch: it shows where training
    starts (a network restarted from its own checkpoint scores what it ended with)."""
    return {"epoch": 0, BEFORE_TRAINING: True, "step": 0, **evaluate_splits(group, extra, data, device, precision, progress)}


def epoch_line(record: dict, n: int) -> str:
    """The one line logged per epoch: accuracies, teacher shares (methods with a teacher), speed."""
    split = selection_split(record)
    accs = " ".join(f"{record[accuracy_key(f'net{i}', split)]:.2f}" for i in range(n) if accuracy_key(f"net{i}", split) in record)
    if is_before_training(record):
        return f"epoch 0 (the starting weights): {split} top1 [{accs}]"
    shares = " ".join(f"{record[f'net{i}/teacher_share']:.2f}" for i in range(n) if f"net{i}/teacher_share" in record)
    teacher = f" teacher share [{shares}]" if shares else ""
    return f"epoch {record['epoch'] + 1}: {split} top1 [{accs}]{teacher} {record['images_per_s']:.0f} img/s"
