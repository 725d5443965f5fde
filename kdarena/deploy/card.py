"""The model card written beside every export: what the file is, how to feed it, what it scored.

``FILE.card.json`` holds every field; ``FILE.card.md`` is a short summary for people. Fields:

* ``file``, ``format`` (safetensors, torchscript, onnx), ``sha256`` of the exported file, ``created``;
* ``network`` (``net1`` or ``ensemble``), ``architecture`` (registry names, one per network;
  ``kdarena.models.create(name, num_classes, in_channels)`` rebuilds each), ``output`` (``logits``, or
  for an ensemble ``log_mean_probabilities``: log of the mean of the networks' softmax);
* ``num_classes``, ``classes`` (class names, index = output column), ``input`` (shape C, H, W);
* ``preprocessing``: exactly what ``kdarena eval`` feeds the network (decode, resize filter, crop,
  scale, per-channel mean/std);
* ``accuracy``: top-1/top-5 on val and test at the exported weights' epoch, at the last epoch and
  at the epoch of the best validation top-1 (from the run's metrics.jsonl);
* ``source``: the run folder, the checkpoint, its sha256 and epoch; ``versions``; ``config``: the run's.
"""
from __future__ import annotations

import hashlib
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from .. import __version__
from ..config import to_dict
from ..data.datasets import ArrayDataset
from ..experiments.run_folders import DamagedFile, read_json, validate
from .errors import ExportError
from .source import Selected

CARD_VERSION = 1
#: A card holds the run's config and class names: kilobytes. A larger file is refused unread.
CARD_MAX_BYTES = 4 * 2**20
RESIZE_STEPS = {
    "area": "resize so the shorter side is {s} (Pillow BOX filter, the area average, when shrinking; BICUBIC when "
            "enlarging), centre-crop {s} x {s} (kdarena.data.decode.decode_bytes)",
    "bilinear": "JPEG draft-mode downscale, resize so the shorter side is {s} (Pillow BILINEAR), centre-crop {s} x {s} "
                "(kdarena.data.imagefolder.decode_image)",
}


def card_paths(model: str | Path) -> tuple[Path, Path]:
    """``FILE.card.json`` and ``FILE.card.md`` beside ``FILE`` (several formats of one network never collide)."""
    return Path(f"{model}.card.json"), Path(f"{model}.card.md")


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def preprocessing(data) -> dict[str, Any]:
    """How the run's evaluation decodes and normalises an image (in-memory sets and streamed folders differ)."""
    dataset = getattr(data.test, "dataset", None)
    if isinstance(dataset, ArrayDataset):
        channels, height, width = (int(v) for v in dataset.images.shape[1:])
        mean, std, resize = dataset.mean, dataset.std, "area"
    else:  # a streamed image folder (FolderLoader over an ImageFolder)
        channels, height, width = dataset.image_shape
        mean, std, resize = data.test.mean, data.test.std, "bilinear"
    return {
        "color": "RGB" if channels == 3 else "L",
        "size": [height, width],
        "resize": resize,
        "steps": [f"decode to {'RGB' if channels == 3 else 'L (grayscale)'}", RESIZE_STEPS[resize].format(s=height),
                  "float32 x * (1 / (255 std)) - mean / std per channel, i.e. (x / 255 - mean) / std", "NCHW batch"],
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
    }


def _versions(fmt: str) -> dict[str, str]:
    out = {"kdarena": __version__, "torch": torch.__version__, "python": platform.python_version()}
    for package in {"safetensors": ["safetensors"], "onnx": ["onnx", "onnxscript"]}.get(fmt, []):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return out


def build_card(selected: Selected, fmt: str, model: Path | None, model_sha256: str | None, checkpoint_sha256: str,
               run_dir: Path) -> dict[str, Any]:
    """The card of ``selected`` written as ``model`` (None: a network taken from a run folder, not a file)."""
    prep = preprocessing(selected.data)
    channels = 3 if prep["color"] == "RGB" else 1
    return {
        "kdarena_model_card": CARD_VERSION,
        "file": model.name if model is not None else None,
        "format": fmt,
        "sha256": model_sha256,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "network": selected.network,
        "networks": selected.indices,
        "architecture": selected.architecture,
        "output": "log_mean_probabilities" if selected.network == "ensemble" else "logits",
        "num_classes": selected.data.num_classes,
        "classes": list(selected.data.classes),
        "input": {"shape": [channels, *prep["size"]], "dtype": "float32", "layout": "NCHW"},
        "preprocessing": prep,
        "accuracy": selected.accuracy,
        "source": {"run_dir": str(run_dir), "checkpoint": str(selected.checkpoint), "checkpoint_sha256": checkpoint_sha256,
                   "epoch": selected.epoch, "mid_epoch": selected.mid_epoch},
        "versions": _versions(fmt),
        "config": to_dict(selected.config),
    }


def markdown(card: dict[str, Any]) -> str:
    acc = card.get("accuracy") or {}

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
        line("exported", acc.get("exported_weights")),
        line("last epoch", acc.get("last")),
        line("best val epoch", acc.get("best_val")),
        "",
        f"Selected on: {acc.get('selected_on') or 'nothing (no validation split)'}. Every field: {card['file']}.card.json.",
        "",
    ])


PositiveInt = Annotated[int, Field(ge=1)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


class _Input(BaseModel):
    model_config = ConfigDict(strict=True)
    shape: Annotated[list[PositiveInt], Field(min_length=3, max_length=3)]


class _Preprocessing(BaseModel):
    model_config = ConfigDict(strict=True)
    color: Literal["RGB", "L"]
    size: Annotated[list[PositiveInt], Field(min_length=2, max_length=2)]
    resize: Literal["area", "bilinear"]
    mean: list[Finite]
    std: list[Annotated[float, Field(gt=0, allow_inf_nan=False)]]


class CardFields(BaseModel):
    """The fields of a card that ``load_model`` and ``kdarena predict`` act on: the card is a file like any other
    a user is handed, and its sha256 vouches for the model file, not for the card itself."""
    model_config = ConfigDict(strict=True, extra="allow")
    kdarena_model_card: Literal[1]
    format: Literal["safetensors", "torchscript", "onnx"]
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    network: str
    architecture: Annotated[list[str], Field(min_length=1)]
    num_classes: PositiveInt
    classes: list[str]
    input: _Input
    preprocessing: _Preprocessing
    config: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> "CardFields":
        channels, height, width = self.input.shape
        prep = self.preprocessing
        if self.network != "ensemble" and len(self.architecture) != 1:
            raise ValueError(f"network {self.network} is one network, but architecture names {len(self.architecture)}")
        if len(self.classes) != self.num_classes:
            raise ValueError(f"classes names {len(self.classes)} classes, num_classes says {self.num_classes}")
        if (channels, prep.color) not in ((3, "RGB"), (1, "L")) or len(prep.mean) != channels or len(prep.std) != channels:
            raise ValueError(f"input.shape has {channels} channels, preprocessing is {prep.color} with "
                             f"{len(prep.mean)} means and {len(prep.std)} stds")
        if prep.size != [height, width]:
            raise ValueError(f"preprocessing.size {prep.size} is not input.shape's {[height, width]}")
        return self


def read_card(model: str | Path) -> dict[str, Any]:
    """The card beside ``model``, checked field by field and against the file (its sha256); :class:`ExportError`
    otherwise."""
    path = card_paths(model)[0]
    if not path.is_file():
        raise ExportError(f"{model} has no model card beside it ({path.name}); use a file written by kdarena export")
    try:
        card = read_json(path, CARD_MAX_BYTES)
        validate(path, CardFields, card)
    except DamagedFile as error:
        raise ExportError(f"model card {error}; export the run again") from None
    if sha256_of(model) != card["sha256"]:
        raise ExportError(f"{model} does not match its model card (sha256 differs: the file changed since export); export again")
    return card
