"""Start networks from weights a user already has (the config's per-model ``weights``).

A source is one of

* an exported ``.safetensors`` (``kdarena export``; an exported ensemble holds ``networks.{i}.*``),
  or any safetensors file of one network's tensors (e.g. a timm checkpoint);
* a kdarena checkpoint (``RUN/checkpoints/best.pt``): network ``network`` of its group;
* a plain state_dict ``.pt``/``.pth`` of tensors (``{"state_dict": ...}`` or ``{"model": ...}``
  wrappers and a DDP ``module.`` prefix are unwrapped).

Reading never runs code: safetensors files hold tensors only, ``.pt`` files go through
:func:`kdarena.engine.checkpoint.safe_load` (``weights_only=True`` and its allow-list), and
TorchScript or ONNX exports (which hold programs) are refused with the fix. Loading is strict:
every tensor of the new network must be there with its shape and nothing else may be, except
that ``reinit_head`` keeps the new network's freshly initialised classifier (its last linear layer)
and ignores the source's, for fine-tuning on another number of classes.
"""
from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..records.card import FORMAT_IN_PROSE
from . import checkpoint as ckpt

log = logging.getLogger("kdarena")
BRANCHED = "branched:"


class WeightsError(UserError):
    """Weights that cannot start a network; the message names the file, the first mismatches and the fix."""


def is_safetensors(path: Path) -> bool:
    """A safetensors file: an 8-byte header length, then the JSON header."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def _program_kind(path: Path) -> str | None:
    """'torchscript' or 'onnx' for exported programs (never loaded as weights), else None."""
    if path.suffix.lower() == ".onnx":
        return "onnx"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any("/code/" in name for name in archive.namelist()):
                return "torchscript"
    return None


def read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise WeightsError(f"{path} is a safetensors file: pip install 'kdarena[export]' (safetensors) to read it") from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # safetensors raises its own SafetensorError for damaged files
        raise WeightsError(f"{path} is not a readable safetensors file ({type(error).__name__}: "
                           f"{str(error).splitlines()[0] if str(error) else ''}); export it again") from None


def network_state(group: dict[str, Tensor], index: int, models: Sequence[str], where: str) -> dict[str, Tensor]:
    """Network ``index``'s own tensors out of a group's state dict (a branch: the shared trunk plus its head)."""
    prefix = f"networks.{index}."
    # heads a method trained beside the classifier (models.heads: MCL's embedding, BYOT's exits) are no part of
    # the network a user exports, predicts with or starts from
    state = {k[len(prefix):]: v for k, v in group.items() if k.startswith(prefix)}
    state = {k: v for k, v in state.items() if not k.startswith("aux_heads.")}
    if models and str(models[0]).startswith(BRANCHED):
        state.update({k: v for k, v in group.items() if k.startswith("trunk.")})
    if not state:
        count = len({k.split(".")[1] for k in group if k.startswith("networks.")})
        raise WeightsError(f"{where}: network {index} is not in it (it holds {count} network(s), 0..{count - 1}); "
                           "give a network index that exists")
    return state


def _unwrap(state: Any) -> Any:
    for key in ("state_dict", "model"):  # the usual wrappers of training scripts
        if isinstance(state, dict) and isinstance(state.get(key), dict) and not any(isinstance(v, Tensor) for v in state.values()):
            state = state[key]
    if isinstance(state, dict) and state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}  # saved from a DDP wrapper
    return state


def read_weights(path: str | Path, network: int = 0, where: str = "weights") -> dict[str, Tensor]:
    """One network's tensors from ``path`` (see the module docstring); :class:`WeightsError` when unusable."""
    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"{where}={str(path)!r} is a folder; give RUN/checkpoints/best.pt, a file made by kdarena export, "
                           "or a state_dict file")
    if path.exists() and not path.is_file():  # a FIFO was "does not exist" (and is never opened: it would block)
        raise WeightsError(f"{where}={str(path)!r} is not a regular file (a device, FIFO or socket); give a weights file")
    if not path.is_file():
        raise WeightsError(f"{where}={str(path)!r} does not exist")
    if is_safetensors(path):
        state: Any = read_safetensors(path)
        if all(k.startswith("networks.") for k in state):  # an exported ensemble
            state = network_state(state, network, [], f"{where}={path}")
        return state
    kind = _program_kind(path)
    if kind:
        raise WeightsError(f"{where}={str(path)!r} is {FORMAT_IN_PROSE[kind]} export, a program kdarena does not load; start from the "
                           "safetensors export (kdarena export RUN --format safetensors) or the run's checkpoint")
    try:
        state = ckpt.safe_load(path, "cpu")
    except ckpt.CheckpointError as error:
        raise WeightsError(f"{where}: {error}") from None
    if isinstance(state, dict) and state.get("format") == ckpt.FORMAT and isinstance(state.get("group"), dict):
        models = (state.get("config") or {}).get("models") or []
        return network_state(state["group"], network, models, f"{where}={path}")
    state = _unwrap(state)
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"{where}={str(path)!r} is neither a kdarena checkpoint nor a state_dict of tensors; "
                           "give a file of tensors (safetensors, or a .pt state_dict)")
    return state


def classifier_keys(network: nn.Module) -> set[str]:
    """The state-dict keys of the classifier: timm's ``get_classifier()``, else the last linear layer."""
    get = getattr(network, "get_classifier", None)
    head = get() if callable(get) else None
    names = {module: name for name, module in network.named_modules()}
    if not isinstance(head, nn.Module) or head not in names:
        linears = [module for module in names if isinstance(module, nn.Linear)]
        if not linears:
            return set()
        head = linears[-1]
    prefix = names[head] + "." if names[head] else ""
    return {prefix + key for key in head.state_dict()}


def _first(items: list[str], limit: int = 3) -> str:
    return ", ".join(items[:limit]) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def apply_weights(network: nn.Module, state: dict[str, Tensor], reinit_head: bool = False, where: str = "weights") -> None:
    """Copy ``state`` into ``network``, strictly (see the module docstring)."""
    own = network.state_dict()
    head = classifier_keys(network) if reinit_head else set()
    missing = [k for k in own if k not in state and k not in head]
    unexpected = [k for k in state if k not in own and k not in head]
    shapes = [k for k in own if k in state and k not in head and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        problems = []
        if shapes:
            problems.append("shapes differ: " + _first([f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in shapes]))
        if missing:
            problems.append("missing: " + _first(missing))
        if unexpected:
            problems.append("unexpected: " + _first(unexpected))
        only_head = shapes and set(shapes) <= classifier_keys(network) and not missing and not unexpected
        fix = ("another number of classes: set reinit_head: true to fine-tune with a new classifier" if only_head
               else "these are weights of another architecture; name the model they were trained as")
        raise WeightsError(f"{where} does not fit {type(network).__name__}: {'; '.join(problems)}; {fix}")
    with torch.no_grad():
        for key, value in own.items():
            if key not in head:
                value.copy_(state[key])  # keeps the network's device, dtype and memory format


def load_start_weights(config: Any, group: nn.Module) -> None:
    """Start ``group.networks[i]`` from ``config.weights[i]`` where given (called once when a run is built)."""
    for i, spec in enumerate(config.weights or []):
        if spec is None:
            continue
        where = f"models[{i}] weights {spec.path}"
        state = read_weights(spec.path, spec.network, f"models[{i}].weights")
        bad = [k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all())]
        if bad:  # such a network trained at chance, without a word
            raise WeightsError(f"{where}: {len(bad)} tensor(s) hold NaN or inf (first {bad[0]}); start from other weights")
        apply_weights(group.networks[i], state, spec.reinit_head, where)
        log.info("network %d (%s) starts from %s%s", i, config.models[i], spec.path,
                 " with a new classifier" if spec.reinit_head else "")
