"""YAML that expands without end or nests without end (issue 36: H8).

A 1 KB "billion laughs" value of ``name``, ``method.alpha``, ``perturb.op_params`` or ``weights``
spun at 100 % CPU and grew ~35 MB/s: the error message called ``repr()`` on the expanded value.
Each case must end within 5 s with one line, allocating under 200 MB.
"""
from __future__ import annotations

import threading
import tracemalloc

import pytest

from kdarena import config as cfg
from kdarena.errors import ConfigError

LAUGHS = "\n".join(["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
                   + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)])


def bomb(where: str) -> str:
    """The nine-level alias bomb (9^9 = 387 million strings once expanded) as the value of ``where``."""
    keys = where.split(".")
    lines = [LAUGHS] + ["  " * depth + f"{key}:" for depth, key in enumerate(keys)]
    return "\n".join(lines) + " *i\n"


def load_within(path, seconds: float = 5.0) -> tuple[BaseException | None, int]:
    """(the error ``cfg.load`` raised, peak bytes allocated), failing the test if it runs past ``seconds``."""
    outcome: list[BaseException | None] = []

    def target():
        try:
            cfg.load(path)
            outcome.append(None)
        except BaseException as error:  # noqa: BLE001  (the test inspects it)
            outcome.append(error)

    tracemalloc.start()
    try:
        worker = threading.Thread(target=target, daemon=True)
        worker.start()
        worker.join(seconds)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not worker.is_alive(), f"loading {path} ran past {seconds} s"
    return outcome[0], peak


@pytest.mark.parametrize("where", ["name", "method.alpha", "perturb.op_params", "weights"])
def test_an_alias_bomb_is_one_line_within_five_seconds(tmp_path, where):
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb(where))
    assert len(path.read_bytes()) < 1024
    error, peak = load_within(path)
    assert isinstance(error, ConfigError), error
    assert str(error) == (f"config file {str(path)!r} expands to more than 100000 values (YAML aliases that repeat one "
                          "another?); write the config out without & and * aliases")
    assert peak < 200e6


def test_deep_nesting_is_one_line(tmp_path):
    """Deeply nested YAML gave a RecursionError traceback."""
    for depth in (100, 100_000):
        path = tmp_path / f"deep{depth}.yaml"
        path.write_text("name: " + "[" * depth + "]" * depth)
        error, _ = load_within(path)
        assert isinstance(error, ConfigError) and "is nested more than 64 levels deep" in str(error), error
        assert "\n" not in str(error)


def test_an_override_value_is_bounded_too():
    with pytest.raises(ConfigError, match="override name is nested more than 64 levels deep"):
        cfg.load(None, ["name=" + "[" * 80 + "]" * 80])


def test_a_bad_value_prints_a_bounded_repr(tmp_path):
    """The message shows a few items of a large value, never all of them."""
    path = tmp_path / "big.yaml"
    path.write_text("name: [" + ", ".join(["x" * 50] * 5000) + "]")
    with pytest.raises(ConfigError) as caught:
        cfg.load(path)
    assert len(str(caught.value)) < 400 and "bad value for 'name'" in str(caught.value)


def test_a_config_file_over_a_mebibyte_is_refused_unread(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text("name: x\n" + "# padding\n" * 120_000)
    with pytest.raises(ConfigError, match=r"is 1200008 bytes, over kdarena's limit of 1048576 bytes"):
        cfg.load(path)
