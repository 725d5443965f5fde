"""The op registry, the named pools and the two look-ups: :func:`get_op` and :func:`resolve_ops`.

Pools: ``PAPER_POOL`` (mixing, splicing, noise injection, warping, crop scale [0.3, 0.7])
and ``CODE_POOL`` (the authors' released code: mixup, N(0, 1) noise, colour jitter, blur,
horizontal flip, vertical flip, rotation up to 30 degrees).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence, Tuple, Type, Union

from .base import OpParameterError, PerturbOp
from .geometry import Crop, HFlip, Rotate, VFlip, Warp
from .ops import Blur, CutMix, Jitter, Mixup, Noise

#: Op classes by name (build one with :func:`get_op`).
OP_CLASSES: Dict[str, Type[PerturbOp]] = {
    cls.name: cls for cls in (Mixup, CutMix, Noise, Warp, Crop, Jitter, Blur, HFlip, VFlip, Rotate)
}
#: Default instances by name (the module-level ``mixup``, ``noise``, ... of :mod:`kdarena.perturb`).
OPS: Dict[str, PerturbOp] = {name: cls() for name, cls in OP_CLASSES.items()}

PAPER_POOL: Tuple[str, ...] = ("mixup", "cutmix", "noise", "warp", "crop")
CODE_POOL: Tuple[str, ...] = ("mixup", "noise", "jitter", "blur", "hflip", "vflip", "rotate")
ALL_OPS: Tuple[str, ...] = tuple(OPS)
MIXING_OPS: Tuple[str, ...] = ("mixup", "cutmix")
#: Named pools, accepted by :func:`resolve_ops` (and so by the scheduler's ``ops``).
POOLS: Dict[str, Tuple[str, ...]] = {"paper": PAPER_POOL, "code": CODE_POOL, "all": ALL_OPS}


def _op_class(name: str) -> Type[PerturbOp]:
    try:
        return OP_CLASSES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown perturbation op {name!r}; valid ops: {', '.join(OPS)}") from None


def get_op(name: str, **params: Any) -> PerturbOp:
    """The op ``name`` with ``params`` (the shared default instance when none are given).

    ValueError (one line) for an unknown name; :class:`OpParameterError` (a ValueError naming the op,
    the key and the valid keys or values) for an unknown or invalid parameter.
    """
    cls = _op_class(name)
    if not params:
        return OPS[name]
    valid = cls.param_names()
    for key, value in params.items():
        if key not in valid:
            raise OpParameterError(
                name, key, value,
                f"op {name} has no parameter {key!r}; valid keys: {', '.join(valid) if valid else '(none: this op takes no parameters)'}",
            )
    return cls(**params)


def build_ops(ops: Sequence[str], op_params: Mapping[str, Mapping[str, Any]] | None = None) -> Dict[str, PerturbOp]:
    """One op per name of the pool ``ops`` with its ``op_params`` entry; an entry for an op outside the pool is an error."""
    op_params = dict(op_params or {})
    for name, params in op_params.items():
        if not isinstance(name, str) or name not in OP_CLASSES:
            raise OpParameterError(name, "", params, f"op_params names an unknown op {name!r}; valid ops: {', '.join(OPS)}")
        if name not in ops:
            raise OpParameterError(
                name, "", params,
                f"op_params has an entry for op {name}, which is not in the pool ({', '.join(ops)}); "
                "add it to ops or remove the entry",
            )
        if not isinstance(params, Mapping):
            raise OpParameterError(name, "", params, f"op_params.{name} must be a mapping of parameter to value, got {params!r}")
    return {name: get_op(name, **dict(op_params.get(name, {}))) for name in ops}


def resolve_ops(ops: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    """Validate a pool: a sequence of op names, a pool name ("paper", "code", "all") or one op."""
    if isinstance(ops, str):
        if ops in POOLS:
            return POOLS[ops]
        ops = (ops,)
    ops = tuple(ops)
    if not ops:
        raise ValueError(f"the perturbation pool is empty; give at least one of: {', '.join(OPS)}")
    bad = [o for o in ops if o not in OPS]
    if bad:
        raise ValueError(
            f"unknown perturbation op(s) {bad}; valid ops: {', '.join(OPS)} "
            f"(or a pool name: {', '.join(POOLS)})"
        )
    return ops
