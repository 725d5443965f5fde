"""train.precision=auto picks bf16 only where the hardware computes in it natively."""
from __future__ import annotations

import pytest
import torch

from kdarena.config import load
from kdarena.engine.evaluate import autocast_context, resolve_precision

CPU = torch.device("cpu")


@pytest.mark.parametrize("avx512_bf16,amx,expected", [(False, False, "fp32"), (True, False, "bf16"), (False, True, "bf16")])
def test_auto_on_cpu_follows_native_bf16_support(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert resolve_precision("auto", CPU) == expected
    with autocast_context(CPU, "auto"):
        out = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert out.dtype == (torch.bfloat16 if expected == "bf16" else torch.float32)


@pytest.mark.parametrize("explicit", ["fp32", "bf16", "fp16"])
def test_an_explicit_precision_is_kept(explicit):
    assert resolve_precision(explicit, CPU) == explicit


def test_auto_is_the_default():
    assert load(None, []).train.precision == "auto"
