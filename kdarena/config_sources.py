"""Where a run's raw configuration comes from: a YAML file and ``key=value`` overrides on top of it.

Both give plain dicts (validated afterwards by :func:`kdarena.config.validate`); every fault is a
one-line :class:`ConfigError` naming the file or the override and the fix.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from . import safe_files
from .errors import ConfigError
from .methods import registry as method_registry


def parse_override(text: str) -> tuple[list[str], Any]:
    """``optim.lr=0.05`` -> (['optim', 'lr'], 0.05). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (e.g. optim.lr=0.05)")
    key, value = text.split("=", 1)
    path = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in path):
        raise ConfigError(f"override {text!r} has an empty key (e.g. optim.lr=0.05)")
    try:
        parsed = _load_bounded(value, f"override {key.strip()}") if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return path, parsed


# A config is kilobytes and a few hundred values; YAML aliases can make 1 KB expand without end (a
# "billion laughs" value of `name` once grew 35 MB/s while an error message printed it), and deep
# nesting overflows the parser's recursion. Every YAML text kdarena reads is checked against these first.
MAX_YAML_BYTES = 1 << 20
MAX_VALUES = 100_000  # values counted as if every alias were written out
MAX_DEPTH = 64


def check_bounds(value: Any, where: str) -> None:
    """Refuse (one line) a value that expands past :data:`MAX_VALUES` or nests past :data:`MAX_DEPTH`;
    the walk stops at the limit, so an alias bomb costs at most that many steps."""
    count, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise ConfigError(f"{where} expands to more than {MAX_VALUES} values (YAML aliases that repeat one another?); "
                              "write the config out without & and * aliases")
        if depth > MAX_DEPTH:
            raise ConfigError(f"{where} is nested more than {MAX_DEPTH} levels deep; a kdarena config has a few levels")
        if isinstance(node, dict):
            stack.extend((item, depth + 1) for pair in node.items() for item in pair)
        elif isinstance(node, (list, tuple)):
            stack.extend((item, depth + 1) for item in node)


class _DepthBoundLoader(yaml.SafeLoader):
    """PyYAML's safe loader, stopping at :data:`MAX_DEPTH` while it composes (its composer recurses:
    100,000 brackets were a RecursionError, and slow to reach)."""

    where = ""
    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise ConfigError(f"{self.where} is nested more than {MAX_DEPTH} levels deep; a kdarena config has a few levels")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _load_bounded(text: str, where: str) -> Any:
    """``yaml.safe_load`` bounded in depth and expansion (``yaml.YAMLError`` for bad syntax, as safe_load)."""
    loader = _DepthBoundLoader(text)
    loader.where = where
    try:
        value = loader.get_single_data()
    finally:
        loader.dispose()
    check_bounds(value, where)
    return value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is a value, not a section")
            node = child
        if path == ["method", "name"]:
            _switch_method(node, value)
        if path == ["method"] and isinstance(value, dict) and isinstance(node.get("method"), dict) and "name" in value:
            _switch_method(node["method"], value["name"])
        if isinstance(value, dict) and isinstance(node.get(path[-1]), dict):
            # a mapping sets the keys it names, like one override per key: `optim={lr: 2}` keeps optim.epochs
            _merge(node[path[-1]], value)
        else:
            node[path[-1]] = value
    return raw


def _merge(into: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


def _switch_method(section: dict[str, Any], name: Any) -> None:
    """``method.name=X`` on a section written for another method keeps only the options X also has.

    So ``--methods independent,dml,cd`` over a config written for cd means "the same settings where
    they apply" (dml keeps alpha and temperature, independent keeps nothing), while an option of
    another method written by hand (in YAML or a later override) is still an error.
    """
    old = section.get("name", method_registry.DEFAULT)
    if name == old or not isinstance(name, str) or name not in method_registry.names():
        return
    accepted = method_registry.get(name).Params.model_fields
    for key in [k for k in section if k not in accepted]:
        del section[key]


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory; give a YAML file (see configs/ for examples)")
    if path.exists() and not path.is_file():  # /dev/null, a FIFO, a socket
        raise ConfigError(f"config file {str(path)!r} is not a regular file; give a YAML file (see configs/ for examples)")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; see configs/ for examples")
    try:
        text = safe_files.read_text(path, MAX_YAML_BYTES)
    except safe_files.SafeFileError as error:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {error}") from None
    try:
        raw = _load_bounded(text, f"config file {str(path)!r}") or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(error, "problem", None) or error).split())
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values")
    return raw
