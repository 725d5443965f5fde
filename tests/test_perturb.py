from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from kdarena import perturb
from kdarena.losses import MixedTarget
from kdarena.perturb import (
    ALL_OPS,
    CODE_POOL,
    MIXING_OPS,
    OPS,
    PAPER_POOL,
    Blur,
    Crop,
    Jitter,
    Noise,
    OpParameterError,
    Perturbation,
    PerturbationScheduler,
    Rotate,
    Warp,
    get_op,
)
from kdarena.perturb.geometry import affine_sample, rotation

SIZES = [(28, 28), (32, 32), (17, 23)]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
DETERMINISTIC_OPS = ("hflip", "vflip")  # ignore the generator


def gen(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def batch(n: int = 6, c: int = 3, h: int = 28, w: int = 28, seed: int = 0, device="cpu"):
    g = gen(seed)
    x = torch.randn(n, c, h, w, generator=g).to(device)
    y = torch.arange(n, device=device)
    return x, y


# ---------------------------------------------------------------------------------------
# Pools
# ---------------------------------------------------------------------------------------
def test_pools():
    assert PAPER_POOL == ("mixup", "cutmix", "noise", "warp", "crop")
    assert CODE_POOL == ("mixup", "noise", "jitter", "blur", "hflip", "vflip", "rotate")
    assert ALL_OPS == tuple(OPS)
    assert set(PAPER_POOL) | set(CODE_POOL) == set(ALL_OPS)
    assert MIXING_OPS == ("mixup", "cutmix")
    assert perturb.resolve_ops("code") == CODE_POOL
    assert perturb.resolve_ops("noise") == ("noise",)
    with pytest.raises(ValueError, match="valid ops"):
        perturb.resolve_ops(["mixup", "sharpen"])
    with pytest.raises(ValueError, match="valid ops"):
        perturb.get_op("sharpen")


# ---------------------------------------------------------------------------------------
# Every op: shape, dtype, device, change, reproducibility
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("name", ALL_OPS)
def test_op_preserves_shape_dtype_device_and_changes(name, c, size, dtype):
    x, y = batch(6, c, *size)
    x = x.to(dtype)
    out, target = OPS[name](x, y, 0.6, gen(1))
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert torch.isfinite(out.float()).all()
    assert not torch.equal(out, x)
    if name in MIXING_OPS:
        assert isinstance(target, MixedTarget)
        assert torch.equal(target.a, y)
        assert sorted(target.b.tolist()) == sorted(y.tolist())
        assert 0.0 <= target.lam <= 1.0
    else:
        assert target is y


@pytest.mark.parametrize("name", ALL_OPS)
def test_op_reproducible_under_seed(name):
    x, y = batch(8, 3, 17, 23)
    a, ta = OPS[name](x, y, 0.5, gen(3))
    b, tb = OPS[name](x, y, 0.5, gen(3))
    assert torch.equal(a, b)
    if name in MIXING_OPS:
        assert torch.equal(ta.b, tb.b) and ta.lam == tb.lam
    c, _ = OPS[name](x, y, 0.5, gen(4))
    if name in DETERMINISTIC_OPS:
        assert torch.equal(a, c)
    else:
        assert not torch.equal(a, c)


@pytest.mark.parametrize("name", ALL_OPS)
def test_op_channels_last(name):
    x, y = batch(5, 3, 17, 23)
    xcl = x.contiguous(memory_format=torch.channels_last)
    ref, _ = OPS[name](x, y, 0.5, gen(7))
    out, _ = OPS[name](xcl, y, 0.5, gen(7))
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ALL_OPS)
def test_bfloat16_close_to_float32(name):
    x, y = batch(4, 3, 16, 16)
    xb = x.to(torch.bfloat16)
    ref, _ = OPS[name](xb.float(), y, 0.5, gen(5))
    out, _ = OPS[name](xb, y, 0.5, gen(5))
    torch.testing.assert_close(out.float(), ref.to(torch.bfloat16).float(), rtol=0, atol=0)


def test_ops_accept_other_channel_counts_and_float64():
    x, y = batch(3, 5, 12, 9)
    for name, op in OPS.items():
        out, _ = op(x.double(), y, 0.5, gen(0))
        assert out.dtype == torch.float64 and out.shape == x.shape, name


def test_bad_input_rejected():
    x, y = batch(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        perturb.noise(x[0], y, 0.5, gen(0))
    with pytest.raises(ValueError, match="floating-point"):
        perturb.noise((x * 100).to(torch.uint8), y, 0.5, gen(0))


# ---------------------------------------------------------------------------------------
# Mixing ops: targets consistent with the pixels
# ---------------------------------------------------------------------------------------
def constant_batch(labels: torch.Tensor, c: int = 3, h: int = 17, w: int = 23) -> torch.Tensor:
    """Each image is constant, equal to its label."""
    return labels.float().view(-1, 1, 1, 1).expand(-1, c, h, w).contiguous()


@pytest.mark.parametrize("lam", [0.1, 0.37, 0.8])
def test_mixup_targets_match_pixels(lam):
    y = torch.tensor([3, 7, 1, 9, 4, 0, 6, 2])
    x = constant_batch(y)
    out, t = perturb.mixup(x, y, lam, gen(11))
    assert isinstance(t, MixedTarget) and t.lam == pytest.approx(lam)
    assert torch.equal(t.a, y)
    expected = t.lam * t.a.float() + (1 - t.lam) * t.b.float()
    torch.testing.assert_close(out, expected.view(-1, 1, 1, 1).expand_as(out))
    # The partner is recoverable from the pixel value: b = (x' - lam*y) / (1 - lam).
    partner = (out[:, 0, 0, 0] - lam * y.float()) / (1 - lam)
    torch.testing.assert_close(partner, t.b.float(), rtol=0, atol=1e-4)
    assert sorted(t.b.tolist()) == sorted(y.tolist())


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("lam", [0.2, 0.5, 0.75])
def test_cutmix_lam_is_true_area(lam, size):
    y = torch.arange(8) * 10
    x = constant_batch(y, 1, *size)
    out, t = perturb.cutmix(x, y, lam, gen(2))
    assert torch.equal(t.a, y)
    own = out == t.a.float().view(-1, 1, 1, 1)
    partner = out == t.b.float().view(-1, 1, 1, 1)
    assert (own | partner).all()  # every pixel is own or partner's
    moved = t.a != t.b
    assert moved.any()
    frac_own = own[moved].float().flatten(1).mean(1)
    torch.testing.assert_close(frac_own, torch.full_like(frac_own, t.lam))
    # close to the requested lam (rounding of the box sides only)
    assert abs(t.lam - lam) < 0.12
    # same box for the whole batch
    masks = partner[moved]
    assert (masks == masks[:1]).all()


def test_cutmix_box_is_a_rectangle():
    y = torch.arange(4)
    x = constant_batch(y + 1, 1, 20, 30)
    out, t = perturb.cutmix(x, y + 1, 0.4, gen(9))
    i = int(torch.nonzero(t.a != t.b)[0])
    mask = out[i, 0] != t.a[i].float()
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    assert mask.sum() == len(rows) * len(cols)
    assert mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()


# ---------------------------------------------------------------------------------------
# Geometric ops
# ---------------------------------------------------------------------------------------
def coordinate_batch(n: int, h: int, w: int) -> torch.Tensor:
    """Channel 0 = normalised x of each pixel centre, channel 1 = normalised y."""
    xs = (2 * torch.arange(w) + 1) / w - 1
    ys = (2 * torch.arange(h) + 1) / h - 1
    img = torch.stack([xs.view(1, w).expand(h, w), ys.view(h, 1).expand(h, w)])
    return img.unsqueeze(0).repeat(n, 1, 1, 1)


@pytest.mark.parametrize("size", SIZES)
def test_crop_scale_and_ratio(size):
    h, w = size
    n = 64
    x = coordinate_batch(n, h, w)
    out, _ = perturb.crop(x, torch.zeros(n, dtype=torch.long), 0.5, gen(1))
    # Interior pixels (away from the border clamp) interpolate a linear ramp exactly:
    # the slope ratio out/in is the crop's side fraction.
    fw = (out[:, 0, :, w - 2] - out[:, 0, :, 1]).mean(1) / (x[0, 0, 0, w - 2] - x[0, 0, 0, 1])
    fh = (out[:, 1, h - 2, :] - out[:, 1, 1, :]).mean(1) / (x[0, 1, h - 2, 0] - x[0, 1, 1, 0])
    area = fw * fh
    assert (area >= 0.3 - 1e-4).all() and (area <= 0.7 + 1e-4).all()
    ratio = fw * w / (fh * h) / (w / h)  # crop aspect ratio in pixels relative to the image's
    assert (ratio >= 0.75 - 1e-3).all() and (ratio <= 4 / 3 + 1e-3).all()
    assert area.max() - area.min() > 0.2  # per-sample scales
    # the visible window stays inside the image
    assert out.min() >= -1 and out.max() <= 1


def test_hflip_vflip_exact():
    x, y = batch(4, 3, 17, 23)
    out, t = perturb.hflip(x, y, 0.5, gen(0))
    assert torch.equal(out, x[..., torch.arange(22, -1, -1)]) and t is y
    out, t = perturb.vflip(x, y, 0.5, gen(0))
    assert torch.equal(out, x[..., torch.arange(16, -1, -1), :]) and t is y
    # involution
    assert torch.equal(perturb.hflip(perturb.hflip(x, y, 0, None)[0], y, 0, None)[0], x)


def test_affine_helper_rotation_matches_rot90():
    x, _ = batch(2, 3, 16, 16)
    a = rotation(torch.full((2,), math.pi / 2))
    out = affine_sample(x, a, torch.zeros(2, 2), "zeros")
    ref = torch.rot90(x, k=1, dims=(2, 3))
    ref2 = torch.rot90(x, k=-1, dims=(2, 3))
    assert torch.allclose(out, ref, atol=1e-4) or torch.allclose(out, ref2, atol=1e-4)


def isotropic_blob(n: int, h: int, w: int, sigma: float = 4.0) -> torch.Tensor:
    yy = torch.arange(h).float() - (h - 1) / 2
    xx = torch.arange(w).float() - (w - 1) / 2
    img = torch.exp(-(yy.view(h, 1) ** 2 + xx.view(1, w) ** 2) / (2 * sigma**2))
    return img.expand(n, 1, h, w).contiguous()


def test_rotate_is_a_true_rotation_on_non_square_images():
    # A centred isotropic blob is rotation invariant in PIXEL space; a rotation done in the
    # normalised [-1, 1] grid would squash it on a 17x33 image.
    # (compared within a centred disk, away from the zero-filled corners)
    x = isotropic_blob(16, 17, 33, sigma=3.0)
    out, _ = perturb.rotate(x, torch.zeros(16, dtype=torch.long), 0.0, gen(0))
    yy = torch.arange(17).float().view(-1, 1) - 8
    xx = torch.arange(33).float().view(1, -1) - 16
    disk = yy**2 + xx**2 <= 36
    assert (out - x)[..., disk].abs().max() < 0.03
    a = rotation(torch.full((1,), math.radians(30)))
    th = torch.cat([a, torch.zeros(1, 2, 1)], 2)  # the same rotation in normalised grid units
    naive = torch.nn.functional.grid_sample(
        x[:1], torch.nn.functional.affine_grid(th, [1, 1, 17, 33], align_corners=False), align_corners=False
    )
    assert (naive - x[:1])[..., disk].abs().max() > 0.1


def test_rotate_angle_range():
    # A thin horizontal bar through the centre: its orientation after rotation gives the angle.
    n, h, w = 256, 33, 33
    x = torch.zeros(n, 1, h, w)
    x[:, :, h // 2, 4:-4] = 1.0
    out, _ = perturb.rotate(x, torch.zeros(n, dtype=torch.long), 0.0, gen(1))
    yy, xx = torch.meshgrid(torch.arange(h).float() - h // 2, torch.arange(w).float() - w // 2, indexing="ij")
    m = out[:, 0]
    # second moments -> orientation of the principal axis
    sxx = (m * xx * xx).sum((1, 2))
    syy = (m * yy * yy).sum((1, 2))
    sxy = (m * xx * yy).sum((1, 2))
    angle = torch.rad2deg(0.5 * torch.atan2(2 * sxy, sxx - syy)).abs()
    assert angle.max() <= 31.0
    assert angle.max() > 20.0  # the range is actually used
    assert angle.min() < 5.0


def test_warp_moves_pixels_but_keeps_content_statistics():
    x = isotropic_blob(8, 32, 32, sigma=5.0)
    out, _ = perturb.warp(x, torch.zeros(8, dtype=torch.long), 0.0, gen(0))
    diff = (out - x).abs().flatten(1).max(1).values
    assert (diff > 0.05).all()  # each sample warped (translation / scale / elastic)
    assert torch.equal(out[0], perturb.warp(x, x.new_zeros(8).long(), 0.0, gen(0))[0][0])


# ---------------------------------------------------------------------------------------
# Photometric ops
# ---------------------------------------------------------------------------------------
def test_noise_std_constructor_argument():
    x = torch.zeros(16, 3, 32, 32)
    out, _ = perturb.noise(x, torch.zeros(16).long(), 0.5, gen(0))
    assert out.std().item() == pytest.approx(1.0, rel=0.03)
    out, _ = Noise(std=0.25)(x, torch.zeros(16).long(), 0.5, gen(0))
    assert out.std().item() == pytest.approx(0.25, rel=0.03)


def test_jitter_grey_is_per_sample_affine():
    x, y = batch(6, 1, 17, 23)
    out, _ = perturb.jitter(x, y, 0.5, gen(2))
    for i in range(6):
        a = torch.stack([x[i].flatten(), torch.ones(x[i].numel())], 1)
        sol = torch.linalg.lstsq(a, out[i].flatten().unsqueeze(1)).solution
        torch.testing.assert_close(a @ sol, out[i].flatten().unsqueeze(1), atol=1e-4, rtol=1e-4)
    scales = [float(torch.linalg.lstsq(torch.stack([x[i].flatten(), torch.ones(x[i].numel())], 1),
                                       out[i].flatten().unsqueeze(1)).solution[0]) for i in range(6)]
    assert len({round(s, 4) for s in scales}) > 1  # per-sample contrast


def test_jitter_colour_changes_saturation():
    grey = torch.randn(4, 1, 8, 8).expand(4, 3, 8, 8).contiguous()
    out, _ = perturb.jitter(grey, torch.zeros(4).long(), 0.5, gen(0))
    # a grey image stays grey (saturation only scales the deviations from grey)
    torch.testing.assert_close(out[:, 0], out[:, 1])
    x, _ = batch(4, 3, 8, 8)
    out, _ = perturb.jitter(x, torch.zeros(4).long(), 0.5, gen(0))
    spread_in = (x - x.mean(1, keepdim=True)).flatten(1).norm(dim=1)
    spread_out = (out - out.mean(1, keepdim=True)).flatten(1).norm(dim=1)
    assert not torch.allclose(spread_in, spread_out)


def test_blur_keeps_constant_images_and_smooths():
    x = torch.full((2, 3, 17, 23), 0.7)
    out, _ = perturb.blur(x, torch.zeros(2).long(), 0.5, gen(0))
    torch.testing.assert_close(out, x)
    x, y = batch(4, 3, 32, 32)
    out, _ = perturb.blur(x, y, 0.5, gen(0))
    tv = lambda t: (t[..., 1:] - t[..., :-1]).abs().mean()  # noqa: E731
    assert tv(out) < 0.6 * tv(x)
    torch.testing.assert_close(out.mean((2, 3)), x.mean((2, 3)), atol=0.05, rtol=0)
    # tiny images: the kernel radius is capped by the size
    out, _ = perturb.blur(torch.randn(2, 1, 2, 3), y[:2], 0.5, gen(0))
    assert out.shape == (2, 1, 2, 3)


# ---------------------------------------------------------------------------------------
# Scheduler
# ---------------------------------------------------------------------------------------
def test_scheduler_every_step():
    s = PerturbationScheduler(3)
    decisions = [s.decide(i) for i in range(200)]
    assert all(isinstance(d, Perturbation) for d in decisions)
    assert all(0 <= d.network < 3 and d.op in PAPER_POOL and 0 <= d.lam <= 1 for d in decisions)


def test_scheduler_every_k():
    s = PerturbationScheduler(2, every=10)
    for step in range(300):
        d = s.decide(step)
        assert (d is not None) == (step % 10 == 0)


def test_scheduler_draws_aligned_regardless_of_outcome():
    a = PerturbationScheduler(4, every=1, seed=5)
    b = PerturbationScheduler(4, every=7, seed=5)
    c = PerturbationScheduler(4, every=1, probability=0.5, seed=5)
    for step in range(200):
        da, db, dc = a.decide(step), b.decide(step), c.decide(step)
        if db is not None:
            assert db == da
        if dc is not None:
            assert dc == da


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_scheduler_probability(p):
    s = PerturbationScheduler(3, probability=p, seed=1)
    hits = sum(s.decide(i) is not None for i in range(5000))
    assert abs(hits / 5000 - p) < 0.025


def test_scheduler_uniform_network_and_op():
    s = PerturbationScheduler(3, ops=ALL_OPS, seed=2)
    ds = [s.decide(i) for i in range(10000)]
    nets = torch.bincount(torch.tensor([d.network for d in ds]), minlength=3).float()
    ops = torch.bincount(torch.tensor([ALL_OPS.index(d.op) for d in ds]), minlength=len(ALL_OPS)).float()
    assert ((nets / nets.mean() - 1).abs() < 0.08).all()
    assert ((ops / ops.mean() - 1).abs() < 0.15).all()
    lam = torch.tensor([d.lam for d in ds])
    assert abs(lam.mean().item() - 0.5) < 0.02  # Beta(1, 1) = uniform
    assert abs(lam.var().item() - 1 / 12) < 0.01


def test_scheduler_mix_alpha_shapes_lam():
    s = PerturbationScheduler(2, mix_alpha=0.2, seed=0)
    lam = torch.tensor([s.decide(i).lam for i in range(4000)])
    # Beta(0.2, 0.2) is U-shaped: var = 1/(4*(2*0.2+1)) ~= 0.179
    assert abs(lam.var().item() - 1 / (4 * 1.4)) < 0.015


def test_scheduler_same_seed_same_decisions():
    a = [PerturbationScheduler(4, ops=CODE_POOL, seed=9).decide(i) for i in range(1)]
    s1, s2, s3 = (PerturbationScheduler(4, ops=CODE_POOL, seed=k) for k in (9, 9, 10))
    d1 = [s1.decide(i) for i in range(100)]
    d2 = [s2.decide(i) for i in range(100)]
    d3 = [s3.decide(i) for i in range(100)]
    assert d1 == d2 and d1 != d3
    assert a[0] == d1[0]


def run_steps(s: PerturbationScheduler, steps, x, y):
    out = []
    for step in steps:
        d = s.decide(step)
        xp, t = s.apply(d, x, y)
        out.append((d, xp.clone(), t))
    return out


def assert_same_runs(r1, r2):
    assert len(r1) == len(r2)
    for (d1, x1, t1), (d2, x2, t2) in zip(r1, r2):
        assert d1 == d2
        assert torch.equal(x1, x2)
        if isinstance(t1, MixedTarget):
            assert torch.equal(t1.b, t2.b) and t1.lam == t2.lam


def test_scheduler_state_dict_round_trip():
    x, y = batch(6, 3, 17, 23)
    s = PerturbationScheduler(3, ops=ALL_OPS, every=2, seed=4)
    run_steps(s, range(0, 40), x, y)
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    expected = run_steps(s, range(40, 100), x, y)
    assert any(d is not None and d.op not in DETERMINISTIC_OPS for d, _, _ in expected)

    resumed = PerturbationScheduler(3, ops=ALL_OPS, every=2, seed=4)
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf))
    assert_same_runs(run_steps(resumed, range(40, 100), x, y), expected)
    # a fresh scheduler without the state does NOT continue the sequence
    fresh = run_steps(PerturbationScheduler(3, ops=ALL_OPS, every=2, seed=4), range(40, 100), x, y)
    assert [d for d, _, _ in fresh] != [d for d, _, _ in expected]


def test_scheduler_state_dict_before_any_apply_and_resave():
    s = PerturbationScheduler(2, seed=1)
    state = s.state_dict()
    assert state["sample_generators"] == {}
    t = PerturbationScheduler(2, seed=1)
    t.load_state_dict(state)
    assert t.decide(0) == s.decide(0)
    # pending (not yet materialised) device states survive a save/load/save cycle
    t.load_state_dict({"decision_generator": state["decision_generator"],
                       "sample_generators": {"cuda:0": torch.zeros(16, dtype=torch.uint8)}})
    assert "cuda:0" in t.state_dict()["sample_generators"]


def test_scheduler_apply_with_explicit_generator_and_none():
    x, y = batch(4, 3, 16, 16)
    s = PerturbationScheduler(2, ops=("noise",), seed=0)
    d = s.decide(0)
    out, t = s.apply(d, x, y, gen(42))
    ref, _ = perturb.noise(x, y, d.lam, gen(42))
    assert torch.equal(out, ref) and t is y
    assert s.apply(None, x, y) == (x, y)
    with pytest.raises(ValueError, match="valid ops"):
        s.apply(Perturbation(0, "sharpen", 0.5), x, y)
    # the scheduler's own sample generator is decorrelated from the decision generator
    assert not torch.equal(s.apply(d, x, y)[0], perturb.noise(x, y, 0.0, gen(0))[0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_networks=0), "num_networks"),
        (dict(num_networks=2, every=0), "every"),
        (dict(num_networks=2, every=1.5), "every"),
        (dict(num_networks=2, probability=1.5), "probability"),
        (dict(num_networks=2, probability=-0.1), "probability"),
        (dict(num_networks=2, ops=("mixup", "blurr")), "valid ops"),
        (dict(num_networks=2, ops=()), "empty"),
        (dict(num_networks=2, mix_alpha=0.0), "mix_alpha"),
    ],
)
def test_scheduler_invalid_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PerturbationScheduler(**kwargs)


# ---------------------------------------------------------------------------------------
# Op parameters (constructor arguments, get_op, scheduler op_params, config)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_OPS)
def test_default_instances_equal_fresh_ones_and_get_op(name):
    x, y = batch(4, 3, 17, 23)
    fresh = perturb.OP_CLASSES[name]()
    assert get_op(name) is OPS[name] is getattr(perturb, name)
    assert torch.equal(fresh(x, y, 0.4, gen(2))[0], OPS[name](x, y, 0.4, gen(2))[0])
    params = fresh.params()
    if params:  # the defaults passed explicitly build the same op, with the same numbers
        explicit = get_op(name, **params)
        assert explicit == fresh and explicit is not OPS[name]
        assert torch.equal(explicit(x, y, 0.4, gen(2))[0], fresh(x, y, 0.4, gen(2))[0])


def test_noise_std_zero_is_identity_and_clamp_is_respected():
    x, y = batch(4, 3, 16, 16)
    out, _ = Noise(std=0)(x, y, 0.5, gen(0))
    assert torch.equal(out, x)
    out, _ = Noise(clamp=(0, 1))(x, y, 0.5, gen(0))
    assert out.min() == 0 and out.max() == 1  # N(0, 1) on N(0, 1) data reaches both bounds
    # the authors' clamp: every negative normalised value becomes 0
    ref, _ = perturb.noise(x, y, 0.5, gen(0))
    assert torch.equal(out, ref.clamp(0, 1))
    out, _ = get_op("noise", std=0.0, clamp=[-0.5, 0.5])(x, y, 0.5, gen(0))
    assert torch.equal(out, x.clamp(-0.5, 0.5))


def test_jitter_parameters_and_clamp():
    x, y = batch(4, 3, 16, 16)
    out, _ = Jitter(brightness=0, contrast=0, saturation=0)(x, y, 0.5, gen(0))
    torch.testing.assert_close(out, x, rtol=0, atol=1e-6)  # every factor is 1: the identity (up to rounding)
    ref, _ = perturb.jitter(x, y, 0.5, gen(0))
    out, _ = Jitter(clamp=(0, 1))(x, y, 0.5, gen(0))
    assert torch.equal(out, ref.clamp(0, 1))
    # brightness only: a per-sample shift within [-b, b]
    out, _ = Jitter(brightness=0.2, contrast=0, saturation=0)(x, y, 0.5, gen(0))
    shift = (out - x).flatten(1)
    torch.testing.assert_close(shift.max(1).values, shift.min(1).values, rtol=0, atol=1e-5)
    assert shift.abs().max() <= 0.2 + 1e-6 and shift.abs().max() > 0.05


def test_crop_scale_parameter_is_respected():
    h, w, n = 32, 32, 64
    x = coordinate_batch(n, h, w)
    out, _ = Crop(scale=(0.1, 0.15), ratio=(1, 1))(x, torch.zeros(n, dtype=torch.long), 0.5, gen(1))
    fw = (out[:, 0, :, w - 2] - out[:, 0, :, 1]).mean(1) / (x[0, 0, 0, w - 2] - x[0, 0, 0, 1])
    fh = (out[:, 1, h - 2, :] - out[:, 1, 1, :]).mean(1) / (x[0, 1, h - 2, 0] - x[0, 1, 1, 0])
    area = fw * fh
    assert (area >= 0.1 - 1e-4).all() and (area <= 0.15 + 1e-4).all()
    torch.testing.assert_close(fw, fh, rtol=1e-3, atol=1e-4)  # ratio (1, 1): square boxes


def test_rotate_and_blur_and_warp_parameters():
    x, y = batch(4, 3, 16, 16)
    out, _ = Rotate(max_degrees=0)(x, y, 0.5, gen(0))
    torch.testing.assert_close(out, x, rtol=0, atol=1e-5)  # a zero rotation resamples every pixel at itself
    out, _ = Warp(max_rotation=0, scale=(1, 1), max_shear=0, max_translation=0, elastic_std=0)(x, y, 0.5, gen(0))
    torch.testing.assert_close(out, x, rtol=0, atol=1e-5)
    tv = lambda t: (t[..., 1:] - t[..., :-1]).abs().mean()  # noqa: E731
    weak, _ = Blur(sigma=(0.3, 0.3))(x, y, 0.5, gen(0))
    strong, _ = Blur(sigma=(3.0, 3.0))(x, y, 0.5, gen(0))
    assert tv(strong) < tv(weak) < tv(x)


@pytest.mark.parametrize(
    "name, params, match",
    [
        ("noise", dict(sdt=0.5), r"op noise has no parameter 'sdt'; valid keys: std, clamp"),
        ("noise", dict(std=-1.0), r"op noise: parameter std must be"),
        ("noise", dict(std=float("nan")), r"parameter std"),
        ("noise", dict(clamp=(1.0, 0.0)), r"parameter clamp"),
        ("noise", dict(clamp=0.5), r"parameter clamp"),
        ("jitter", dict(contrast=1.5), r"op jitter: parameter contrast"),
        ("crop", dict(scale=(0.5, 0.3)), r"op crop: parameter scale"),
        ("crop", dict(scale=(0.0, 0.5)), r"op crop: parameter scale"),
        ("crop", dict(ratio=(1.0,)), r"op crop: parameter ratio"),
        ("warp", dict(elastic_grid=0), r"op warp: parameter elastic_grid"),
        ("warp", dict(max_shear=90.0), r"op warp: parameter max_shear"),
        ("blur", dict(sigma=(0.0, 1.0)), r"op blur: parameter sigma"),
        ("rotate", dict(max_degrees="30"), r"op rotate: parameter max_degrees"),
        ("hflip", dict(p=0.5), r"op hflip has no parameter 'p'; valid keys: \(none"),
        ("sharpen", dict(), r"unknown perturbation op 'sharpen'; valid ops: mixup"),
        ("sharpen", dict(amount=1), r"unknown perturbation op 'sharpen'"),
    ],
)
def test_get_op_errors(name, params, match):
    with pytest.raises(ValueError, match=match) as info:
        get_op(name, **params)
    assert "\n" not in str(info.value)
    if params and name != "sharpen":
        assert isinstance(info.value, OpParameterError)
        assert info.value.op == name and info.value.key == next(iter(params))


def test_scheduler_op_params():
    x, y = batch(4, 3, 16, 16)
    s = PerturbationScheduler(2, ops=("noise", "crop"), seed=0, op_params={"noise": {"std": 0.0}})
    ds = [d for d in (s.decide(i) for i in range(20)) if d.op == "noise"]
    assert ds
    assert torch.equal(s.apply(ds[0], x, y)[0], x)  # std 0: the scheduler's noise is the identity
    config = s.state_dict()["config"]
    assert config["op_params"] == {"noise": {"std": 0.0, "clamp": None}}
    assert "op_params" in repr(s)
    # defaults: same numbers as the module-level ops, and an empty record
    d = PerturbationScheduler(2, ops=("noise",), seed=0).decide(0)
    t = PerturbationScheduler(2, ops=("noise",), seed=0, op_params={})
    assert torch.equal(t.apply(d, x, y, gen(3))[0], perturb.noise(x, y, d.lam, gen(3))[0])
    assert t.state_dict()["config"]["op_params"] == {}
    with pytest.raises(ValueError, match="op_params has an entry for op rotate, which is not in the pool"):
        PerturbationScheduler(2, ops="paper", op_params={"rotate": {"max_degrees": 10}})
    with pytest.raises(ValueError, match="op noise has no parameter 'sdt'"):
        PerturbationScheduler(2, op_params={"noise": {"sdt": 1}})
    with pytest.raises(ValueError, match="unknown op 'sharpen'"):
        PerturbationScheduler(2, op_params={"sharpen": {}})


def test_config_op_params_and_ops_validation():
    from kdarena.config import ConfigError, load

    config = load(None, ["perturb.op_params={noise: {std: 0.5}}"])
    assert config.perturb.op_params == {"noise": {"std": 0.5}}
    s = PerturbationScheduler(2, ops=perturb.resolve_ops(config.perturb.ops), op_params=config.perturb.op_params)
    assert s._ops["noise"].std == 0.5
    assert load(None, ["perturb.ops=code", "perturb.op_params={jitter: {clamp: [0, 1]}}"]).perturb.op_params == {
        "jitter": {"clamp": [0, 1]}}
    assert load(None, ["perturb.ops=noise"]).perturb.ops == ["noise"]
    cases = [
        (["perturb.op_params={noise: {sdt: 0.5}}"], "'perturb.op_params.noise.sdt'", "valid keys: std, clamp"),
        (["perturb.op_params={noise: {std: -1}}"], "'perturb.op_params.noise.std'", "must be a finite number >= 0"),
        (["perturb.op_params={rotate: {max_degrees: 5}}"], "'perturb.op_params.rotate'", "add it to ops"),
        (["perturb.op_params={sharpen: {amount: 1}}"], "'perturb.op_params.sharpen'", "valid ops: mixup"),
        (["perturb.ops=[mixup, sharpen]"], "'perturb.ops'",
         "unknown op(s) ['sharpen']; valid: paper, code, all, or a list of mixup"),
        (["perturb.ops=sharpen"], "'perturb.ops'", "unknown op(s) ['sharpen']"),
        (["perturb.ops=[]"], "'perturb.ops'", "the pool is empty"),
    ]
    for overrides, key, text in cases:
        with pytest.raises(ConfigError) as info:
            load(None, overrides)
        message = str(info.value)
        assert key in message and text in message and "\n" not in message, message


# ---------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------
@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ALL_OPS)
def test_cuda_ops(name, dtype):
    x, y = batch(6, 3, 17, 23, device="cuda")
    x = x.to(dtype).contiguous(memory_format=torch.channels_last)
    out, t = OPS[name](x, y, 0.5, gen(0, "cuda"))
    assert out.device == x.device and out.dtype == dtype and out.shape == x.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(out, x)
    again, _ = OPS[name](x, y, 0.5, gen(0, "cuda"))
    assert torch.equal(out, again)
    if name in MIXING_OPS:
        assert t.b.device == y.device


@CUDA
def test_cuda_generator_device_mismatch():
    x, y = batch(2, 3, 8, 8, device="cuda")
    with pytest.raises(ValueError, match="generator"):
        perturb.noise(x, y, 0.5, gen(0, "cpu"))


@CUDA
def test_cuda_scheduler_state_round_trip():
    x, y = batch(6, 3, 16, 16, device="cuda")
    s = PerturbationScheduler(3, ops=ALL_OPS, seed=2)
    run_steps(s, range(20), x, y)
    state = copy.deepcopy(s.state_dict())
    assert any(k.startswith("cuda") for k in state["sample_generators"])
    assert all(v.device.type == "cpu" and v.dtype == torch.uint8 for v in state["sample_generators"].values())
    expected = run_steps(s, range(20, 60), x, y)
    r = PerturbationScheduler(3, ops=ALL_OPS, seed=2)
    r.load_state_dict(state)
    assert_same_runs(run_steps(r, range(20, 60), x, y), expected)
