"""``@register_method("name")``: methods found by name, as timm finds models.

The config's ``method`` section is validated by the registered class's ``Params`` model;
``kdarena sweep`` presets, report labels and their order, and ``kdarena methods`` all come from
here, so a new method is one class (plus its tests) and touches no other file.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Literal, TypeVar

from pydantic import create_model

from .base import GroupMethod, MethodParams

_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")
_METHODS: dict[str, type[GroupMethod]] = {}
M = TypeVar("M", bound=type[GroupMethod])


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
        params = cls.__dict__.get("Params", MethodParams)
        cls.Params = create_model(f"{cls.__name__}Params", __base__=params, __module__=cls.__module__,
                                  name=(Literal[name], name))  # type: ignore[call-overload]
        cls.name = name
        _METHODS[name] = cls
        return cls

    return decorator


def names() -> list[str]:
    """Registered method names in registration order (built-ins first)."""
    return list(_METHODS)


def get(name: str) -> type[GroupMethod]:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(_METHODS)}") from None


def params_for(raw: dict[str, Any] | MethodParams | None, default: str = "cd") -> MethodParams:
    """Validate a ``method`` section with the model of the method it names (pydantic errors propagate)."""
    if isinstance(raw, MethodParams):
        return raw
    raw = dict(raw or {})
    return get(str(raw.get("name", default))).Params.model_validate({"name": default, **raw})


def build(params: MethodParams) -> GroupMethod:
    return get(params.name).from_params(params)


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
