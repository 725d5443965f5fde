"""``kdarena predict MODEL INPUTS...``: class names and probabilities per image, and accuracy on labelled ones.

A run folder's network runs exactly as in ``kdarena eval``: eval mode, the run's precision (``train.precision``;
``auto`` is bf16 on a CPU with native bf16, as in training); an exported file runs in float32, as
onnxruntime and TorchScript run it (its card's ``exported_file`` accuracy is measured so). Then the run's
memory format (``train.channels_last``) and evaluation batch size (``data.eval_batch_size``) by default, inputs
decoded and normalised as the card says. Top-1/top-5 count the labelled images exactly as
:func:`kdarena.engine.evaluate.evaluate_networks` does (``topk`` of the scores, k = min(5, classes)),
so on the same images they equal ``kdarena eval``'s numbers.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..config import DataConfig, TrainConfig
from ..engine.evaluate import autocast_context
from ..progress import progress_bar
from .errors import PredictError
from .inputs import batches, gather
from .load import load_model

FORMATS = ("table", "json", "csv")
MAX_BATCH_SIZE = 1 << 16


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


def _check_batch_size(batch_size: Any, given: bool) -> int:
    """A batch size of 0 or less once predicted on nothing and reported '0 images' with exit 0."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_BATCH_SIZE:
        where = "--batch-size" if given else "the model card's config.data.eval_batch_size"
        raise PredictError(f"{where} is {batch_size!r}: give a whole number of images from 1 to {MAX_BATCH_SIZE}"
                           + ("" if given else "; pass --batch-size"))
    return batch_size


def predict(model: str, inputs: Sequence[str], top_k: int = 5, batch_size: int | None = None, workers: int = 1,
            network: str = "best", checkpoint: str = "best", precision: str | None = None, progress: bool = True,
            max_archive_gb: float | None = None, overrides: Sequence[str] = ()) -> Predictions:
    """Predictions for ``inputs``; ``batch_size`` defaults to the run's, ``precision`` to the run's for a run folder
    (as ``kdarena eval`` runs) and to fp32 for an exported file; ``max_archive_gb``: see
    :func:`kdarena.deploy.inputs.gather`; ``overrides``: see :func:`kdarena.deploy.load.load_model`."""
    if top_k < 1:
        raise PredictError(f"--top-k {top_k}: give at least 1")
    if batch_size is not None:
        _check_batch_size(batch_size, given=True)
    module, card = load_model(model, network=network, checkpoint=checkpoint, overrides=overrides)
    config = card["config"] if isinstance(card.get("config"), dict) else {}
    train, data = config.get("train") or {}, config.get("data") or {}
    # a setting the card's config lacks (a card written by hand, or by an older kdarena) is the config's default
    if batch_size is None:
        batch_size = _check_batch_size(data.get("eval_batch_size", DataConfig.model_fields["eval_batch_size"].default), given=False)
    channels_last = bool(train.get("channels_last", TrainConfig.model_fields["channels_last"].default))
    if precision is None:  # an exported file is a float32 network; a run's network runs as its evaluation did
        precision = train.get("precision", TrainConfig.model_fields["precision"].default) if card["format"] == "run" else "fp32"
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    images = gather(inputs, card["classes"], max_archive_gb)
    if not images.items:
        raise PredictError("no image to predict on among the inputs" + (f" (skipped: {images.skipped[0]})" if images.skipped else ""))
    out = Predictions(card, notes=images.notes)
    classes = card["num_classes"]
    k5, shown = min(5, classes), min(top_k, classes)
    # a bar on a terminal, a line every few seconds in a log
    bar = progress_bar(len(images.items), "predicting", unit="images") if progress and len(images.items) >= 1000 else None
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
            if bar is not None:
                bar.update(len(idx))
    if bar is not None:
        bar.close()
    out.skipped = images.skipped
    if not out.names:  # every image was skipped: nothing was predicted, which is not a success
        raise PredictError(f"none of the {len(images.items)} image(s) could be decoded (first: {images.skipped[0]}); "
                           "give image files Pillow can read")
    return out


# Characters a terminal acts on (newlines, escape sequences, C1 controls, bidirectional overrides): file and
# class names come from the user's files and the card, and a name must not rewrite what the table shows.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` with each control character shown as an escape (``\\x1b``), never acted on."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}",
                        str(text))


def csv_cell(value: str) -> str:
    """A cell a spreadsheet shows as text: one starting with ``= + - @`` (or a tab / CR) would be run as a formula."""
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def _finite(p: float) -> float | None:
    return p if math.isfinite(p) else None  # JSON has no NaN: a bare NaN breaks strict readers


def render(result: Predictions, fmt: str = "table") -> str:
    """The predictions as a table, JSON or CSV (CSV: one row per image; the summary goes to the caller)."""
    names = result.card["classes"]
    label = lambda y: names[y] if y >= 0 else ""  # noqa: E731
    summary = result.summary()
    if fmt == "json":
        rows = [{"image": n, "label": label(y) or None,
                 "top": [{"class": names[c], "probability": _finite(p)} for c, p in top]}
                for n, y, top in zip(result.names, result.labels, result.top)]
        return json.dumps({"network": result.card.get("network"), "architecture": result.card["architecture"],
                           "predictions": rows, "skipped": result.skipped, "summary": summary}, indent=1, allow_nan=False)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        k = max((len(t) for t in result.top), default=0)
        writer.writerow(["image", "label"] + [f"{what}{r + 1}" for r in range(k) for what in ("class", "probability")])
        for n, y, top in zip(result.names, result.labels, result.top):
            writer.writerow([csv_cell(v) for v in [n, label(y)] + [v for c, p in top for v in (names[c], f"{p:.6f}")]])
        return buffer.getvalue().rstrip("\n")
    shown_names = [printable(n) for n in result.names]
    width = min(max((len(n) for n in shown_names), default=5), 60)
    lines = [f"{'image':<{width}}  {'label':<12}  prediction (probability)"]
    for n, y, top in zip(shown_names, result.labels, result.top):
        shown = n if len(n) <= width else "..." + n[-(width - 3):]
        lines.append(f"{shown:<{width}}  {printable(label(y)):<12}  "
                     + "  ".join(f"{printable(names[c])} {p:.4f}" for c, p in top))
    lines.append(summary_line(result))
    return "\n".join(lines)


def summary_line(result: Predictions) -> str:
    s = result.summary()
    what = printable(f"{result.card.get('network')} ({' + '.join(result.card['architecture'])})")
    skipped = f", {s['skipped']} skipped" if s["skipped"] else ""
    if not s["labelled"]:
        return f"{s['images']} images{skipped}; none labelled by a class of the model, so no accuracy; {what}"
    return (f"top-1 {s['top1']:.2f}  top-5 {s['top5']:.2f}  ({s['labelled']} labelled of {s['images']} images{skipped}; {what})")
