"""What every perturbation op shares: the call convention, input checks and parameter validation.

An op is a small object built from its strengths (constructor arguments, reachable from YAML
through ``perturb.op_params``) and called as ``op(x, y, lam, generator=None) -> (x', target)``
on a *normalised* float image batch ``x`` of shape (N, C, H, W), any C and size, CPU or CUDA,
with no per-image Python loop:

- ``generator`` is a :class:`torch.Generator` on ``x.device``; all per-sample randomness
  comes from it (``None`` falls back to torch's global RNG);
- ``lam`` is a scalar drawn by the scheduler, used by the mixing ops only;
- ``x'`` keeps the shape, dtype, device and (channels_last) memory format of ``x``;
  half / bfloat16 inputs are processed in float32 and cast back;
- ``target`` is ``y`` unchanged, or a :class:`~kdarena.losses.MixedTarget` for the
  mixing ops (``mixup``, ``cutmix``).
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, ClassVar, Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from ..losses import MixedTarget

OpResult = Tuple[Tensor, Union[Tensor, MixedTarget]]
Op = Callable[..., OpResult]


class OpParameterError(ValueError):
    """A bad op parameter; ``op`` and ``key`` name it (the config turns them into ``perturb.op_params.<op>.<key>``)."""

    def __init__(self, op: str, key: str, value: Any, message: str):
        super().__init__(message)
        self.op, self.key, self.value = op, key, value


class PerturbOp:
    """Base class: subclasses set ``name`` and implement ``__call__(x, y, lam, generator=None)``.

    The constructor's keyword arguments are the op's parameters; :meth:`params` returns them
    (as set, after validation) so a scheduler can record them in its state_dict.
    """

    name: ClassVar[str] = ""

    @classmethod
    def param_names(cls) -> Tuple[str, ...]:
        return tuple(p for p in inspect.signature(cls.__init__).parameters if p != "self")

    def params(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in self.param_names()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.params() == self.params()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), tuple(self.params().items())))

    def __call__(self, x: Tensor, y: Tensor, lam: float, generator: Optional[torch.Generator] = None) -> OpResult:
        raise NotImplementedError

    # -- parameter validation (one-line messages naming op, key, value and the fix) -----------
    def _bad(self, key: str, value: Any, expected: str) -> OpParameterError:
        return OpParameterError(self.name, key, value, f"op {self.name}: parameter {key} must be {expected}, got {value!r}")

    def _number(self, key: str, value: Any, low: float = -math.inf, high: float = math.inf,
                expected: Optional[str] = None) -> float:
        expected = expected or f"a finite number in [{low}, {high}]"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._bad(key, value, expected)
        value = float(value)
        if not (math.isfinite(value) and low <= value <= high):
            raise self._bad(key, value, expected)
        return value

    def _range(self, key: str, value: Any, low: float = -math.inf, high: float = math.inf,
               positive: bool = False, expected: Optional[str] = None) -> Tuple[float, float]:
        """A (lo, hi) pair with low <= lo <= hi <= high (lo > 0 too when ``positive``); lists accepted (YAML)."""
        expected = expected or f"a pair [lo, hi] with {low} {'<' if positive else '<='} lo <= hi <= {high}"
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
            raise self._bad(key, value, expected)
        lo, hi = value
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in (lo, hi)):
            raise self._bad(key, value, expected)
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi) and low <= lo <= hi <= high) or (positive and lo <= 0):
            raise self._bad(key, value, expected)
        return (lo, hi)

    def _clamp(self, value: Any) -> Optional[Tuple[float, float]]:
        if value is None:
            return None
        expected = "null or a pair [lo, hi] with lo < hi, e.g. [0, 1]"
        lo, hi = self._range("clamp", value, expected=expected)
        if lo == hi:
            raise self._bad("clamp", value, expected)
        return (lo, hi)


def check_input(x: Tensor, generator: Optional[torch.Generator]) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"perturbation ops expect an image batch of shape (N, C, H, W), got {shape}")
    if not x.is_floating_point():
        raise ValueError(
            f"perturbation ops expect a normalised floating-point batch, got dtype {x.dtype}; "
            "convert and normalise the images first"
        )
    if generator is not None:
        gdev = torch.device(generator.device)
        if gdev.type != x.device.type or (
            gdev.index is not None and x.device.index is not None and gdev.index != x.device.index
        ):
            raise ValueError(
                f"generator is on {gdev} but the batch is on {x.device}; "
                f"pass torch.Generator(device={str(x.device)!r})"
            )


def work(x: Tensor) -> Tensor:
    """The batch in the dtype the op computes in (float32 for half / bfloat16)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def finish(out: Tensor, x: Tensor, clamp: Optional[Tuple[float, float]] = None) -> Tensor:
    """Clamp (if asked, in the compute dtype), cast back to x's dtype and give the result x's memory format."""
    if clamp is not None:
        out = out.clamp(clamp[0], clamp[1])
    out = out.to(dtype=x.dtype)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return out.contiguous(memory_format=torch.channels_last)
    if x.is_contiguous():
        return out.contiguous()
    return out


def uniform(n: int, low: float, high: float, generator: Optional[torch.Generator], ref: Tensor) -> Tensor:
    u = torch.rand(n, generator=generator, device=ref.device, dtype=ref.dtype)
    return low + (high - low) * u


def permutation(n: int, generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    # argsort of uniforms: works with any device generator (no randperm generator quirks).
    return torch.argsort(torch.rand(n, generator=generator, device=device))
