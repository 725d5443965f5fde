"""``kdarena eval CHECKPOINT``: rebuild the run's data and group from the checkpoint and evaluate."""
from __future__ import annotations

from typing import Any

from ..data.errors import moved_data
from ..errors import ConfigError, DataFilesNotFoundError
from ..methods import GroupMethod, MethodContext, registry
from . import checkpoint as ckpt
from . import distributed as dist_utils
from .build import build_data_and_group
from .evaluate import evaluate, evaluate_network


def evaluate_checkpoint(path: str, split: str = "test", overrides: list[str] | None = None) -> dict[str, Any]:
    state = ckpt.load(path, required=ckpt.EVAL_KEYS)
    config = ckpt.stored_config(state, overrides or [], path)
    info = dist_utils.DistInfo()
    device = dist_utils.resolve_device(config.train.device, info)
    try:
        data, group = build_data_and_group(config, device, info, registry.build(config.method).needs)
    except DataFilesNotFoundError as error:  # evaluation needs the data itself: name the override that finds it
        raise moved_data(error, "kdarena eval CHECKPOINT") from None
    loader = data.val if split == "val" else data.test
    if loader is None:
        raise ConfigError("the run has no validation split (data.val_size=0); use --split test")
    try:
        group.load_state_dict(state["group"])
    except RuntimeError as error:  # other models, or a data set with other channels / classes
        raise ckpt.CheckpointError(f"checkpoint {path} does not fit the configured models and data set: "
                                   f"{str(error).splitlines()[0]}; evaluate it with the models and data.name it was trained with") from None
    results: dict[str, Any] = {"checkpoint": path, "epoch": state["epoch"], "split": split}
    results.update(evaluate(group, loader, device, config.train.precision, f"evaluating {split}"))
    for name, network in _method_networks(config, data, group, device, state).items():
        for metric, value in evaluate_network(network, loader, device, config.train.precision, f"evaluating {name}").items():
            results[f"{name}/{metric}"] = value
    return results


def _method_networks(config, data, group, device, state: dict[str, Any]) -> dict[str, Any]:
    """The networks the method scores each epoch besides the group's (cd-mean's temporal means, ONE's gated
    ensemble), restored from the checkpoint's method state; none for a method without them."""
    method = registry.build(config.method)
    if type(method).eval_networks is GroupMethod.eval_networks:
        return {}  # only such methods are set up (setting up KD would load its teacher, which eval does not need)
    method.setup(MethodContext(data.num_classes, data.in_channels, device, list(group.networks)))
    if state.get("method"):
        method.load_state_dict(state["method"])
    return method.eval_networks()
