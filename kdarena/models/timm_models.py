"""Any timm model as ``create("timm:NAME", num_classes, in_channels)`` (timm is imported lazily).

The model is built with ``timm.create_model(NAME, pretrained=False, num_classes=num_classes,
in_chans=in_channels)``. Its ``feature_layer`` is found generically: the classifier module is
``model.get_classifier()`` (falling back to ``model.pretrained_cfg["classifier"]``, then to the
last ``nn.Linear``), and a parameter-free ``nn.Identity`` child named ``pre_logits`` is attached
to it and run on the classifier's input by a forward pre-hook. So ``feature_layer`` is
``"<classifier name>.pre_logits"`` (e.g. ``"fc.pre_logits"`` for timm ResNets,
``"head.pre_logits"`` for ViTs) and a forward hook on it sees exactly the tensor that feeds the
classifier, i.e. the pre-logits feature (``(N, D)`` for models whose head pools before the
classifier, which is nearly all of them). The state dict is unchanged, so timm checkpoints still
load.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import MissingExtraError, ModelSpecError

TIMM_MISSING = "timm is not installed: pip install 'kdarena[timm]'"


def _run_pre_logits(module: nn.Module, args: tuple) -> tuple:
    # module-level (not a lambda) so models stay picklable / deep-copyable
    return (module.pre_logits(args[0]),) + tuple(args[1:])


def attach_feature_layer(model: nn.Module, classifier_name: str) -> str:
    """Make the input of the submodule ``classifier_name`` hookable as a module output.

    Adds an ``nn.Identity`` child ``pre_logits`` to the classifier (no parameters, so the state
    dict is unchanged), runs it on the classifier's input with a forward pre-hook, sets
    ``model.feature_layer`` to ``"<classifier_name>.pre_logits"`` and returns that name.
    """
    classifier = model.get_submodule(classifier_name) if classifier_name else model
    if not hasattr(classifier, "pre_logits"):
        classifier.add_module("pre_logits", nn.Identity())
        classifier.register_forward_pre_hook(_run_pre_logits)
    name = f"{classifier_name}.pre_logits" if classifier_name else "pre_logits"
    model.feature_layer = name
    return name


def _classifier_name(model: nn.Module) -> str | None:
    names = {id(m): n for n, m in model.named_modules()}
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        try:
            clf = get_classifier()
        except Exception:  # pragma: no cover - depends on the timm model
            clf = None
        if isinstance(clf, (tuple, list)) and clf:  # e.g. distilled DeiT: (head, head_dist)
            clf = clf[0]
        if isinstance(clf, nn.Module) and id(clf) in names and names[id(clf)]:
            return names[id(clf)]
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    cfg_name = cfg.get("classifier") if isinstance(cfg, dict) else None
    if isinstance(cfg_name, (tuple, list)) and cfg_name:
        cfg_name = cfg_name[0]
    if isinstance(cfg_name, str) and cfg_name in dict(model.named_modules()):
        return cfg_name
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def create_timm(name: str, num_classes: int, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    try:
        import timm
    except ImportError as exc:
        raise MissingExtraError(TIMM_MISSING) from exc
    if not name:
        raise ModelSpecError("empty timm model name: use 'timm:NAME', e.g. 'timm:resnet18'")
    if not timm.is_model(name):  # create_model would raise a RuntimeError: the user's typo would read as our bug
        raise ModelSpecError(f"timm has no model {name!r} (timm {getattr(timm, '__version__', '?')}); "
                             f"timm.list_models('*{name.split('.')[0][:8]}*') lists similar names")
    kwargs.setdefault("pretrained", False)
    model = timm.create_model(name, num_classes=num_classes, in_chans=in_channels, **kwargs)
    clf_name = _classifier_name(model)
    if clf_name is not None:
        attach_feature_layer(model, clf_name)
    return model
