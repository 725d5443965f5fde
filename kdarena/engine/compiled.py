"""torch.compile for the group's forward, with CUDA graphs where they work and a fallback where not.

On a GPU, CIFAR-sized networks are launch-bound: a step costs the launch of hundreds of small
kernels, not their arithmetic. ``torch.compile(mode="reduce-overhead")`` fuses kernels and records
the forward (and its backward) as CUDA graphs, replayed with one launch each. Some models or
options cannot be captured (data-dependent control flow, CPU tensors in the graph, ...); then the
first call raises. :class:`CompiledRunner` catches that once, says why in one warning line, and
runs the same (uncompiled) group from then on, so a run never dies for a speed option.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch

log = logging.getLogger("kdarena")


def compile_mode(cuda_graphs: bool | None, device: torch.device) -> str:
    """``reduce-overhead`` (CUDA graphs) on CUDA unless switched off; ``default`` elsewhere."""
    return "reduce-overhead" if device.type == "cuda" and cuda_graphs is not False else "default"


class CompiledRunner:
    """Call ``compiled``; if one of its first calls fails, warn once and call ``eager`` from then on.

    The first ``guarded_calls`` forwards are guarded: compilation happens on the first, and CUDA graphs
    are recorded after a warm-up call or two. (A failure in a compiled backward is not caught.)
    """

    guarded_calls = 3

    def __init__(self, compiled: Callable, eager: Callable, what: str, on_fallback: Callable[[], None] | None = None):
        self.compiled, self.eager, self.what = compiled, eager, what
        self.on_fallback = on_fallback
        self.calls = 0
        self.fell_back = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.fell_back:
            return self.eager(*args, **kwargs)
        self.calls += 1
        if self.calls > self.guarded_calls:
            return self.compiled(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - any capture/compile failure: fall back, never die for speed
            self.fell_back = True
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            log.warning("%s could not be compiled (%s: %s); training continues without it (train.compile=false "
                        "silences this)", self.what, type(error).__name__, reason[:200])
            if self.on_fallback is not None:
                self.on_fallback()
            return self.eager(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # the runner stands in for the group (e.g. .group, .n)
        return getattr(self.eager, name)
