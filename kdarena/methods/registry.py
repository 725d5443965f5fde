"""``@register_method("name")``: methods found by name, as timm finds models.

The config's ``method`` section is validated by the registered class's ``Params`` model and the
method built from it; ``kdarena sweep`` presets, report labels and their order, and ``kdarena
methods`` all come from here. A built-in method is one class (plus its tests) and one entry in
``kdarena.methods.BUILT_IN``, which sets the order; a plug-in method is listed after the built-ins.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Literal, TypeVar

from pydantic import create_model

from ..errors import ConfigError
from .base import GroupMethod, MethodParams

_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")
_METHODS: dict[str, type[GroupMethod]] = {}
M = TypeVar("M", bound=type[GroupMethod])
#: the method used when a config's ``method`` section names none
DEFAULT = "cd"


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator: register a :class:`GroupMethod` subclass under ``name``.

    The class's ``Params`` model gets a ``name`` field fixed to ``name``. Registering another
    class under a taken name is an error; re-registering the same class (a module reloaded) is not.
    """
    if not _NAME.match(name):
        raise ValueError(f"method name {name!r} must be lower-case letters, digits, '-' or '_' and start with a letter")

    def decorator(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, GroupMethod)):
            raise TypeError(f"@register_method({name!r}) decorates GroupMethod subclasses, got {cls!r}")
        old = _METHODS.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"method {name!r} is registered already ({old.__module__}.{old.__qualname__})")
        params = cls.Params  # its own model, or the one it inherits
        cls.Params = create_model(f"{cls.__name__}Params", __base__=params, __module__=cls.__module__,
                                  name=(Literal[name], name))  # type: ignore[call-overload]
        cls.name = name
        _METHODS[name] = cls
        return cls

    return decorator


def set_order(order: list[str]) -> None:
    """List ``order`` first, in that order, then every other registered method in registration order."""
    unknown = [name for name in order if name not in _METHODS]
    if unknown:
        raise ValueError(f"cannot order unregistered methods {unknown}")
    rest = {name: cls for name, cls in _METHODS.items() if name not in order}
    ordered = {name: _METHODS[name] for name in order}
    _METHODS.clear()
    _METHODS.update(ordered)
    _METHODS.update(rest)


def names() -> list[str]:
    """Registered method names, the built-ins first in their set order."""
    return list(_METHODS)


def get(name: str) -> type[GroupMethod]:
    try:
        return _METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; registered: {', '.join(_METHODS)} (see `kdarena methods`)") from None


def params_for(raw: dict[str, Any] | MethodParams | None) -> MethodParams:
    """Validate a ``method`` section with the model of the method it names (pydantic errors propagate)."""
    if isinstance(raw, MethodParams):
        return raw
    raw = dict(raw or {})
    return get(str(raw.get("name", DEFAULT))).Params.model_validate({"name": DEFAULT, **raw})


def build(params: MethodParams) -> GroupMethod:
    """The method a validated ``method`` section names, built from it."""
    return get(params.name)(params)


def presets() -> dict[str, list[str]]:
    """Sweep labels -> overrides, in registration order (each method's own presets)."""
    out: dict[str, list[str]] = {}
    for cls in _METHODS.values():
        for label, overrides in (cls.presets or {cls.name: [f"method.name={cls.name}"]}).items():
            out.setdefault(label, list(overrides))
    return out


def label_order() -> list[str]:
    """The order of method labels in reports and plots: presets first, in registration order."""
    return list(presets())


def method_of(config: dict[str, Any]) -> type[GroupMethod] | None:
    """The registered class of a stored run's config dict (None for an unknown name)."""
    name = (config.get("method") or {}).get("name")
    return _METHODS.get(name) if isinstance(name, str) else None
