"""Mixing and photometric ops: mixup, cutmix (splicing), noise, jitter, blur.

Call convention and dtype / memory-format rules: see :mod:`kdarena.perturb.base`.

Conventions (documented choices):

* ``jitter`` works directly in normalised space: brightness is an additive shift (in units of
  the per-channel std), contrast scales the deviations from the image's mean, saturation
  scales each pixel's deviation from its channel mean (equal channel weights: luma weights
  are meaningless after per-channel normalisation). For C == 1 only brightness and
  contrast are applied.
* ``clamp`` (``Noise`` and ``Jitter``, off by default): the competitive-distillation authors'
  released code adds N(0, 1) noise / colour jitter to the ALREADY-NORMALISED batch and clamps
  the result to [0, 1]; ``clamp=(0, 1)`` reproduces that. Note what it does: in normalised space
  0 is the dataset mean, so the clamp wipes every negative normalised value (every pixel darker
  than the mean becomes the mean) and caps the rest at one std above it. We keep it as an
  option for fidelity to their code, not as a recommendation.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..losses import MixedTarget
from .base import OpResult, PerturbOp, check_input, finish, permutation, work


class Mixup(PerturbOp):
    """x' = lam * x + (1 - lam) * x[perm]; target MixedTarget(y, y[perm], lam). No parameters (lam comes
    from the scheduler: Beta(mix_alpha, mix_alpha))."""

    name = "mixup"

    def __init__(self) -> None:
        pass

    def __call__(self, x: Tensor, y: Tensor, lam: float, generator: Optional[torch.Generator] = None) -> OpResult:
        check_input(x, generator)
        lam = float(lam)
        perm = permutation(x.shape[0], generator, x.device)
        xf = work(x)
        out = lam * xf + (1.0 - lam) * xf[perm]
        return finish(out, x), MixedTarget(y, y[perm.to(y.device)], lam)


class CutMix(PerturbOp):
    """Splicing: paste one box of area ~(1 - lam) from x[perm] (same box for the whole batch).

    The box lies fully inside the image (its position is uniform over the valid positions),
    so its area is exactly ``round(H*sqrt(1-lam)) * round(W*sqrt(1-lam))``; the target's lam is
    corrected to the real unpasted fraction ``1 - box_area / (H*W)``. No parameters.
    """

    name = "cutmix"

    def __init__(self) -> None:
        pass

    def __call__(self, x: Tensor, y: Tensor, lam: float, generator: Optional[torch.Generator] = None) -> OpResult:
        check_input(x, generator)
        n, _, h, w = x.shape
        lam = min(max(float(lam), 0.0), 1.0)
        perm = permutation(n, generator, x.device)
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
        xf = work(x)
        out = torch.where(box, xf[perm], xf)
        lam_true = 1.0 - (cut_h * cut_w) / float(h * w)
        return finish(out, x), MixedTarget(y, y[perm.to(y.device)], lam_true)


class Noise(PerturbOp):
    """Gaussian noise injection: x + std * N(0, 1), then clamped to ``clamp`` if given.

    ``std=1.0`` is the authors' code (N(0, 1) on normalised images); ``clamp=(0, 1)`` is their
    clamp (see the module doc: it wipes every negative normalised value).
    """

    name = "noise"

    def __init__(self, std: float = 1.0, clamp: Optional[Sequence[float]] = None) -> None:
        self.std = self._number("std", std, 0.0, expected="a finite number >= 0 (1.0 = the authors' N(0, 1))")
        self.clamp: Optional[Tuple[float, float]] = self._clamp(clamp)

    def __call__(self, x: Tensor, y: Tensor, lam: float, generator: Optional[torch.Generator] = None) -> OpResult:
        check_input(x, generator)
        xf = work(x)
        eps = torch.randn(xf.shape, generator=generator, device=x.device, dtype=xf.dtype)
        return finish(xf + self.std * eps, x, self.clamp), y


class Jitter(PerturbOp):
    """Colour jitter in normalised space, per sample: brightness (additive shift in [-brightness,
    brightness] std units), contrast (deviation from the image mean scaled by a factor in
    [1 - contrast, 1 + contrast]), saturation (deviation from the per-pixel channel mean scaled by a
    factor in [1 - saturation, 1 + saturation]; only when C > 1); then clamped to ``clamp`` if given
    (``(0, 1)`` = the authors' code, see the module doc)."""

    name = "jitter"

    def __init__(self, brightness: float = 0.5, contrast: float = 0.5, saturation: float = 0.5,
                 clamp: Optional[Sequence[float]] = None) -> None:
        self.brightness = self._number("brightness", brightness, 0.0, expected="a finite number >= 0 (std units)")
        # factors 1 +- c must stay >= 0 (a negative factor inverts the image instead of reducing contrast)
        self.contrast = self._number("contrast", contrast, 0.0, 1.0)
        self.saturation = self._number("saturation", saturation, 0.0, 1.0)
        self.clamp: Optional[Tuple[float, float]] = self._clamp(clamp)

    def __call__(self, x: Tensor, y: Tensor, lam: float, generator: Optional[torch.Generator] = None) -> OpResult:
        check_input(x, generator)
        xf = work(x)
        n, c = xf.shape[:2]
        p = 2 * torch.rand(n, 3, generator=generator, device=x.device, dtype=xf.dtype) - 1
        bright = (self.brightness * p[:, 0]).view(n, 1, 1, 1)
        contrast = (1 + self.contrast * p[:, 1]).view(n, 1, 1, 1)
        out = xf + bright
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = mean + contrast * (out - mean)
        if c > 1:
            saturation = (1 + self.saturation * p[:, 2]).view(n, 1, 1, 1)
            grey = out.mean(dim=1, keepdim=True)
            out = grey + saturation * (out - grey)
        return finish(out, x, self.clamp), y


class Blur(PerturbOp):
    """Separable Gaussian blur (depthwise conv2d, reflect padding), one sigma per batch drawn
    uniformly in ``sigma`` (pixels). The kernel radius is ceil(3 * max sigma), capped by the image
    size; sigma stays on the device (no host sync)."""

    name = "blur"

    def __init__(self, sigma: Sequence[float] = (0.5, 2.0)) -> None:
        self.sigma = self._range("sigma", sigma, 0.0, positive=True)

    def __call__(self, x: Tensor, y: Tensor, lam: float, generator: Optional[torch.Generator] = None) -> OpResult:
        check_input(x, generator)
        xf = work(x)
        _, c, h, w = xf.shape
        low, high = self.sigma
        sigma = low + (high - low) * torch.rand((), generator=generator, device=x.device, dtype=xf.dtype)
        radius = int(math.ceil(3 * max(self.sigma)))
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
        return finish(out, x), y
