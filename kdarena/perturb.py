"""Stochastic perturbation ("mutation") of one network's input batch.

Method, section 3: at a perturbed step ONE network, chosen uniformly at random, sees an
aggressively perturbed view of the batch; the competition (lowest CE becomes the
teacher) is the only filter. This module provides

* a pool of batched tensor ops (``OPS``) on a *normalised* float image batch
  ``x`` of shape (N, C, H, W), any C and size, CPU or CUDA, with no per-image Python loop.
  Every op has the signature ``op(x, y, lam, generator) -> (x', target)``:

  - ``generator`` is a :class:`torch.Generator` on ``x.device``; all per-sample randomness
    comes from it (``None`` falls back to torch's global RNG);
  - ``lam`` is a scalar drawn by the scheduler, used by the mixing ops only;
  - ``x'`` keeps the shape, dtype, device and (channels_last) memory format of ``x``;
    half / bfloat16 inputs are processed in float32 and cast back;
  - ``target`` is ``y`` unchanged, or a :class:`~kdarena.losses.MixedTarget` for the
    mixing ops (``mixup``, ``cutmix``).

* :class:`PerturbationScheduler`: decides, from its own seeded CPU generator, whether a
  step is perturbed, which network, which op and ``lam``; applies the op; saves/restores
  all of its generator states.
* :class:`ParameterMutation`: an optional parameter-space perturbation (Gaussian noise on
  a network's weights). This is NOT what the paper describes (the paper perturbs inputs);
  it is an extra option, off by default in the trainer.

Pools: ``PAPER_POOL`` (mixing, splicing, noise injection, warping, crop scale [0.3, 0.7])
and ``CODE_POOL`` (the authors' released code: mixup, N(0, 1) noise, colour jitter, blur,
horizontal flip, vertical flip, rotation up to 30 degrees).

Conventions (documented choices):

* Geometric ops (``warp``, ``rotate``) fill pixels that come from outside the image with 0,
  which in normalised space is the dataset mean colour. ``crop`` samples inside the image
  (its box never leaves it) and uses border padding for the half-pixel at the edges.
* Geometric parameters are defined in pixel space, so rotations and shears of non-square
  images are not distorted by the [-1, 1] normalised grid coordinates.
* ``hflip`` / ``vflip`` flip the WHOLE batch (no per-sample coin): the op was already chosen
  at random for this step and is meant to be an aggressive perturbation. They ignore
  ``generator``.
* ``jitter`` works directly in normalised space: brightness is an additive shift (in units of
  the per-channel std), contrast scales the deviations from the image's mean, saturation
  scales each pixel's deviation from its channel mean (equal channel weights: luma weights
  are meaningless after per-channel normalisation). For C == 1 only brightness and
  contrast are applied.
"""
from __future__ import annotations

import math
import operator
import random
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .losses import MixedTarget

__all__ = [
    "OPS",
    "PAPER_POOL",
    "CODE_POOL",
    "ALL_OPS",
    "MIXING_OPS",
    "POOLS",
    "NOISE_STD",
    "Perturbation",
    "PerturbationScheduler",
    "ParameterMutation",
    "resolve_ops",
    "get_op",
    "mixup",
    "cutmix",
    "noise",
    "warp",
    "crop",
    "jitter",
    "blur",
    "hflip",
    "vflip",
    "rotate",
]

OpResult = Tuple[Tensor, Union[Tensor, MixedTarget]]
Op = Callable[[Tensor, Tensor, float, Optional[torch.Generator]], OpResult]

# ----------------------------------------------------------------------------------------
# Op parameters (module level, read at call time, so they can be changed globally).
# ----------------------------------------------------------------------------------------
#: Std of the Gaussian noise added by ``noise`` (the authors' code adds N(0, 1) to normalised images).
NOISE_STD: float = 1.0
#: ``warp``: max rotation (degrees), scale range, max x-shear (degrees), max translation
#: (fraction of the image side), elastic displacement std (fraction of the half side) and the
#: resolution of the coarse random field that is upsampled into the smooth elastic field.
WARP_MAX_ROTATION: float = 30.0
WARP_SCALE: Tuple[float, float] = (0.8, 1.2)
WARP_MAX_SHEAR: float = 15.0
WARP_MAX_TRANSLATION: float = 0.1
WARP_ELASTIC_STD: float = 0.05
WARP_ELASTIC_GRID: int = 4
#: ``crop``: area fraction and aspect-ratio ranges of the random resized crop.
CROP_SCALE: Tuple[float, float] = (0.3, 0.7)
CROP_RATIO: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
#: ``jitter``: brightness shift in [-b, b] (std units), contrast and saturation factors in [1-c, 1+c].
JITTER_BRIGHTNESS: float = 0.5
JITTER_CONTRAST: float = 0.5
JITTER_SATURATION: float = 0.5
#: ``blur``: sigma (pixels) drawn uniformly in this range, one per batch.
BLUR_SIGMA: Tuple[float, float] = (0.5, 2.0)
#: ``rotate``: rotation uniform in [-ROTATE_MAX_DEGREES, ROTATE_MAX_DEGREES], per sample.
ROTATE_MAX_DEGREES: float = 30.0


# ----------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------
def _check_input(x: Tensor, generator: Optional[torch.Generator]) -> None:
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


def _work(x: Tensor) -> Tensor:
    """The batch in the dtype the op computes in (float32 for half / bfloat16)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _finish(out: Tensor, x: Tensor) -> Tensor:
    """Cast back to x's dtype and give the result x's memory format."""
    out = out.to(dtype=x.dtype)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return out.contiguous(memory_format=torch.channels_last)
    if x.is_contiguous():
        return out.contiguous()
    return out


def _uniform(n: int, low: float, high: float, generator: Optional[torch.Generator], ref: Tensor) -> Tensor:
    u = torch.rand(n, generator=generator, device=ref.device, dtype=ref.dtype)
    return low + (high - low) * u


def _permutation(n: int, generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    # argsort of uniforms: works with any device generator (no randperm generator quirks).
    return torch.argsort(torch.rand(n, generator=generator, device=device))


def _affine_sample(
    xf: Tensor,
    a_pix: Tensor,
    t_norm: Tensor,
    padding_mode: str,
    displacement: Optional[Tensor] = None,
) -> Tensor:
    """Resample xf with per-sample affine maps output -> input.

    ``a_pix`` (N, 2, 2) is the linear part in centred pixel coordinates (so rotations are
    true rotations on non-square images), ``t_norm`` (N, 2) the translation in normalised
    [-1, 1] grid units, ``displacement`` an optional (N, H, W, 2) field added to the grid.
    """
    n, c, h, w = xf.shape
    half = torch.tensor([w / 2.0, h / 2.0], device=xf.device, dtype=xf.dtype)
    # A_norm = D^-1 A_pix D with D = diag(W/2, H/2): A_norm[i, j] = A_pix[i, j] * D[j] / D[i].
    a_norm = a_pix * half.view(1, 1, 2) / half.view(1, 2, 1)
    theta = torch.cat([a_norm, t_norm.unsqueeze(-1)], dim=2)
    grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)
    if displacement is not None:
        grid = grid + displacement
    return F.grid_sample(xf, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


def _rotation(angle_rad: Tensor) -> Tensor:
    cos, sin = torch.cos(angle_rad), torch.sin(angle_rad)
    return torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)


# ----------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------
def mixup(x: Tensor, y: Tensor, lam: float, generator: Optional[torch.Generator] = None) -> OpResult:
    """x' = lam * x + (1 - lam) * x[perm]; target MixedTarget(y, y[perm], lam)."""
    _check_input(x, generator)
    lam = float(lam)
    perm = _permutation(x.shape[0], generator, x.device)
    xf = _work(x)
    out = lam * xf + (1.0 - lam) * xf[perm]
    return _finish(out, x), MixedTarget(y, y[perm.to(y.device)], lam)


def cutmix(x: Tensor, y: Tensor, lam: float, generator: Optional[torch.Generator] = None) -> OpResult:
    """Splicing: paste one box of area ~(1 - lam) from x[perm] (same box for the whole batch).

    The box lies fully inside the image (its position is uniform over the valid positions),
    so its area is exactly ``round(H*sqrt(1-lam)) * round(W*sqrt(1-lam))``; the target's lam is
    corrected to the real unpasted fraction ``1 - box_area / (H*W)``.
    """
    _check_input(x, generator)
    n, _, h, w = x.shape
    lam = min(max(float(lam), 0.0), 1.0)
    perm = _permutation(n, generator, x.device)
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(round(h * cut)), int(round(w * cut))
    # Position drawn on the device (no host sync); always drawn, so the generator advances
    # by the same amount whatever lam is.
    pos = torch.rand(2, generator=generator, device=x.device)
    top = torch.floor(pos[0] * (h - cut_h + 1)).clamp(max=h - cut_h)
    left = torch.floor(pos[1] * (w - cut_w + 1)).clamp(max=w - cut_w)
    rows = torch.arange(h, device=x.device, dtype=pos.dtype).view(h, 1)
    cols = torch.arange(w, device=x.device, dtype=pos.dtype).view(1, w)
    box = (rows >= top) & (rows < top + cut_h) & (cols >= left) & (cols < left + cut_w)
    xf = _work(x)
    out = torch.where(box, xf[perm], xf)
    lam_true = 1.0 - (cut_h * cut_w) / float(h * w)
    return _finish(out, x), MixedTarget(y, y[perm.to(y.device)], lam_true)


def noise(x: Tensor, y: Tensor, lam: float, generator: Optional[torch.Generator] = None) -> OpResult:
    """Gaussian noise injection: x + NOISE_STD * N(0, 1) (NOISE_STD is read at call time)."""
    _check_input(x, generator)
    xf = _work(x)
    eps = torch.randn(xf.shape, generator=generator, device=x.device, dtype=xf.dtype)
    return _finish(xf + NOISE_STD * eps, x), y


def warp(x: Tensor, y: Tensor, lam: float, generator: Optional[torch.Generator] = None) -> OpResult:
    """Random per-sample affine warp (rotation, scale, x-shear, translation) plus a smooth
    elastic displacement (a coarse Gaussian field upsampled bicubically), via grid_sample."""
    _check_input(x, generator)
    xf = _work(x)
    n, _, h, w = xf.shape
    p = torch.rand(n, 5, generator=generator, device=x.device, dtype=xf.dtype)
    angle = torch.deg2rad((2 * p[:, 0] - 1) * WARP_MAX_ROTATION)
    scale = WARP_SCALE[0] + (WARP_SCALE[1] - WARP_SCALE[0]) * p[:, 1]
    shear = torch.tan(torch.deg2rad((2 * p[:, 2] - 1) * WARP_MAX_SHEAR))
    trans = (2 * p[:, 3:5] - 1) * (2.0 * WARP_MAX_TRANSLATION)  # fraction of side -> grid units
    shear_m = torch.zeros(n, 2, 2, device=x.device, dtype=xf.dtype)
    shear_m[:, 0, 0] = 1
    shear_m[:, 1, 1] = 1
    shear_m[:, 0, 1] = shear
    a_pix = _rotation(angle) @ shear_m * scale.view(n, 1, 1)
    g = max(1, int(WARP_ELASTIC_GRID))
    coarse = torch.randn(n, 2, g, g, generator=generator, device=x.device, dtype=xf.dtype)
    field = F.interpolate(coarse * WARP_ELASTIC_STD, size=(h, w), mode="bicubic", align_corners=False)
    out = _affine_sample(xf, a_pix, trans, "zeros", field.permute(0, 2, 3, 1))
    return _finish(out, x), y


def crop(x: Tensor, y: Tensor, lam: float, generator: Optional[torch.Generator] = None) -> OpResult:
    """Random resized crop, per sample: area fraction in CROP_SCALE ([0.3, 0.7]), aspect ratio
    (w/h, in pixels) log-uniform in CROP_RATIO, box fully inside the image, resized to H x W."""
    _check_input(x, generator)
    xf = _work(x)
    n = xf.shape[0]
    p = torch.rand(n, 4, generator=generator, device=x.device, dtype=xf.dtype)
    area = CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * p[:, 0]
    log_r = math.log(CROP_RATIO[0]) + (math.log(CROP_RATIO[1]) - math.log(CROP_RATIO[0])) * p[:, 1]
    ratio = torch.exp(log_r)
    # Side fractions; clamp keeps the box inside the image if the ranges are widened.
    fw = torch.sqrt(area * ratio).clamp(max=1.0)
    fh = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (2 * p[:, 2] - 1) * (1 - fw)
    cy = (2 * p[:, 3] - 1) * (1 - fh)
    a_pix = torch.zeros(n, 2, 2, device=x.device, dtype=xf.dtype)
    a_pix[:, 0, 0] = fw
    a_pix[:, 1, 1] = fh
    out = _affine_sample(xf, a_pix, torch.stack([cx, cy], -1), "border")
    return _finish(out, x), y


def jitter(x: Tensor, y: Tensor, lam: float, generator: Optional[torch.Generator] = None) -> OpResult:
    """Colour jitter in normalised space, per sample: brightness (additive shift), contrast
    (deviation from the image mean scaled), saturation (deviation from the per-pixel channel
    mean scaled; only when C > 1)."""
    _check_input(x, generator)
    xf = _work(x)
    n, c = xf.shape[:2]
    p = 2 * torch.rand(n, 3, generator=generator, device=x.device, dtype=xf.dtype) - 1
    bright = (JITTER_BRIGHTNESS * p[:, 0]).view(n, 1, 1, 1)
    contrast = (1 + JITTER_CONTRAST * p[:, 1]).view(n, 1, 1, 1)
    out = xf + bright
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = mean + contrast * (out - mean)
    if c > 1:
        saturation = (1 + JITTER_SATURATION * p[:, 2]).view(n, 1, 1, 1)
        grey = out.mean(dim=1, keepdim=True)
        out = grey + saturation * (out - grey)
    return _finish(out, x), y


def blur(x: Tensor, y: Tensor, lam: float, generator: Optional[torch.Generator] = None) -> OpResult:
    """Separable Gaussian blur (depthwise conv2d, reflect padding), one sigma per batch drawn
    uniformly in BLUR_SIGMA. The kernel radius is ceil(3 * max sigma), capped by the image size;
    sigma stays on the device (no host sync)."""
    _check_input(x, generator)
    xf = _work(x)
    _, c, h, w = xf.shape
    sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * torch.rand(
        (), generator=generator, device=x.device, dtype=xf.dtype
    )
    radius = int(math.ceil(3 * max(BLUR_SIGMA)))
    out = xf
    for dim, size in ((3, w), (2, h)):
        r = min(radius, size - 1)
        if r <= 0:
            continue
        k = torch.arange(-r, r + 1, device=x.device, dtype=xf.dtype)
        kernel = torch.exp(-(k * k) / (2 * sigma * sigma))
        kernel = kernel / kernel.sum()
        if dim == 3:
            weight = kernel.view(1, 1, 1, -1).expand(c, 1, 1, 2 * r + 1).contiguous()
            out = F.conv2d(F.pad(out, (r, r, 0, 0), mode="reflect"), weight, groups=c)
        else:
            weight = kernel.view(1, 1, -1, 1).expand(c, 1, 2 * r + 1, 1).contiguous()
            out = F.conv2d(F.pad(out, (0, 0, r, r), mode="reflect"), weight, groups=c)
    return _finish(out, x), y


def hflip(x: Tensor, y: Tensor, lam: float, generator: Optional[torch.Generator] = None) -> OpResult:
    """Horizontal flip of the whole batch (deterministic; ``generator`` unused)."""
    _check_input(x, generator)
    return _finish(x.flip(-1), x), y


def vflip(x: Tensor, y: Tensor, lam: float, generator: Optional[torch.Generator] = None) -> OpResult:
    """Vertical flip of the whole batch (deterministic; ``generator`` unused)."""
    _check_input(x, generator)
    return _finish(x.flip(-2), x), y


def rotate(x: Tensor, y: Tensor, lam: float, generator: Optional[torch.Generator] = None) -> OpResult:
    """Per-sample rotation uniform in [-ROTATE_MAX_DEGREES, ROTATE_MAX_DEGREES] about the centre
    (pixel space, so non-square images are not sheared); outside pixels filled with 0 (= mean)."""
    _check_input(x, generator)
    xf = _work(x)
    n = xf.shape[0]
    angle = torch.deg2rad(_uniform(n, -ROTATE_MAX_DEGREES, ROTATE_MAX_DEGREES, generator, xf))
    t = torch.zeros(n, 2, device=x.device, dtype=xf.dtype)
    return _finish(_affine_sample(xf, _rotation(angle), t, "zeros"), x), y


OPS: Dict[str, Op] = {
    "mixup": mixup,
    "cutmix": cutmix,
    "noise": noise,
    "warp": warp,
    "crop": crop,
    "jitter": jitter,
    "blur": blur,
    "hflip": hflip,
    "vflip": vflip,
    "rotate": rotate,
}

PAPER_POOL: Tuple[str, ...] = ("mixup", "cutmix", "noise", "warp", "crop")
CODE_POOL: Tuple[str, ...] = ("mixup", "noise", "jitter", "blur", "hflip", "vflip", "rotate")
ALL_OPS: Tuple[str, ...] = tuple(OPS)
MIXING_OPS: Tuple[str, ...] = ("mixup", "cutmix")
#: Named pools, accepted by :func:`resolve_ops` (and so by the scheduler's ``ops``).
POOLS: Dict[str, Tuple[str, ...]] = {"paper": PAPER_POOL, "code": CODE_POOL, "all": ALL_OPS}


def get_op(name: str) -> Op:
    """The op registered under ``name``; ValueError listing the valid names otherwise."""
    try:
        return OPS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown perturbation op {name!r}; valid ops: {', '.join(OPS)}") from None


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


# ----------------------------------------------------------------------------------------
# Scheduler
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Perturbation:
    """One decision: perturb the input of ``network`` with ``op`` (``lam`` used by mixing ops)."""

    network: int
    op: str
    lam: float


def _derive_seed(seed: int, salt: int) -> int:
    """splitmix64 of seed ^ salt: a decorrelated 63-bit seed for a sibling generator."""
    z = (int(seed) ^ salt) & 0xFFFFFFFFFFFFFFFF
    z = (z + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


_SAMPLE_SALT = 0x5A4D504C  # "ZMPL"


def _device_key(device: Union[torch.device, str]) -> str:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


class PerturbationScheduler:
    """Decides which network's input is perturbed, with which op, and applies it.

    Gate: a step is *eligible* when ``step % every == 0``; an eligible step is perturbed
    always (``probability=None``) or with probability ``probability``. ``every=1`` (default)
    is the paper (every iteration), ``every=10`` the authors' code.

    Every :meth:`decide` call draws the same random numbers from the scheduler's own seeded
    CPU generator (gate uniform, network, op, and a seed for lam ~ Beta(mix_alpha, mix_alpha)),
    whatever the outcome, so the decisions are a pure function of ``seed`` and the sequence of
    calls: distributed ranks with the same seed decide identically.

    :meth:`apply` draws per-sample randomness from the ``generator`` it is given or, if None,
    from the scheduler's own per-device generator (created lazily, seeded from ``seed``).
    :meth:`state_dict` captures every generator state, so a resumed run continues the exact
    same sequence of decisions and perturbed batches.
    """

    def __init__(
        self,
        num_networks: int,
        ops: Union[str, Sequence[str]] = PAPER_POOL,
        every: int = 1,
        probability: Optional[float] = None,
        seed: int = 0,
        mix_alpha: float = 1.0,
    ) -> None:
        if isinstance(num_networks, bool) or not isinstance(num_networks, int) or num_networks < 1:
            raise ValueError(f"num_networks must be an integer >= 1 (the group size), got {num_networks!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(
                f"every must be an integer >= 1 (1 = perturb every step, 10 = every 10th step), got {every!r}"
            )
        if probability is not None:
            probability = float(probability)
            if not 0.0 <= probability <= 1.0 or math.isnan(probability):
                raise ValueError(
                    f"probability must be in [0, 1] (or None to perturb every eligible step), got {probability!r}"
                )
        mix_alpha = float(mix_alpha)
        if not mix_alpha > 0 or math.isinf(mix_alpha):
            raise ValueError(f"mix_alpha must be a finite number > 0 (1.0 = uniform lam), got {mix_alpha!r}")
        self.num_networks = num_networks
        self.ops = resolve_ops(ops)
        self.every = every
        self.probability = probability
        self.seed = int(seed)
        self.mix_alpha = mix_alpha
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(self.seed)
        self._sample_generators: Dict[str, torch.Generator] = {}
        # States loaded for devices whose generator has not been created yet.
        self._pending_states: Dict[str, Tensor] = {}

    def __repr__(self) -> str:
        return (
            f"PerturbationScheduler(num_networks={self.num_networks}, ops={self.ops}, every={self.every}, "
            f"probability={self.probability}, seed={self.seed}, mix_alpha={self.mix_alpha})"
        )

    # -- decisions -------------------------------------------------------------------------
    def decide(self, step: int) -> Optional[Perturbation]:
        """The perturbation for global step ``step``, or None when the step is not perturbed."""
        step = operator.index(step)
        g = self._generator
        gate = torch.rand((), generator=g, dtype=torch.float64).item()
        network = int(torch.randint(self.num_networks, (), generator=g).item())
        op_index = int(torch.randint(len(self.ops), (), generator=g).item())
        beta_seed = int(torch.randint(2**62, (), generator=g).item())
        lam = random.Random(beta_seed).betavariate(self.mix_alpha, self.mix_alpha)
        if step % self.every != 0:
            return None
        if self.probability is not None and not gate < self.probability:
            return None
        return Perturbation(network=network, op=self.ops[op_index], lam=float(lam))

    # -- application -----------------------------------------------------------------------
    def sample_generator(self, device: Union[torch.device, str]) -> torch.Generator:
        """The scheduler's own generator for ``device`` (created lazily, seeded from ``seed``)."""
        key = _device_key(device)
        gen = self._sample_generators.get(key)
        if gen is None:
            gen = torch.Generator(device=key)
            gen.manual_seed(_derive_seed(self.seed, _SAMPLE_SALT))
            pending = self._pending_states.pop(key, None)
            if pending is not None:
                gen.set_state(pending)
            self._sample_generators[key] = gen
        return gen

    def apply(
        self,
        decision: Optional[Perturbation],
        x: Tensor,
        y: Tensor,
        generator: Optional[torch.Generator] = None,
    ) -> OpResult:
        """Run ``decision``'s op on (x, y); ``decision=None`` returns (x, y) unchanged."""
        if decision is None:
            return x, y
        op = get_op(decision.op)
        if generator is None:
            generator = self.sample_generator(x.device)
        return op(x, y, decision.lam, generator)

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        samples = {k: g.get_state().cpu() for k, g in self._sample_generators.items()}
        for k, s in self._pending_states.items():
            samples.setdefault(k, s.clone())
        return {
            "decision_generator": self._generator.get_state(),
            "sample_generators": samples,
            "config": {
                "num_networks": self.num_networks,
                "ops": list(self.ops),
                "every": self.every,
                "probability": self.probability,
                "seed": self.seed,
                "mix_alpha": self.mix_alpha,
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore every generator state. Configuration (ops, every, ...) comes from the
        constructor, not from the checkpoint; a device whose generator does not exist yet gets
        its state when first used (so a CUDA state can be loaded before any CUDA batch)."""
        self._generator.set_state(_byte_state(state["decision_generator"]))
        self._sample_generators = {}
        self._pending_states = {
            _device_key(k): _byte_state(v) for k, v in dict(state.get("sample_generators", {})).items()
        }
        # Materialise the CPU one immediately (always available); others lazily.
        for key in list(self._pending_states):
            if torch.device(key).type == "cpu":
                self.sample_generator(key)


def _byte_state(state: Tensor) -> Tensor:
    return state.detach().to(device="cpu", dtype=torch.uint8).contiguous()


# ----------------------------------------------------------------------------------------
# Parameter-space mutation (optional, not in the paper)
# ----------------------------------------------------------------------------------------
class ParameterMutation:
    """Gaussian noise on a module's weights, scaled to each tensor's norm.

    For every floating-point parameter p (shared parameters once):

        p <- p + scale * ||p||_2 / sqrt(numel(p)) * N(0, I)

    i.e. the noise std is ``scale`` times the RMS of p, so ||noise|| ~= scale * ||p|| for any
    tensor size (a zero tensor stays zero). The noise is drawn on the CPU (from ``generator``
    or the mutation's own seeded CPU generator) and moved to the parameter's device, so the
    same seed gives the same mutation on any device. Computed in float32, cast back.
    """

    def __init__(self, scale: float = 0.01, seed: int = 0) -> None:
        scale = float(scale)
        if not scale >= 0 or math.isinf(scale):
            raise ValueError(f"scale must be a finite number >= 0 (e.g. 0.01), got {scale!r}")
        self.scale = scale
        self.seed = int(seed)
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(self.seed)

    @torch.no_grad()
    def mutate(self, module: nn.Module, generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
        """Perturb ``module``'s parameters in place; return a backup for :meth:`restore`."""
        if generator is None:
            generator = self._generator
        elif torch.device(generator.device).type != "cpu":
            raise ValueError(
                f"ParameterMutation draws its noise on the CPU; pass a CPU generator, got one on {generator.device}"
            )
        backup: Dict[str, Tensor] = {}
        for name, p in module.named_parameters():
            if not p.is_floating_point():
                continue
            backup[name] = p.detach().clone()
            if p.numel() == 0:
                continue
            pf = p.detach().float()
            std = self.scale * pf.norm() / math.sqrt(p.numel())
            eps = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.device)
            p.copy_((pf + std * eps).to(p.dtype))
        return backup

    @staticmethod
    @torch.no_grad()
    def restore(module: nn.Module, backup: Mapping[str, Tensor]) -> None:
        """Copy the backed-up values back into ``module``'s parameters (exact)."""
        params = dict(module.named_parameters())
        missing = [n for n in backup if n not in params]
        if missing:
            raise KeyError(f"backup holds parameters the module does not have: {missing}")
        for name, value in backup.items():
            params[name].copy_(value)

    def state_dict(self) -> Dict[str, Any]:
        return {"generator": self._generator.get_state(), "scale": self.scale, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._generator.set_state(_byte_state(state["generator"]))
