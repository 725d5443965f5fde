"""What a run hands over: one network of a checkpoint (or the group's ensemble), for inference only.

``--checkpoint best`` is ``checkpoints/best.pt`` (the epoch of the best validation top-1),
``last`` is ``checkpoints/last.pt``. ``--network best`` is the network with the highest validation
top-1 at that checkpoint's epoch (ties: the lower index); it is never chosen on the test set, so
a run without a validation split (``data.val_size=0``) refuses ``best`` for both. The module is
rebuilt from the registry and the checkpoint's tensors only: no optimizer, no RNG state, no
feature hooks or adapters; CPU, float32, eval mode, gradients off. What the network takes in comes from
the run's ``inputs.json`` (written when it started training), so the training data is not needed; a
run trained before that file was written rebuilds its data to learn it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import models
from ..config import Config
from ..data.build import DataBundle, build_data
from ..data.errors import moved_data
from ..errors import DataFilesNotFoundError
from ..engine import checkpoint as ckpt
from ..engine.weights import apply_weights, network_state
from ..records.epoch import accuracy_key, is_evaluated, selection_split
from ..records.folder import CHECKPOINTS, CONFIG_FILE, RunDirError, checkpoint_path, config_path
from ..records.inputs import RunInputs
from ..records.read import DamagedFile, read_inputs, read_records
from .errors import ExportError
from .run_inputs import run_inputs


class Ensemble(nn.Module):
    """The group's ensemble as one module: ``log(mean_i softmax(net_i(x)))``, what ``kdarena eval`` scores."""

    def __init__(self, networks: Sequence[nn.Module]):
        super().__init__()
        self.networks = nn.ModuleList(networks)

    def forward(self, x: Tensor) -> Tensor:
        probs = torch.stack([F.softmax(net(x).float(), dim=1) for net in self.networks]).mean(dim=0)
        return probs.clamp_min(1e-12).log()


@dataclass
class Selected:
    """The module to hand over and the facts its model card records."""

    module: nn.Module
    network: str  # "net1" or "ensemble"
    indices: list[int]
    architecture: list[str]
    config: Config
    checkpoint: Path
    epoch: int
    mid_epoch: bool
    inputs: RunInputs
    data: DataBundle | None  # None: not built (not asked for, or not found where the run trained)
    accuracy: dict[str, Any] = field(default_factory=dict)


def _records(run_dir: Path) -> list[dict[str, Any]]:
    """The run's evaluated epochs; a damaged epoch log is the user's one-line error."""
    try:
        return [r for r in read_records(run_dir) if is_evaluated(r)]
    except DamagedFile as error:
        raise RunDirError(f"{error}; the run's accuracies cannot be trusted, so nothing is chosen from it") from None


def _network_index(choice: str, n: int, record: dict[str, Any] | None, has_val: bool, checkpoint: Path) -> list[int]:
    if choice == "ensemble":
        return list(range(n))
    if choice == "best":
        if not has_val:
            raise ExportError("--network best: the run has no validation split (data.val_size=0), and best is never chosen "
                              "on the test set; give --network INDEX or --network ensemble")
        if record is None or selection_split(record) != "val":
            raise ExportError(f"--network best: the weights in {checkpoint} were never evaluated (a mid-epoch checkpoint); "
                              "give --network INDEX, or --checkpoint best")
        scores = [record[accuracy_key(f"net{i}", "val")] for i in range(n)]
        return [scores.index(max(scores))]
    try:
        index = int(choice)
    except ValueError:
        raise ExportError(f"--network {choice!r}: give best, ensemble or a network index 0..{n - 1}") from None
    if not 0 <= index < n:
        raise ExportError(f"--network {index}: the run has {n} network(s), 0..{n - 1}")
    return [index]


def _accuracy(records: list[dict[str, Any]], key: str, record: dict[str, Any] | None) -> dict[str, Any]:
    """Top-1/top-5 (val and test) of ``key`` at the exported weights, the last epoch and the best-val epoch."""
    def row(r: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"epoch": r["epoch"] + 1}  # epochs completed, as a checkpoint counts them
        out.update({f"{split}_{m}": r[accuracy_key(key, split, m)] for split in ("val", "test") for m in ("top1", "top5")
                    if accuracy_key(key, split, m) in r})
        return out

    if not records:
        return {}
    out = {"selected_on": "val" if selection_split(records[-1]) == "val" else None, "last": row(records[-1])}
    if out["selected_on"]:
        out["best_val"] = row(max(records, key=lambda r: r[accuracy_key(key, "val")]))
    out["exported_weights"] = row(record) if record is not None else None
    return out


def _data(config: Config, overrides: Sequence[str], needed: bool, command: str, path: Path) -> DataBundle | None:
    """The run's data on the CPU. Only wanted (``needed`` False: the run recorded its inputs) and not where the
    run trained: None; an override that points at data must find it."""
    must = needed or any(o.strip().startswith("data.") for o in overrides)
    try:
        ckpt.check_stored_root(config, list(overrides), path)
        return build_data(config, torch.device("cpu"))
    except ckpt.CheckpointError:  # its message names the override
        if must:
            raise
        return None
    except DataFilesNotFoundError as error:
        if must:
            raise moved_data(error, command) from None
        return None


def open_run(run_dir: str | Path, checkpoint: str = "best", network: str = "best", overrides: Sequence[str] = (),
             want_data: bool = False, command: str = "kdarena predict RUN") -> Selected:
    """The network (or ensemble) of ``run_dir`` to export or predict with; :class:`ExportError` and kin for bad input.
    ``want_data``: build the run's data too, if it is still there (``Selected.data``); ``command`` is named in
    the error of a run that must rebuild its data and cannot find it."""
    run_dir = Path(run_dir)
    if not config_path(run_dir).is_file() or not (run_dir / CHECKPOINTS).is_dir():
        raise RunDirError(f"{run_dir} is not a kdarena run (no {CONFIG_FILE} and {CHECKPOINTS}/); give a folder written by kdarena train")
    if checkpoint not in ("best", "last"):
        raise ExportError(f"--checkpoint {checkpoint!r}: give best or last")
    records = _records(run_dir)
    has_val = bool(records) and selection_split(records[-1]) == "val"
    if checkpoint == "best" and records and not has_val:
        raise ExportError(f"--checkpoint best: {run_dir} has no validation split (data.val_size=0), so its best.pt was chosen "
                          "on the test set; use --checkpoint last")
    path = checkpoint_path(run_dir, checkpoint)
    state = ckpt.load(path, required=ckpt.EVAL_KEYS)
    config = ckpt.stored_config(state, list(overrides), path, check_root=False)  # checked where the data is built
    epoch, mid_epoch = int(state["epoch"]), bool(state.get("batch_in_epoch", 0))
    # the record of the checkpoint's epoch (the last one written, should an interrupted epoch have been redone)
    record = next((r for r in reversed(records) if r["epoch"] + 1 == epoch), None) if not mid_epoch else None
    indices = _network_index(network, len(config.models), record, has_val, path)
    try:
        inputs = read_inputs(run_dir)
    except DamagedFile as error:
        raise RunDirError(f"{error}; the run's inputs cannot be trusted, so nothing is exported from it") from None
    data = _data(config, overrides, inputs is None, command, path) if inputs is None or want_data else None
    if inputs is None:  # a run trained before inputs.json: its data says what the networks take in
        inputs = run_inputs(data)
    nets = []
    for i in indices:
        net = models.create(config.models[i], num_classes=inputs.num_classes, in_channels=inputs.in_channels)
        apply_weights(net, network_state(state["group"], i, config.models, str(path)), where=f"{path} network {i}")
        nets.append(net)
    module = Ensemble(nets) if network == "ensemble" else nets[0]
    module.eval().requires_grad_(False)
    name = f"net{indices[0]}" if network != "ensemble" else "ensemble"
    return Selected(module, name, indices, [config.models[i] for i in indices], config, path, epoch, mid_epoch, inputs,
                    data, _accuracy(records, name, record))
