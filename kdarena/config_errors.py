"""Configuration errors as one line for the user: the key, the bad value and the fix.

:func:`format_error` turns pydantic's ``ValidationError`` for a model (the whole config, or one
method's section with ``prefix=("method",)``) into that line.
"""
from __future__ import annotations

import reprlib
from typing import Any

from pydantic import BaseModel, ValidationError

from .methods import registry as method_registry
from .methods.base import MethodParams


class _KeyValueError(ValueError):
    """A cross-field check that failed on one key (so the message can name the key and its value)."""

    def __init__(self, key: str, value: Any, message: str):
        super().__init__(message)
        self.key, self.value = key, value


class _FormattedError(ValueError):
    """An error whose message is already the final one-line text (a method section's own error)."""


def _valid_keys(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _section_at(loc: tuple, root: type[BaseModel]) -> type[BaseModel]:
    model: type[BaseModel] = root
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            break
    return model


def _field_loc(loc: tuple, root: type[BaseModel]) -> tuple:
    """``loc`` without pydantic's union-member tags: ('perturb', 'ops', "literal[...]") -> ('perturb', 'ops')."""
    model: type[BaseModel] = root
    out: list[str] = []
    for i, part in enumerate(loc):
        field = model.model_fields.get(part)
        if field is None:
            break
        out.append(part)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
            continue
        rest = loc[i + 1:]
        if rest and all(p.isdigit() for p in rest):  # an item of a list or tuple
            out.extend(rest)
        break
    return tuple(out) if out else loc


def _message(entry: dict) -> str:
    message = entry["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    return " ".join(message.split())  # one line


def format_error(error: ValidationError, root: type[BaseModel], prefix: tuple = ()) -> str:
    """One line for the first problem; ``root``/``prefix`` format a nested model's errors (a method's section)."""
    errors = error.errors()
    first = errors[0]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, _FormattedError):
        return str(cause)
    raw_loc = tuple(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        key = ".".join(prefix + raw_loc)
        section = _section_at(raw_loc[:-1], root)
        where = ".".join(prefix + raw_loc[:-1]) or "the top level"
        shown_key = key if key.isprintable() else repr(key)[1:-1]
        return f"unknown key '{shown_key}'{_owner_hint(root, raw_loc)}; valid keys in {where}: {', '.join(_valid_keys(section))}"
    loc = _field_loc(raw_loc, root)
    key = ".".join(prefix + loc) or "config"
    value = first.get("input")
    if isinstance(cause, _KeyValueError):
        key, value = cause.key, cause.value
    shown = "" if isinstance(value, dict) else f" (got {_short_repr(value)})"
    # a union field (e.g. perturb.ops, data.val_size) fails once per member: report them together
    same = [e for e in errors if _field_loc(tuple(str(p) for p in e["loc"]), root) == loc]
    messages: list[str] = []
    for entry in same:
        if _message(entry) not in messages:
            messages.append(_message(entry))
    message = "; or ".join(messages)
    if first["type"] == "string_pattern_mismatch" and loc == ("train", "device"):
        message = "must be auto, cpu, cuda, cuda:N, mps or xpu"
    hint = _default_hint(loc, root, prefix) if not isinstance(cause, _KeyValueError) else ""
    others = len(errors) - len(same)
    more = f" (and {others} more problem(s))" if others > 0 else ""
    return f"bad value for '{key}'{shown}: {message}{hint}{more}"


def _owner_hint(root: type[BaseModel] | None, loc: tuple) -> str:
    """' for method dml (rule belongs to method cd)' when an option of another method was given."""
    if not issubclass(root, MethodParams) or len(loc) != 1:
        return ""
    name = root.model_fields["name"].default
    owners = [m for m in method_registry.names() if loc[0] in method_registry.get(m).Params.model_fields]
    belongs = f" ({loc[0]} belongs to method {', '.join(owners)})" if owners else ""
    return f" for method {name}{belongs}"


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 4, 4, 4, 60, 60


def _short_repr(value: Any, limit: int = 80) -> str:
    """A bounded repr: ``repr()`` of a YAML alias bomb expanded it in full (100 % CPU, memory without end)."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _default_hint(loc: tuple, root: type[BaseModel], prefix: tuple = ()) -> str:
    """``; default: X`` for a plain field (the fix: set a valid value such as the default)."""
    if not loc:
        return ""
    field = _section_at(loc[:-1], root).model_fields.get(loc[-1])
    if field is None or field.default_factory is not None:
        return ""
    default = field.default
    key = ".".join(prefix + loc)
    if isinstance(default, bool):
        return f"; e.g. the default {key}={str(default).lower()}"
    if isinstance(default, (int, float, str)):
        return f"; e.g. the default {key}={default}"
    return ""
