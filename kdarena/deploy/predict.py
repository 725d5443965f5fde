"""``kdarena predict MODEL INPUTS...``: class names and probabilities per image, and accuracy on labelled ones.

The network runs exactly as in ``kdarena eval``: eval mode, the run's precision (``train.precision``;
``auto`` is bf16 on a CPU with native bf16, as in training), memory format (``train.channels_last``)
and evaluation batch size (``data.eval_batch_size``) by default, inputs
decoded and normalised as the card says. Top-1/top-5 count the labelled images exactly as
:func:`kdarena.engine.evaluate.evaluate_networks` does (``topk`` of the scores, k = min(5, classes)),
so on the same images they equal ``kdarena eval``'s numbers.
"""
from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..engine.evaluate import autocast_context
from .errors import PredictError
from .inputs import batches, gather
from .load import load_model

FORMATS = ("table", "json", "csv")


@dataclass
class Predictions:
    card: dict[str, Any]
    names: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)  # per image: (class index, probability)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: {"labelled": 0, "top1": 0, "top5": 0})

    def summary(self) -> dict[str, Any]:
        n = self.counts["labelled"]
        out: dict[str, Any] = {"images": len(self.names), "skipped": len(self.skipped), "labelled": n}
        if n:
            out.update(top1=100.0 * self.counts["top1"] / n, top5=100.0 * self.counts["top5"] / n)
        return out


def predict(model: str, inputs: Sequence[str], top_k: int = 5, batch_size: int | None = None, workers: int = 1,
            network: str = "best", checkpoint: str = "best", precision: str | None = None, progress: bool = True) -> Predictions:
    """Predictions for ``inputs``; ``batch_size`` and ``precision`` default to the run's (as ``kdarena eval`` runs)."""
    if top_k < 1:
        raise PredictError(f"--top-k {top_k}: give at least 1")
    module, card = load_model(model, network=network, checkpoint=checkpoint)
    train = card["config"].get("train", {}) if isinstance(card.get("config"), dict) else {}
    batch_size = batch_size or card["config"].get("data", {}).get("eval_batch_size", 512)
    channels_last = bool(train.get("channels_last", False))
    precision = precision or train.get("precision", "fp32")
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    images = gather(inputs, card["classes"])
    if not images.items:
        raise PredictError("no image to predict on among the inputs" + (f" (skipped: {images.skipped[0]})" if images.skipped else ""))
    out = Predictions(card, notes=images.notes)
    classes = card["num_classes"]
    k5, shown = min(5, classes), min(top_k, classes)
    bar = tqdm(total=len(images.items), desc="predicting", unit="img", leave=False, file=sys.stderr,
               disable=not progress or len(images.items) < 1000)
    with torch.no_grad():
        for x, idx, labels in batches(images, card, batch_size, workers):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast_context(torch.device("cpu"), precision):
                scores = module(x).float()
            probs = F.softmax(scores, dim=1)
            top = scores.topk(shown, dim=1).indices
            for row, i in enumerate(idx):
                out.names.append(images.names[i])
                out.labels.append(labels[row])
                out.top.append([(int(c), float(probs[row, c])) for c in top[row, :shown]])
            y = torch.tensor(labels)
            known = y >= 0
            hits = scores[known].topk(k5, dim=1).indices == y[known, None]  # as evaluate_networks counts
            out.counts["labelled"] += int(known.sum())
            out.counts["top1"] += int(hits[:, 0].sum())
            out.counts["top5"] += int(hits.any(dim=1).sum())
            bar.update(len(idx))
    bar.close()
    out.skipped = images.skipped
    return out


def render(result: Predictions, fmt: str = "table") -> str:
    """The predictions as a table, JSON or CSV (CSV: one row per image; the summary goes to the caller)."""
    names = result.card["classes"]
    label = lambda y: names[y] if y >= 0 else ""  # noqa: E731
    summary = result.summary()
    if fmt == "json":
        rows = [{"image": n, "label": label(y) or None, "top": [{"class": names[c], "probability": p} for c, p in top]}
                for n, y, top in zip(result.names, result.labels, result.top)]
        return json.dumps({"network": result.card.get("network"), "architecture": result.card["architecture"],
                           "predictions": rows, "skipped": result.skipped, "summary": summary}, indent=1)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        k = max((len(t) for t in result.top), default=0)
        writer.writerow(["image", "label"] + [f"{what}{r + 1}" for r in range(k) for what in ("class", "probability")])
        for n, y, top in zip(result.names, result.labels, result.top):
            writer.writerow([n, label(y)] + [v for c, p in top for v in (names[c], f"{p:.6f}")])
        return buffer.getvalue().rstrip("\n")
    width = min(max((len(n) for n in result.names), default=5), 60)
    lines = [f"{'image':<{width}}  {'label':<12}  prediction (probability)"]
    for n, y, top in zip(result.names, result.labels, result.top):
        shown = n if len(n) <= width else "..." + n[-(width - 3):]
        lines.append(f"{shown:<{width}}  {label(y):<12}  " + "  ".join(f"{names[c]} {p:.4f}" for c, p in top))
    lines.append(summary_line(result))
    return "\n".join(lines)


def summary_line(result: Predictions) -> str:
    s = result.summary()
    what = f"{result.card.get('network')} ({' + '.join(result.card['architecture'])})"
    skipped = f", {s['skipped']} skipped" if s["skipped"] else ""
    if not s["labelled"]:
        return f"{s['images']} images{skipped}; none labelled by a class of the model, so no accuracy; {what}"
    return (f"top-1 {s['top1']:.2f}  top-5 {s['top5']:.2f}  ({s['labelled']} labelled of {s['images']} images{skipped}; {what})")
