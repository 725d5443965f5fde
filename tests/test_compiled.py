"""train.compile: CUDA graphs (mode reduce-overhead) on CUDA, and a one-warning fallback when compiling fails."""
from __future__ import annotations

import logging

import pytest
import torch

from kdarena.config import load
from kdarena.engine.build import build_parts
from kdarena.engine.compiled import CompiledRunner, compile_mode

TINY = ["models=[convnet,convnet]", "data.name=digits", "data.train_subset=128", "data.val_size=32", "data.batch_size=32",
        "train.device=cpu", "train.threads=1", "train.precision=fp32", "train.progress=false", "train.tensorboard=false"]



def test_cuda_graphs_are_the_default_compile_mode_on_cuda_only():
    assert compile_mode(None, torch.device("cuda")) == "reduce-overhead"
    assert compile_mode(False, torch.device("cuda")) == "default"
    assert compile_mode(None, torch.device("cpu")) == compile_mode(True, torch.device("cpu")) == "default"


@pytest.mark.parametrize("fused", [False, True])
def test_compile_reaches_torch_compile_with_the_mode(monkeypatch, fused):
    modes = []

    def fake_compile(fn, mode="default", **kwargs):
        modes.append(mode)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    parts = build_parts(load(None, TINY + ["train.compile=true", f"train.fused={str(fused).lower()}"]), torch.device("cpu"))
    assert isinstance(parts.runner, CompiledRunner)
    x = next(iter(parts.data.train.iterate(0)))[0]
    parts.runner(x)
    assert modes and set(modes) == {"default"}  # CPU: no CUDA graphs


@pytest.mark.parametrize("fused", [False, True])
def test_a_failing_compile_falls_back_to_the_same_eager_forward_with_one_warning(monkeypatch, caplog, fused):
    def broken_compile(fn, mode="default", **kwargs):
        def run(*args, **kw):
            raise RuntimeError("cannot capture: data-dependent control flow")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    parts = build_parts(load(None, TINY + ["train.compile=true", f"train.fused={str(fused).lower()}"]), torch.device("cpu"))
    x = next(iter(parts.data.train.iterate(0)))[0]
    with caplog.at_level(logging.WARNING, logger="kdarena"):
        first = parts.runner(x).logits
        second = parts.runner(x).logits
    warnings = [r for r in caplog.records if "could not be compiled" in r.getMessage()]
    assert len(warnings) == 1 and "cannot capture" in warnings[0].getMessage()
    eager = [net(x) for net in parts.group.networks]
    for a, b, c in zip(first, second, eager):
        assert torch.allclose(a, c, atol=1e-6) and torch.allclose(b, c, atol=1e-6)
