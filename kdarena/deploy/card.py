"""The model card written beside every export (``FILE.card.json``, every field, see
:class:`kdarena.records.card.ModelCard`; ``FILE.card.md``, a short summary for people): building it from a
run's network, rendering it, reading it back.
"""
from __future__ import annotations

import hashlib
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from ..config import to_dict
from ..engine.evaluate import evaluate_network
from ..records.card import CARD_VERSION, FILE_FORMATS, ModelCard
from ..records.read import DamagedFile, read_json, read_summary, validate
from ..version import __version__
from .errors import ExportError
from .source import Selected

#: A card holds the run's config and class names: kilobytes. A larger file is refused unread.
CARD_MAX_BYTES = 4 * 2**20


def card_paths(model: str | Path) -> tuple[Path, Path]:
    """``FILE.card.json`` and ``FILE.card.md`` beside ``FILE`` (several formats of one network never collide)."""
    return Path(f"{model}.card.json"), Path(f"{model}.card.md")


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _versions(fmt: str) -> dict[str, str]:
    out = {"kdarena": __version__, "torch": torch.__version__, "python": platform.python_version()}
    for package in {"safetensors": ["safetensors"], "onnx": ["onnx", "onnxscript"]}.get(fmt, []):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return out


def exported_accuracy(selected: Selected, run_dir: Path) -> dict[str, Any]:
    """The card's ``accuracy`` for an export: the run's records (``measured_in`` the precision it trained and
    evaluated in, e.g. bf16 autocast) and, when the run's data is still there, ``exported_file``: top-1/top-5
    of the network as exported, float32 on the CPU, as onnxruntime and ``kdarena predict FILE`` run it."""
    accuracy = dict(selected.accuracy)
    try:
        accuracy["measured_in"] = read_summary(run_dir).precision or selected.config.train.precision
    except DamagedFile:  # a run still training (no summary yet): its config's setting
        accuracy["measured_in"] = selected.config.train.precision
    data = selected.data
    if data is not None:
        measured: dict[str, Any] = {"epoch": selected.epoch, "precision": "fp32"}
        for split, loader in (("val", data.val), ("test", data.test)):
            if loader is not None:
                result = evaluate_network(selected.module, loader, torch.device("cpu"), "fp32")
                measured.update({f"{split}_top1": result["top1"], f"{split}_top5": result["top5"]})
        accuracy["exported_file"] = measured
    return accuracy


def build_card(selected: Selected, fmt: str, model: Path | None, model_sha256: str | None, checkpoint_sha256: str,
               run_dir: Path) -> dict[str, Any]:
    """The card of ``selected`` written as ``model`` (None: a network taken from a run folder, not a file)."""
    inputs = selected.inputs
    return ModelCard(
        kdarena_model_card=CARD_VERSION,
        file=model.name if model is not None else None,
        format=fmt,
        sha256=model_sha256,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        network=selected.network,
        networks=selected.indices,
        architecture=selected.architecture,
        output="log_mean_probabilities" if selected.network == "ensemble" else "logits",
        num_classes=inputs.num_classes,
        classes=list(inputs.classes),
        input=inputs.input.model_dump(),
        preprocessing=inputs.preprocessing.model_dump(),
        accuracy=selected.accuracy,
        source={"run_dir": str(run_dir), "checkpoint": str(selected.checkpoint), "checkpoint_sha256": checkpoint_sha256,
                "epoch": selected.epoch, "mid_epoch": selected.mid_epoch},
        versions=_versions(fmt),
        config=to_dict(selected.config),
    ).as_written()


def markdown(card: dict[str, Any]) -> str:
    acc = card.get("accuracy") or {}
    trained_in = f" ({acc['measured_in']})" if acc.get("measured_in") else ""

    def line(label: str, row: dict[str, Any] | None) -> str:
        if not row:
            return f"| {label} | - | - | - |"
        cell = lambda key: f"{row[key]:.2f}" if key in row else "-"  # noqa: E731
        return f"| {label} | {row['epoch']} | {cell('val_top1')} | {cell('test_top1')} |"

    prep = card["preprocessing"]
    classes = ", ".join(card["classes"][:20]) + (" ..." if len(card["classes"]) > 20 else "")
    return "\n".join([
        f"# {card['file']}: {card['network']} ({' + '.join(card['architecture'])})",
        "",
        f"- format: {card['format']}; output: {card['output']} for {card['num_classes']} classes ({classes})",
        f"- input: float32 NCHW {card['input']['shape']}; " + "; ".join(prep["steps"][:3]),
        f"- mean {[round(v, 4) for v in prep['mean']]}, std {[round(v, 4) for v in prep['std']]}",
        f"- from {card['source']['checkpoint']} (epoch {card['source']['epoch']}, sha256 {card['source']['checkpoint_sha256'][:16]}...)",
        f"- sha256 {card['sha256']}; kdarena {card['versions']['kdarena']}, torch {card['versions']['torch']}",
        "",
        "| weights | epoch | val top-1 | test top-1 |",
        "|---|---|---|---|",
        *([line("exported file (fp32)", acc["exported_file"])] if acc.get("exported_file") else []),
        line(f"exported weights{trained_in}", acc.get("exported_weights")),
        line(f"last epoch{trained_in}", acc.get("last")),
        line(f"best val epoch{trained_in}", acc.get("best_val")),
        "",
        "The exported file's fp32 accuracy was " + ("measured at export." if acc.get("exported_file") else
                                                    "not measured (the run's data was not found at export); the rows "
                                                    f"above are the run's own, measured in {acc.get('measured_in') or 'its precision'}."),
        f"Selected on: {acc.get('selected_on') or 'nothing (no validation split)'}. Every field: {card['file']}.card.json.",
        "",
    ])


def read_card(model: str | Path) -> dict[str, Any]:
    """The card beside ``model``, checked field by field and against the file (its sha256); :class:`ExportError`
    otherwise."""
    path = card_paths(model)[0]
    if not path.is_file():
        raise ExportError(f"{model} has no model card beside it ({path.name}); use a file written by kdarena export")
    try:
        card = read_json(path, CARD_MAX_BYTES)
        validate(path, ModelCard, card)
    except DamagedFile as error:
        raise ExportError(f"model card {error}; export the run again") from None
    if card["format"] not in FILE_FORMATS:
        raise ExportError(f"model card {path}: format {card['format']!r} describes no file; export the run again")
    if sha256_of(model) != card["sha256"]:
        raise ExportError(f"{model} does not match its model card (sha256 differs: the file changed since export); export again")
    return card
