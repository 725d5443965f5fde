"""Geometric ops: warp, crop, rotate, hflip, vflip.

Call convention and dtype / memory-format rules: see :mod:`kdarena.perturb.base`.

Conventions (documented choices):

* ``warp`` and ``rotate`` fill pixels that come from outside the image with 0, which in
  normalised space is the dataset mean colour. ``crop`` samples inside the image (its box never
  leaves it) and uses border padding for the half-pixel at the edges.
* Geometric parameters are defined in pixel space, so rotations and shears of non-square
  images are not distorted by the [-1, 1] normalised grid coordinates.
* ``hflip`` / ``vflip`` flip the WHOLE batch (no per-sample coin): the op was already chosen
  at random for this step and is meant to be an aggressive perturbation. They ignore
  ``generator``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import OpResult, PerturbOp, check_input, finish, uniform, work


def affine_sample(
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


def rotation(angle_rad: Tensor) -> Tensor:
    cos, sin = torch.cos(angle_rad), torch.sin(angle_rad)
    return torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)


class Warp(PerturbOp):
    """Random per-sample affine warp plus a smooth elastic displacement, via grid_sample.

    Rotation uniform in [-max_rotation, max_rotation] degrees, scale uniform in ``scale``, x-shear
    uniform in [-max_shear, max_shear] degrees, translation uniform in [-max_translation,
    max_translation] (fraction of the image side); the elastic field is a coarse
    ``elastic_grid`` x ``elastic_grid`` Gaussian field of std ``elastic_std`` (fraction of the half
    side) upsampled bicubically.
    """

    name = "warp"

    def __init__(self, max_rotation: float = 30.0, scale: Sequence[float] = (0.8, 1.2), max_shear: float = 15.0,
                 max_translation: float = 0.1, elastic_std: float = 0.05, elastic_grid: int = 4) -> None:
        self.max_rotation = self._number("max_rotation", max_rotation, 0.0, 180.0)
        self.scale = self._range("scale", scale, 0.0, positive=True)
        # tan(90 degrees) is infinite: a shear must stay below it
        self.max_shear = self._number("max_shear", max_shear, 0.0, 89.0)
        self.max_translation = self._number("max_translation", max_translation, 0.0, 1.0)
        self.elastic_std = self._number("elastic_std", elastic_std, 0.0, expected="a finite number >= 0")
        if isinstance(elastic_grid, bool) or not isinstance(elastic_grid, int) or elastic_grid < 1:
            raise self._bad("elastic_grid", elastic_grid, "an integer >= 1 (e.g. 4)")
        self.elastic_grid = elastic_grid

    def __call__(self, x: Tensor, y: Tensor, lam: float, generator: Optional[torch.Generator] = None) -> OpResult:
        check_input(x, generator)
        xf = work(x)
        n, _, h, w = xf.shape
        p = torch.rand(n, 5, generator=generator, device=x.device, dtype=xf.dtype)
        angle = torch.deg2rad((2 * p[:, 0] - 1) * self.max_rotation)
        scale = self.scale[0] + (self.scale[1] - self.scale[0]) * p[:, 1]
        shear = torch.tan(torch.deg2rad((2 * p[:, 2] - 1) * self.max_shear))
        trans = (2 * p[:, 3:5] - 1) * (2.0 * self.max_translation)  # fraction of side -> grid units
        shear_m = torch.zeros(n, 2, 2, device=x.device, dtype=xf.dtype)
        shear_m[:, 0, 0] = 1
        shear_m[:, 1, 1] = 1
        shear_m[:, 0, 1] = shear
        a_pix = rotation(angle) @ shear_m * scale.view(n, 1, 1)
        g = self.elastic_grid
        coarse = torch.randn(n, 2, g, g, generator=generator, device=x.device, dtype=xf.dtype)
        field = F.interpolate(coarse * self.elastic_std, size=(h, w), mode="bicubic", align_corners=False)
        out = affine_sample(xf, a_pix, trans, "zeros", field.permute(0, 2, 3, 1))
        return finish(out, x), y


class Crop(PerturbOp):
    """Random resized crop, per sample: area fraction uniform in ``scale`` (paper: [0.3, 0.7]), aspect
    ratio (w/h, in pixels) log-uniform in ``ratio``, box fully inside the image, resized to H x W."""

    name = "crop"

    def __init__(self, scale: Sequence[float] = (0.3, 0.7), ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0)) -> None:
        self.scale = self._range("scale", scale, 0.0, 1.0, positive=True)
        self.ratio = self._range("ratio", ratio, 0.0, positive=True)

    def __call__(self, x: Tensor, y: Tensor, lam: float, generator: Optional[torch.Generator] = None) -> OpResult:
        check_input(x, generator)
        xf = work(x)
        n = xf.shape[0]
        p = torch.rand(n, 4, generator=generator, device=x.device, dtype=xf.dtype)
        area = self.scale[0] + (self.scale[1] - self.scale[0]) * p[:, 0]
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        ratio = torch.exp(log_lo + (log_hi - log_lo) * p[:, 1])
        # Side fractions; the clamp keeps the box inside the image for extreme ratios.
        fw = torch.sqrt(area * ratio).clamp(max=1.0)
        fh = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (2 * p[:, 2] - 1) * (1 - fw)
        cy = (2 * p[:, 3] - 1) * (1 - fh)
        a_pix = torch.zeros(n, 2, 2, device=x.device, dtype=xf.dtype)
        a_pix[:, 0, 0] = fw
        a_pix[:, 1, 1] = fh
        out = affine_sample(xf, a_pix, torch.stack([cx, cy], -1), "border")
        return finish(out, x), y


class Rotate(PerturbOp):
    """Per-sample rotation uniform in [-max_degrees, max_degrees] about the centre (pixel space, so
    non-square images are not sheared); outside pixels filled with 0 (= mean)."""

    name = "rotate"

    def __init__(self, max_degrees: float = 30.0) -> None:
        self.max_degrees = self._number("max_degrees", max_degrees, 0.0, 180.0)

    def __call__(self, x: Tensor, y: Tensor, lam: float, generator: Optional[torch.Generator] = None) -> OpResult:
        check_input(x, generator)
        xf = work(x)
        n = xf.shape[0]
        angle = torch.deg2rad(uniform(n, -self.max_degrees, self.max_degrees, generator, xf))
        t = torch.zeros(n, 2, device=x.device, dtype=xf.dtype)
        return finish(affine_sample(xf, rotation(angle), t, "zeros"), x), y


class HFlip(PerturbOp):
    """Horizontal flip of the whole batch (deterministic; ``generator`` unused). No parameters."""

    name = "hflip"

    def __init__(self) -> None:
        pass

    def __call__(self, x: Tensor, y: Tensor, lam: float, generator: Optional[torch.Generator] = None) -> OpResult:
        check_input(x, generator)
        return finish(x.flip(-1), x), y


class VFlip(PerturbOp):
    """Vertical flip of the whole batch (deterministic; ``generator`` unused). No parameters."""

    name = "vflip"

    def __init__(self) -> None:
        pass

    def __call__(self, x: Tensor, y: Tensor, lam: float, generator: Optional[torch.Generator] = None) -> OpResult:
        check_input(x, generator)
        return finish(x.flip(-2), x), y
