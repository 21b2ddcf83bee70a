"""Tests for sfd.diffusion, sfd.guidance and sfd.samplers: time split, losses, three-phase samplers, guidance, per-sample seeds.

The samplers are checked against the closed-form velocity field of Gaussian data
(docs/method.md §4.1): for x1 ~ N(μ, σ²) per element and x_t = t·x1 + (1−t)·x0,

    v(x, t) = E[x1 − x0 | x_t = x] = μ + (t·σ² − (1−t)) / (t²σ² + (1−t)²) · (x − t·μ),

whose flow maps every noise sample x0 to exactly μ + σ·x0. In the asynchronous setting each part
follows its own time, so the composite field is this field at (t_tex, t_sem) per part.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from sfd.diffusion import (
    AsyncClock,
    LossTerms,
    noise_composite,
    per_channel,
    repa_loss,
    sample_training_times,
    sfd_loss,
)
from sfd.guidance import autoguidance, classifier_free_guidance, model_velocity
from sfd.samplers import (
    SamplerStep,
    allocate_steps,
    fixed_grid,
    initial_noise,
    sample,
    sample_dopri5,
    sample_euler,
    sample_heun,
)

C_TEX, C_SEM, SIDE = 4, 2, 2
C = C_TEX + C_SEM
DELTA_T = 0.3


# ---------------------------------------------------------------------------------------------
# Time split (docs/method.md §4.2)


def clamp_probability(delta_t: float) -> float:
    """P(t_sem = 1) = P(n ≥ logit(1/(1+Δt))) = P(t_tex = 0) for n ~ N(0, 1)."""
    z = math.log(1.0 / delta_t)  # logit(1/(1+Δt)) = ln(1/Δt)
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_time_split_statistics():
    n = 200_000
    t_tex, t_sem = sample_training_times(n, DELTA_T, generator=torch.Generator().manual_seed(0))
    p = clamp_probability(DELTA_T)
    assert abs(p - 0.114) < 0.001  # docs/method.md §4.2: ≈ 11.4% each
    tol = 5 * math.sqrt(p * (1 - p) / n)
    assert abs((t_sem == 1).float().mean().item() - p) < tol
    assert abs((t_tex == 0).float().mean().item() - p) < tol
    assert bool((t_sem >= t_tex).all())
    assert t_tex.min() >= 0 and t_sem.max() <= 1
    # Outside the clamped regions the gap is exactly Δt; means as in docs/method.md §4.2.
    inner = (t_sem < 1) & (t_tex > 0)
    assert torch.allclose(
        t_sem[inner] - t_tex[inner], torch.full_like(t_sem[inner], DELTA_T), atol=1e-6
    )
    assert abs(t_sem.mean().item() - 0.64) < 0.01 and abs(t_tex.mean().item() - 0.36) < 0.01


def test_time_split_other_delta_t_and_seeding():
    for delta_t, expected in [(0.1, 0.011), (0.5, 0.244), (1.0, 0.5)]:  # docs/method.md §4.2
        assert abs(clamp_probability(delta_t) - expected) < 0.001
    t_tex, t_sem = sample_training_times(1000, 0.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(t_tex, t_sem)  # Δt = 0: synchronous, one time
    a = sample_training_times(64, DELTA_T, generator=torch.Generator().manual_seed(7))
    b = sample_training_times(64, DELTA_T, generator=torch.Generator().manual_seed(7))
    c = sample_training_times(64, DELTA_T, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    with pytest.raises(ValueError):
        sample_training_times(4, 1.5)


def test_noise_composite_per_part_times():
    x1 = torch.randn(3, C, SIDE, SIDE)
    x0 = torch.randn(3, C, SIDE, SIDE)
    t_tex, t_sem = torch.tensor([0.0, 0.2, 0.7]), torch.tensor([0.3, 0.5, 1.0])
    x_t, target, noise = noise_composite(x1, t_tex, t_sem, C_SEM, x0=x0)
    assert noise is x0
    for i in range(3):
        tt, ts = t_tex[i].item(), t_sem[i].item()
        assert torch.allclose(x_t[i, :C_TEX], tt * x1[i, :C_TEX] + (1 - tt) * x0[i, :C_TEX])
        assert torch.allclose(x_t[i, C_TEX:], ts * x1[i, C_TEX:] + (1 - ts) * x0[i, C_TEX:])
    assert torch.equal(target, x1 - x0)
    assert torch.equal(x_t[0, :C_TEX], x0[0, :C_TEX])  # t_tex = 0: pure noise
    assert torch.equal(x_t[2, C_TEX:], x1[2, C_TEX:])  # t_sem = 1: clean


def test_training_draw_modes():
    """The trainer's draw: times then noise from one generator, reproducible; Δt = 0 is plain FM."""

    def draw(delta_t: float, sem: int) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(0)
        t_tex, t_sem = sample_training_times(x1.shape[0], delta_t, generator=gen)
        x_t, target, x0 = noise_composite(x1, t_tex, t_sem, sem, generator=gen)
        return x_t, target, x0, t_tex, t_sem

    x1 = torch.randn(8, C, SIDE, SIDE)
    x_t, target, x0, _, t_sem = draw(DELTA_T, C_SEM)
    again = draw(DELTA_T, C_SEM)
    assert torch.equal(x_t, again[0]) and torch.equal(t_sem, again[4])
    assert torch.equal(target, x1 - x0)
    x_t, _, x0, t_tex, t_sem = draw(0.0, 0)  # plain FM
    t = t_tex.view(-1, 1, 1, 1)
    assert torch.equal(t_tex, t_sem)
    assert torch.allclose(x_t, t * x1 + (1 - t) * x0)
    with pytest.raises(ValueError):
        AsyncClock(DELTA_T, 0)  # Δt > 0 needs semantic channels


# ---------------------------------------------------------------------------------------------
# Losses (docs/method.md §4.5, §4.6)


def test_mse_with_semantic_weight_hand_computed():
    # 2 texture + 1 semantic channel, 1x2 positions; squared errors chosen by hand.
    target = torch.zeros(1, 3, 1, 2)
    pred = torch.tensor([[[[1.0, 0.0]], [[2.0, 0.0]], [[3.0, 1.0]]]])
    terms = sfd_loss(pred, target, semantic_chans=1, semantic_weight=2.0, use_cosine_loss=False)
    # (1/(C·HW))·[Σ_tex + β·Σ_sem] = (1 + 4 + 2·(9 + 1)) / 6
    assert terms.mse.item() == pytest.approx(25 / 6)
    assert terms.cos.item() == 0 and terms.repa.item() == 0
    assert terms.total.item() == pytest.approx(25 / 6)
    plain = sfd_loss(pred, target, semantic_chans=0, use_cosine_loss=False)
    assert plain.mse.item() == pytest.approx((1 + 4 + 9 + 1) / 6)


def test_cosine_loss_hand_computed():
    # Position 0: orthogonal (1 − cos = 1); position 1: parallel (0). Cosine over all channels.
    pred = torch.tensor([[[[1.0, 1.0]], [[0.0, 1.0]], [[0.0, 0.0]]]])
    target = torch.tensor([[[[0.0, 2.0]], [[1.0, 2.0]], [[0.0, 0.0]]]])
    terms = sfd_loss(pred, target, semantic_chans=1, semantic_weight=2.0)
    assert terms.cos.item() == pytest.approx(0.5)
    assert terms.total.item() == pytest.approx(terms.mse.item() + 0.5)
    # The semantic channel takes part in the same cosine (authors: one 48-d cosine, §12.3 item 8).
    target_sem = target.clone()
    target_sem[0, 2, 0, 1] = 5.0
    assert sfd_loss(pred, target_sem, semantic_chans=1).cos.item() > 0.5


@pytest.mark.parametrize("mode, expected", [("cos", 0.5), ("mse", 0.75), ("cos_mse", 0.625)])
def test_repa_modes_and_counted_without_cosine(mode, expected):
    proj = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])  # (B=1, N=2 tokens, D=2)
    feats = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])
    # cos: tokens 0, 1 → (0 + 1)/2; mse: (1 + 0 + 1 + 1)/4; cos_mse: their average.
    assert repa_loss(proj, feats, mode).item() == pytest.approx(expected)
    pred, target = torch.ones(1, 3, 1, 2), torch.zeros(1, 3, 1, 2)
    terms = sfd_loss(
        pred,
        target,
        semantic_chans=1,
        semantic_weight=1.0,
        use_cosine_loss=False,
        repa_projection=proj,
        repa_target=feats,
        repa_weight=0.5,
        repa_mode=mode,
    )
    # REPA counts even with the cosine loss off (unlike the authors' train.py, §12.3 item 1).
    assert terms.repa.item() == pytest.approx(expected)
    assert terms.total.item() == pytest.approx(1.0 + 0.5 * expected)
    assert set(terms.per_sample) == {"total", "mse", "cos", "repa"}
    assert terms.per_sample["repa"].shape == (1,)


def test_loss_terms_per_sample_and_masking():
    g = torch.Generator().manual_seed(0)
    pred, target = (
        torch.randn(4, C, SIDE, SIDE, generator=g),
        torch.randn(4, C, SIDE, SIDE, generator=g),
    )
    terms = sfd_loss(pred, target, semantic_chans=C_SEM)
    assert isinstance(terms, LossTerms)
    assert torch.allclose(terms.mse, terms.per_sample["mse"].mean())
    assert torch.allclose(terms.total, terms.mse + terms.cos)
    one = sfd_loss(pred[1:2], target[1:2], semantic_chans=C_SEM)
    assert torch.allclose(one.mse, terms.per_sample["mse"][1])
    # Masking the clamped parts (our deviation, off by default): sample 0 has t_sem = 1, sample 1
    # has t_tex = 0; their clamped channels drop out of the MSE.
    t_tex, t_sem = torch.tensor([0.7, 0.0, 0.2, 0.4]), torch.tensor([1.0, 0.3, 0.5, 0.7])
    masked = sfd_loss(
        pred, target, semantic_chans=C_SEM, t_tex=t_tex, t_sem=t_sem, mask_clamped=True
    )
    sq = (pred - target).square()
    assert masked.per_sample["mse"][0].item() == pytest.approx(
        sq[0, :C_TEX].sum().item() / sq[0].numel(), rel=1e-5
    )
    assert masked.per_sample["mse"][1].item() == pytest.approx(
        2 * sq[1, C_TEX:].sum().item() / sq[1].numel(), rel=1e-5
    )
    assert torch.allclose(masked.per_sample["mse"][2:], terms.per_sample["mse"][2:])
    with pytest.raises(ValueError):
        sfd_loss(pred, target, semantic_chans=C_SEM, mask_clamped=True)
    with pytest.raises(ValueError):
        sfd_loss(pred, target, semantic_chans=C_SEM, repa_projection=torch.zeros(4, 2, 3))


# ---------------------------------------------------------------------------------------------
# Samplers on the closed-form Gaussian field (docs/method.md §7.1)


MU = torch.linspace(-1.0, 1.0, C).view(1, C, 1, 1)
SIGMA = torch.linspace(0.3, 1.5, C).view(1, C, 1, 1)


def gaussian_field(semantic_chans: int = C_SEM):
    """The exact velocity for x1 ~ N(MU, SIGMA²), each part at its own time; counts calls."""

    def fn(x, t_tex, t_sem, y):
        fn.calls += 1
        t = per_channel(t_tex, t_sem, x.shape[1], semantic_chans, x.ndim)
        mu, sigma = MU.to(x.dtype), SIGMA.to(x.dtype)
        s2 = t**2 * sigma**2 + (1 - t) ** 2
        return mu + (t * sigma**2 - (1 - t)) / s2 * (x - t * mu)

    fn.calls = 0
    return fn


@pytest.fixture(scope="module")
def noise():
    x0 = torch.randn(4096, C, SIDE, SIDE, generator=torch.Generator().manual_seed(0))
    return x0, torch.zeros(4096, dtype=torch.long), MU + SIGMA * x0  # (x0, y, exact endpoint)


CLOCK = AsyncClock(DELTA_T, C_SEM)


def rms(a: torch.Tensor) -> float:
    return a.square().mean().sqrt().item()


@pytest.fixture(scope="module")
def results(noise):
    """Every sampler/grid once; reused by the accuracy tests."""
    x0, y, _ = noise
    runs = {
        ("euler", "exact"): dict(num_steps=250),
        ("euler", "authors"): dict(num_steps=251),  # 251 points = 250 steps
        ("heun", "exact"): dict(num_steps=25),
        ("heun", "authors"): dict(num_steps=26),
        ("dopri5", "exact"): {},
        ("dopri5", "authors"): {},
    }
    out = {}
    for (method, grid), options in runs.items():
        fn = gaussian_field()
        result = sample(fn, x0, y, CLOCK, method=method, grid=grid, **options)
        assert result.nfe == fn.calls
        out[method, grid] = result
    return out


def test_samplers_transport_noise_to_data(noise, results):
    _, _, exact = noise
    for key, result in results.items():
        if key == ("dopri5", "authors"):
            continue  # see test_exact_grid_vs_authors_grid
        x = result.x
        assert rms(x - exact) < 0.02, key
        mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))
        # 4096·4 draws per channel: sampling error of the mean ≈ σ/128, of the std ≈ σ/181.
        assert torch.allclose(mean, MU.flatten(), atol=0.06), key
        assert torch.allclose(std, SIGMA.flatten(), rtol=0.04), key


def test_high_order_samplers_need_far_fewer_evaluations(noise, results):
    _, _, exact = noise
    euler = results["euler", "authors"]  # the default Euler-250
    heun, dopri5 = results["heun", "exact"], results["dopri5", "exact"]
    assert (euler.nfe, results["euler", "exact"].nfe) == (250, 250)
    assert heun.nfe == 50 and heun.num_steps == 25
    # dopri5: 2 starting evaluations per phase + 6 per step (FSAL).
    assert dopri5.nfe <= 2 * 3 + 6 * (dopri5.num_steps + dopri5.num_rejected)
    assert dopri5.nfe < 100
    euler_err = rms(euler.x - exact)
    assert rms(heun.x - exact) < euler_err / 3
    assert rms(dopri5.x - exact) < euler_err / 3


def test_exact_grid_vs_authors_grid(noise, results):
    """The comparison behind the grid defaults (docs/method.md §7.1: the mask is discontinuous)."""
    _, _, exact = noise
    err = {key: rms(r.x - exact) for key, r in results.items()}
    # Heun and dopri5: exact phase boundaries keep their order; the authors' single masked run
    # loses it (dopri5 steps straight over τ = Δt and τ = 1 without noticing).
    assert err["heun", "exact"] < err["heun", "authors"] / 3
    assert err["dopri5", "exact"] < err["dopri5", "authors"] / 10
    assert results["dopri5", "authors"].nfe < results["dopri5", "exact"].nfe
    # Euler: the authors' grid is slightly more accurate per sample on this field (its boundary
    # offsets partly cancel Euler's error), hence the Euler default, but it biases the means.
    assert err["euler", "authors"] <= err["euler", "exact"]
    bias = {
        g: (results["euler", g].x - exact).mean(dim=(0, 2, 3)).abs().max().item()
        for g in ("exact", "authors")
    }
    assert bias["exact"] < bias["authors"] / 10


def test_authors_grids():
    ((points, phase),) = fixed_grid(CLOCK, 250, grid="authors")
    assert phase is None and points.dtype == torch.float32
    assert torch.equal(points, torch.linspace(0, 1.3, 250))
    ((shifted, _),) = fixed_grid(CLOCK, 5, grid="authors", shift=3.0)
    u = torch.linspace(0, 1.3, 5) / 1.3
    assert torch.allclose(shifted, 3 * u / (1 + 2 * u) * 1.3)


def test_exact_grid_lands_on_phase_boundaries():
    assert allocate_steps([0.3, 0.7, 0.3], 250) == [58, 134, 58]
    assert allocate_steps([0.01, 1.0, 0.01], 3) == [1, 1, 1]
    with pytest.raises(ValueError):
        allocate_steps([0.3, 0.7, 0.3], 2)
    for shift in (None, 3.0):
        segments = fixed_grid(CLOCK, 40, grid="exact", shift=shift)
        assert sum(len(p) - 1 for p, _ in segments) == 40
        assert [(p[0].item(), p[-1].item()) for p, _ in segments] == [
            (0.0, 0.3),
            (0.3, 1.0),
            (1.0, 1.3),
        ]
        for points, _ in segments:
            assert bool((points[1:] > points[:-1]).all())
    # With a shift the exact grid follows the authors' warped step density.
    s_exact = [len(p) - 1 for p, _ in fixed_grid(CLOCK, 100, grid="exact", shift=3.0)]
    ((pts, _),) = fixed_grid(CLOCK, 101, grid="authors", shift=3.0)
    s_authors = [
        int(((pts[1:] > a) & (pts[1:] <= b)).sum()) for a, b in [(0, 0.3), (0.3, 1.0), (1.0, 1.3)]
    ]
    assert all(abs(a - b) <= 1 for a, b in zip(s_exact, s_authors))


@pytest.mark.parametrize(
    "method, options",
    [
        ("euler", dict(num_steps=30, grid="exact")),
        ("euler", dict(num_steps=30, grid="authors")),
        ("heun", dict(num_steps=12)),
        ("dopri5", {}),
    ],
)
def test_phases_freeze_parts_bitwise(method, options):
    x0 = torch.randn(16, C, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(16, dtype=torch.long)
    states: list[SamplerStep] = []
    result = sample(
        gaussian_field(), x0, y, CLOCK, method=method, callback=states.append, **options
    )
    assert torch.equal(states[-1].x, result.x)
    stage1 = stage3 = 0
    sem_at_end = result.x[:, C_TEX:]
    for step in states:
        for i in range(16):
            tau = step.tau[i].item()
            if tau <= DELTA_T:  # stage I: texture still exactly its initial noise
                assert torch.equal(step.x[i, :C_TEX], x0[i, :C_TEX])
                stage1 += 1
            if tau >= 1.0:  # stage III: semantics frozen at their τ = 1 value
                assert torch.equal(step.x[i, C_TEX:], sem_at_end[i])
                stage3 += 1
    assert stage1 > 0 and stage3 > 0
    # ...and both parts do move overall.
    assert not torch.equal(result.x[:, :C_TEX], x0[:, :C_TEX])
    assert not torch.equal(result.x[:, C_TEX:], x0[:, C_TEX:])


def test_dopri5_per_sample_control_is_batch_independent():
    x0 = torch.randn(8, C, SIDE, SIDE, generator=torch.Generator().manual_seed(2))
    y = torch.zeros(8, dtype=torch.long)
    full = sample_dopri5(gaussian_field(), x0, y, CLOCK)
    part = sample_dopri5(gaussian_field(), x0[[5, 2]], y[:2], CLOCK)
    assert torch.equal(full.x[[5, 2]], part.x)  # elementwise field: identical bits per sample


def test_delta_zero_is_single_phase_flow_matching():
    clock = AsyncClock(0.0, C_SEM)
    assert len(clock.phases()) == 1
    x0 = torch.randn(32, C, SIDE, SIDE, generator=torch.Generator().manual_seed(3))
    y = torch.zeros(32, dtype=torch.long)
    fn = gaussian_field()
    got = sample_euler(fn, x0, y, clock, num_steps=20, grid="exact").x
    x, ts = x0, torch.linspace(0, 1, 21, dtype=torch.float64)
    for i in range(20):  # plain one-clock Euler
        t = ts[i].float().expand(32)
        x = x + (ts[i + 1] - ts[i]).float() * fn(x, t, t, y)
    assert torch.equal(got, x)
    exact = MU + SIGMA * x0
    for grid in ("exact", "authors"):
        assert (
            rms(sample_dopri5(gaussian_field(), x0, y, clock, grid=grid).x - exact) < 1e-2
        )  # rtol 1e-3
    # semantic_chans = 0: plain flow matching on all channels.
    plain = AsyncClock(0.0, 0)
    fn0 = gaussian_field(semantic_chans=0)
    assert rms(sample_heun(fn0, x0, y, plain, num_steps=25).x - exact) < 2e-3
    with pytest.raises(ValueError):
        AsyncClock(0.3, 0)


def test_sampler_argument_errors():
    x0, y = torch.randn(2, C, SIDE, SIDE), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError):
        sample(gaussian_field(), x0, y, CLOCK, method="rk45")
    with pytest.raises(ValueError):
        sample_euler(gaussian_field(), x0, y, CLOCK, grid="uniform")
    with pytest.raises(ValueError):
        sample_dopri5(gaussian_field(), x0, y, CLOCK, grid="authors", error_norm="sample")
    with pytest.raises(ValueError):
        fixed_grid(CLOCK, 10, shift=0.0)


# ---------------------------------------------------------------------------------------------
# Guidance (docs/method.md §7.2)


NULL = 10


def labelled_field():
    """A toy conditional field: the Gaussian field plus a label-dependent offset; counts calls."""
    base = gaussian_field()

    def fn(x, t_tex, t_sem, y):
        fn.calls += 1
        fn.batch = x.shape[0]
        return base(x, t_tex, t_sem, y) + (y.float() / NULL - 0.5).view(-1, 1, 1, 1) * (1 + x)

    fn.calls = 0
    return fn


def test_cfg_scale_one_and_formula():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, C, SIDE, SIDE, generator=g)
    t_tex, t_sem, y = (
        torch.tensor([0.0, 0.4, 0.9]),
        torch.tensor([0.3, 0.7, 1.0]),
        torch.tensor([1, 5, 9]),
    )
    fn = labelled_field()
    cond, uncond = fn(x, t_tex, t_sem, y), fn(x, t_tex, t_sem, torch.full_like(y, NULL))
    fn.calls = 0
    one = classifier_free_guidance(fn, 1.0, null_class=NULL, semantic_chans=C_SEM)(
        x, t_tex, t_sem, y
    )
    assert fn.calls == 1 and fn.batch == 6  # batch-doubled, one call
    assert torch.allclose(one, cond, atol=1e-6)
    two = classifier_free_guidance(fn, 2.0, null_class=NULL, semantic_chans=C_SEM, scale_sem=3.0)(
        x, t_tex, t_sem, y
    )
    assert torch.allclose(
        two[:, :C_TEX], uncond[:, :C_TEX] + 2.0 * (cond - uncond)[:, :C_TEX], atol=1e-6
    )
    assert torch.allclose(
        two[:, C_TEX:], uncond[:, C_TEX:] + 3.0 * (cond - uncond)[:, C_TEX:], atol=1e-6
    )


@pytest.mark.parametrize("mode", ["both", "tex", "sem"])
def test_guidance_interval_per_part(mode):
    x = torch.randn(3, C, SIDE, SIDE, generator=torch.Generator().manual_seed(5))
    # Sample 0: both parts below 0.25; sample 1: texture below only; sample 2: neither.
    t_tex, t_sem, y = (
        torch.tensor([0.0, 0.1, 0.5]),
        torch.tensor([0.2, 0.4, 0.8]),
        torch.tensor([2, 3, 4]),
    )
    fn = labelled_field()
    cond, uncond = fn(x, t_tex, t_sem, y), fn(x, t_tex, t_sem, torch.full_like(y, NULL))
    guided = uncond + 1.5 * (cond - uncond)
    out = classifier_free_guidance(
        fn, 1.5, null_class=NULL, semantic_chans=C_SEM, interval_start=0.25, interval_mode=mode
    )(x, t_tex, t_sem, y)
    tex_off = [mode != "sem", mode != "sem", False]
    sem_off = [mode != "tex", False, False]
    for i in range(3):
        expect_tex = cond[i, :C_TEX] if tex_off[i] else guided[i, :C_TEX]
        expect_sem = cond[i, C_TEX:] if sem_off[i] else guided[i, C_TEX:]
        assert torch.allclose(out[i, :C_TEX], expect_tex, atol=1e-6)
        assert torch.allclose(out[i, C_TEX:], expect_sem, atol=1e-6)
        if tex_off[i]:
            assert torch.equal(out[i, :C_TEX], cond[i, :C_TEX])  # switched off: exactly conditional


def test_autoguidance():
    x = torch.randn(4, C, SIDE, SIDE, generator=torch.Generator().manual_seed(6))
    t_tex, t_sem, y = torch.full((4,), 0.3), torch.full((4,), 0.6), torch.tensor([0, 1, 2, 3])
    main, weak = labelled_field(), gaussian_field()
    v_main, v_weak = main(x, t_tex, t_sem, y), weak(x, t_tex, t_sem, y)
    w1 = autoguidance(main, weak, 1.0, semantic_chans=C_SEM)(x, t_tex, t_sem, y)
    assert torch.allclose(w1, v_main, atol=1e-6)
    w = autoguidance(main, weak, 1.5, semantic_chans=C_SEM, scale_tex=2.0)(x, t_tex, t_sem, y)
    assert torch.allclose(w[:, :C_TEX], (v_weak + 2.0 * (v_main - v_weak))[:, :C_TEX], atol=1e-6)
    assert torch.allclose(w[:, C_TEX:], (v_weak + 1.5 * (v_main - v_weak))[:, C_TEX:], atol=1e-6)


def test_guided_sampling_runs_through_the_samplers():
    x0 = torch.randn(8, C, SIDE, SIDE, generator=torch.Generator().manual_seed(7))
    y = torch.arange(8)
    fn = classifier_free_guidance(
        labelled_field(), 1.5, null_class=NULL, semantic_chans=C_SEM, interval_start=0.1
    )
    result = sample_heun(fn, x0, y, CLOCK, num_steps=6)
    assert result.x.shape == x0.shape and bool(torch.isfinite(result.x).all()) and result.nfe == 12


def test_cfg_matches_golden_lightningdit(golden_dir):
    from sfd.loading import load_model

    io = load_file(str(golden_dir / "lightningdit-tiny-io.safetensors"))
    model = load_model(golden_dir / "lightningdit-tiny-weights.safetensors")[0]
    null, sem = model.cfg.num_classes, model.cfg.semantic_chans
    fn = model_velocity(model)
    x, t_tex, t_sem, y = io["cfg_x"], io["cfg_t_tex"], io["cfg_t_sem"], io["cfg_y"]
    assert torch.equal(x[:2], x[2:]) and bool((y[2:] == null).all())  # forward_with_cfg layout
    with torch.no_grad():
        for start, key in [(0.0, "cfg_velocity_1p5"), (0.25, "cfg_velocity_1p5_interval_0p25")]:
            doubled = classifier_free_guidance(
                fn,
                1.5,
                null_class=null,
                semantic_chans=sem,
                interval_start=start,
                doubled_batch=True,
            )(x, t_tex, t_sem, y)
            torch.testing.assert_close(doubled, io[key], atol=1e-5, rtol=1e-5)
            ours = classifier_free_guidance(
                fn, 1.5, null_class=null, semantic_chans=sem, interval_start=start
            )(x[:2], t_tex[:2], t_sem[:2], y[:2])
            torch.testing.assert_close(ours, io[key][:2], atol=1e-5, rtol=1e-5)
    # The interval case switched texture guidance off (t_tex < 0.25) but kept it on semantics.
    assert not torch.allclose(
        io["cfg_velocity_1p5"][:, :-sem], io["cfg_velocity_1p5_interval_0p25"][:, :-sem]
    )
    assert torch.equal(
        io["cfg_velocity_1p5"][:, -sem:], io["cfg_velocity_1p5_interval_0p25"][:, -sem:]
    )


# ---------------------------------------------------------------------------------------------
# Per-sample seeds (docs/architecture.md, Conventions)


def test_initial_noise_depends_only_on_seed_and_index():
    shape = (C, SIDE, SIDE)
    batch = initial_noise(range(8), shape, seed=123)
    assert batch.shape == (8, *shape) and batch.dtype == torch.float32
    # Any split into batches (or order) gives the same rows.
    assert torch.equal(initial_noise([5, 2], shape, seed=123), batch[[5, 2]])
    assert torch.equal(initial_noise(torch.tensor([7]), shape, seed=123), batch[7:8])
    assert not torch.equal(initial_noise([0], shape, seed=124), batch[:1])
    assert not torch.equal(batch[0], batch[1])
    big = initial_noise(range(256), shape, seed=0)
    assert abs(big.mean().item()) < 0.05 and abs(big.std().item() - 1) < 0.05
    assert initial_noise([0], shape, seed=0, dtype=torch.float64).dtype == torch.float64
