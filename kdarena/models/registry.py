"""Model registry, the ``feature_layer`` convention and building blocks shared by the zoo.

Every model built by :func:`create` carries a string attribute ``feature_layer``: the dotted
name (as in ``model.named_modules()``) of the module whose forward *output* is the globally
pooled, flattened penultimate feature, i.e. the ``(N, D)`` tensor that feeds the final linear
layer. Feature-distillation losses put a forward hook on that module.
"""
from __future__ import annotations

from typing import Any, Callable, TypeVar

from torch import Tensor, nn

from ..errors import ModelSpecError

Builder = Callable[..., nn.Module]
_B = TypeVar("_B", bound=Builder)

_REGISTRY: dict[str, Builder] = {}
TIMM_PREFIX = "timm:"


def register(name: str) -> Callable[[_B], _B]:
    """Decorator that adds a model builder to the registry under ``name``.

    The builder is called as ``builder(num_classes=..., in_channels=..., **kwargs)`` and must
    return an ``nn.Module``; it should set ``model.feature_layer`` (see the module docstring)
    so feature-based distillation works. A name that is already registered raises ``ValueError``.

    >>> @register("mynet")
    ... def mynet(num_classes: int, in_channels: int = 3) -> nn.Module: ...
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    key = name.strip().lower()
    if key.startswith(TIMM_PREFIX):
        raise ValueError(f"model names starting with {TIMM_PREFIX!r} are reserved for timm models")

    def decorator(builder: _B) -> _B:
        if key in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[key] = builder
        return builder

    return decorator


def available() -> list[str]:
    """Sorted names of the registered models (timm models, ``'timm:NAME'``, are not listed)."""
    return sorted(_REGISTRY)


def create(name: str, num_classes: int, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Build the model ``name`` for ``num_classes`` classes and ``in_channels`` input channels.

    ``name`` is a registry name (see :func:`available`) or ``'timm:NAME'`` for any timm model
    (requires ``pip install 'kdarena[timm]'``). Extra keyword arguments go to the builder
    (e.g. ``dropout`` for the WRNs, ``width_mult`` for MobileNetV2).
    """
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    stripped = name.strip()
    if stripped.lower().startswith(TIMM_PREFIX):
        from .timm_models import create_timm

        model = create_timm(stripped[len(TIMM_PREFIX):], num_classes, in_channels, **kwargs)
    else:
        builder = _REGISTRY.get(stripped.lower())
        if builder is None:
            raise ModelSpecError(
                f"unknown model {name!r}; available: {', '.join(available())}; "
                f"or '{TIMM_PREFIX}NAME' for any timm model"
            )
        model = builder(num_classes=num_classes, in_channels=in_channels, **kwargs)
    layer = getattr(model, "feature_layer", None)
    if isinstance(layer, str) and layer not in dict(model.named_modules()):
        raise ValueError(f"model {name!r} declares feature_layer={layer!r}, which is not one of its modules")
    return model


def feature_layer(model: nn.Module) -> str:
    """Dotted name of the module whose output is ``model``'s ``(N, D)`` penultimate feature."""
    layer = getattr(model, "feature_layer", None)
    if isinstance(layer, str) and layer:
        return layer
    raise ValueError(
        f"{type(model).__name__} has no 'feature_layer' attribute: set model.feature_layer to the "
        "dotted name (from model.named_modules()) of the module whose output is the pooled (N, D) "
        "feature that feeds the classifier, or pass the layer name explicitly"
    )


# --------------------------------------------------------------------------------------------
# Shared building blocks
# --------------------------------------------------------------------------------------------


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
            activation: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    """Conv (no bias, "same" padding) -> BatchNorm -> optional in-place activation."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if activation is not None:
        layers.append(activation(inplace=True))
    return nn.Sequential(*layers)


class GlobalAvgPool(nn.Module):
    """Adaptive average pooling to 1x1 followed by flatten: ``(N, C, H, W) -> (N, C)``.

    The zoo names this module ``pool`` and uses it as the ``feature_layer``.
    """

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3))  # = adaptive_avg_pool2d(x, 1).flatten(1), without a slow path under vmap


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) conv weights, zero conv biases, BatchNorm weight 1 / bias 0.

    Linear layers keep PyTorch's default initialisation.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
