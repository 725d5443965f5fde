"""``kdarena.load_model(path)``: a trained network in eval mode and its model card.

``path`` is a safetensors file written by ``kdarena export`` (its card beside it; the file must
match the card's sha256), a run folder, or a run's ``checkpoints/best.pt`` / ``last.pt``. The
module is built from the registry and filled with tensors: nothing in the file is executed.
TorchScript and ONNX exports hold programs; they are for ``torch.jit.load`` and onnxruntime, and
are refused here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from torch import nn

from .. import models
from ..engine.weights import apply_weights, read_safetensors
from ..models.registry import TIMM_PREFIX
from ..records.card import FORMAT_IN_PROSE
from .card import build_card, read_card, sha256_of
from .errors import ExportError
from .source import Ensemble, open_run


def _from_run(run_dir: Path, checkpoint: str, network: str, overrides: Sequence[str]) -> tuple[nn.Module, dict[str, Any]]:
    selected = open_run(run_dir, checkpoint, network, overrides)
    card = build_card(selected, "run", None, None, sha256_of(selected.checkpoint), run_dir)
    return selected.module, card


def load_model(path: str | Path, network: str = "best", checkpoint: str = "best",
               overrides: Sequence[str] = ()) -> tuple[nn.Module, dict[str, Any]]:
    """(module in eval mode, model card). ``network``/``checkpoint`` choose within a run folder (see ``kdarena export``),
    ``overrides`` change its config (``data.root=...`` for a run trained before it recorded its inputs, whose data moved)."""
    path = Path(path)
    if path.is_dir():
        return _from_run(path, checkpoint, network, overrides)
    if path.suffix == ".pt" and path.parent.name == "checkpoints" and path.stem in ("best", "last"):
        return _from_run(path.parent.parent, path.stem, network, overrides)
    if not path.is_file():
        raise ExportError(f"{path} does not exist; give a file made by kdarena export or a run folder")
    if overrides:  # an exported file carries no config to change
        raise ExportError(f"{' '.join(overrides)}: key=value overrides change a run folder's config; {path} is a file")
    card = read_card(path)
    if card["format"] != "safetensors":
        raise ExportError(f"{path} is {FORMAT_IN_PROSE[card['format']]} export, a program kdarena does not load (load it with "
                          f"{'torch.jit.load' if card['format'] == 'torchscript' else 'onnxruntime'} if you trust it); "
                          "kdarena.load_model takes the safetensors export or the run folder")
    channels = card["input"]["shape"][0]
    unknown = [name for name in card["architecture"] if name.strip().lower() not in models.available()
               and not name.strip().lower().startswith(TIMM_PREFIX)]
    if unknown:
        raise ExportError(f"model card of {path} names architecture {unknown[0]!r}, which this kdarena does not build "
                          f"(known: {', '.join(models.available())}); export it with the kdarena that trained it")
    nets = [models.create(name, num_classes=card["num_classes"], in_channels=channels) for name in card["architecture"]]
    module = Ensemble(nets) if card.get("network") == "ensemble" else nets[0]
    apply_weights(module, read_safetensors(path), where=str(path))
    module.eval().requires_grad_(False)
    return module, card
