"""Named seed streams: every random stream of a run is derived from ``config.seed`` by name.

A run draws from several independent generators (data order and augmentation, the perturbation
scheduler, its per-sample noise, weight mutation, per-rank noise under torchrun). Each is
derived here, in one place, so no module invents its own offset or hash. The derivations are
exactly those kdarena has always used, so seeds give the same runs as before.
"""
from __future__ import annotations

_MASK64 = (1 << 64) - 1

#: offsets of the streams derived by addition from ``config.seed`` (historic values, kept for bit-exact runs)
STREAM_OFFSETS: dict[str, int] = {
    "data": 0,  # batch order and crop/flip of the training loader
    "perturbation": 7919,  # which step/network/op is perturbed (PerturbationScheduler)
    "mutation": 104729,  # weight mutation (MutationTracker)
}

#: salts for sibling generators derived from a stream's seed
SALTS: dict[str, int] = {
    "perturbation-samples": 0x5A4D504C,  # "ZMPL": per-sample randomness of the perturbation ops
    "augmented-view": 0x7669657700000000,  # "view": extra augmented views of a batch (one per network)
}


def splitmix64(x: int) -> int:
    """One step of the splitmix64 mixer (Steele et al. 2014): a bijection on 64-bit integers."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def stream_seed(seed: int, stream: str) -> int:
    """The seed of a named stream of a run seeded with ``seed``."""
    return int(seed) + STREAM_OFFSETS[stream]


def keyed_seed(seed: int, key: int) -> int:
    """A 63-bit seed that depends only on ``(seed, key)`` (e.g. the epoch, the rank, the step)."""
    return splitmix64(splitmix64(int(seed) & _MASK64) ^ (int(key) & _MASK64)) >> 1


def salted_seed(seed: int, salt: str) -> int:
    """A decorrelated 63-bit seed for a sibling generator of ``seed``."""
    return splitmix64((int(seed) ^ SALTS[salt]) & _MASK64) & 0x7FFFFFFFFFFFFFFF


def view_seed(seed: int, view: int) -> int:
    """The seed of extra augmented view ``view >= 1`` of the data stream ``seed`` (view 0 is the stream itself)."""
    return splitmix64((int(seed) & _MASK64) ^ splitmix64(SALTS["augmented-view"] + int(view))) >> 1
