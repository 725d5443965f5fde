"""``kdarena eval CHECKPOINT``: rebuild the run's data and group from the checkpoint and evaluate."""
from __future__ import annotations

from typing import Any

import torch

from . import checkpoint as ckpt
from . import distributed as dist_utils
from .build import build_data, build_group
from .config import apply_overrides, validate
from .evaluate import evaluate


def evaluate_checkpoint(path: str, split: str = "test", overrides: list[str] | None = None) -> dict[str, Any]:
    state = ckpt.load(path)
    config = validate(apply_overrides(state["config"], overrides or []))
    device = dist_utils.resolve_device(config.train.device, dist_utils.DistInfo())
    data = build_data(config, device)
    loader = data.val if split == "val" else data.test
    if loader is None:
        raise ValueError("the run has no validation split (data.val_size=0); use --split test")
    group = build_group(config, data.num_classes, data.in_channels).to(device)
    if config.train.channels_last:
        group.to(memory_format=torch.channels_last)
    group.build_adapters(next(iter(data.train.iterate(0, 0)))[0])
    group.load_state_dict(state["group"])
    results: dict[str, Any] = {"checkpoint": path, "epoch": state["epoch"], "split": split}
    results.update(evaluate(group, loader, device, config.train.precision))
    return results
