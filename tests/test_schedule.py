"""The pluggable asynchronous schedule (issue 15 item 6): a pair of monotone maps from the global
clock τ to (t_tex, t_sem); the paper's fixed offset is one member, ``power`` a smooth one.

Checked: the maps' shape (monotone, semantics ahead, largest lead = Δt), their rates against
finite differences, that training draws and every sampler follow the schedule (closed-form
Gaussian field: each part must arrive at the data whatever its own speed), that the offset
member is the old code bit for bit, and that the schedule travels with the model config.
"""

from __future__ import annotations

import pytest
import torch

from sfd.config import ConfigError, ModelConfig, SamplingConfig, TrainConfig, override
from sfd.diffusion import AsyncClock, power_gamma, sample_training_times, schedule_times
from sfd.samplers import clock_for, sample
from tests.test_diffusion import C_SEM, MU, SIDE, SIGMA, C, gaussian_field, rms

TAU = torch.linspace(0, 1, 1001, dtype=torch.float64)


@pytest.mark.parametrize("delta_t", [0.1, 0.3, 0.5, 0.9])
def test_power_maps_are_monotone_lead_by_delta_t_and_end_together(delta_t):
    t_tex, t_sem = schedule_times("power", delta_t, TAU)
    assert t_tex[0] == t_sem[0] == 0 and t_tex[-1] == t_sem[-1] == 1
    assert (t_tex.diff() >= 0).all() and (t_sem.diff() >= 0).all()
    lead = t_sem - t_tex
    assert (lead >= 0).all()
    assert lead.max().item() == pytest.approx(delta_t, abs=1e-6)
    assert TAU[lead.argmax()].item() == pytest.approx(0.5, abs=1e-3)  # symmetric: largest lead mid-way
    # The rates are the derivatives of the maps (central differences, away from the ends where
    # τ^(γ−1) has an unbounded slope for γ < 2).
    clock = AsyncClock(delta_t, C_SEM, "power")
    inner = slice(50, -50)
    r_tex, r_sem = clock.rates(TAU[inner])
    h = TAU[1] - TAU[0]
    fd = lambda t: ((t[2:] - t[:-2]) / (2 * h))[49:-49]  # noqa: E731  centred on TAU[inner]
    assert torch.allclose(r_tex, fd(t_tex), rtol=1e-3) and torch.allclose(r_sem, fd(t_sem), rtol=1e-3)
    assert clock.tau_end == 1.0 and len(clock.phases()) == 1


def test_zero_lead_is_the_synchronous_clock_in_both_families():
    assert power_gamma(0.0) == 1.0
    for schedule in ("offset", "power"):
        t_tex, t_sem = schedule_times(schedule, 0.0, TAU)
        assert torch.equal(t_tex, TAU) and torch.equal(t_sem, TAU)


def test_offset_member_is_the_papers_clock_bit_for_bit():
    clock = AsyncClock(0.3, C_SEM)
    tau = torch.linspace(0, 1.3, 97)
    t_tex, t_sem = clock.times(tau)
    assert torch.equal(t_tex, (tau - 0.3).clamp(min=0.0)) and torch.equal(t_sem, tau.clamp(max=1.0))
    assert clock.rates(tau) is None and clock.tau_end == 1.3
    # Training draws: the same generator gives the formula of docs/method.md §4.2 exactly.
    a = sample_training_times(256, 0.3, generator=torch.Generator().manual_seed(1))
    u = torch.sigmoid(torch.randn(256, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(a[0], (u * 1.3 - 0.3).clamp(min=0.0)) and torch.equal(a[1], (u * 1.3).clamp(max=1.0))


def test_training_draws_follow_the_power_schedule():
    t_tex, t_sem = sample_training_times(4096, 0.3, generator=torch.Generator().manual_seed(2), schedule="power")
    u = torch.sigmoid(torch.randn(4096, generator=torch.Generator().manual_seed(2)))
    want = schedule_times("power", 0.3, u)
    assert torch.equal(t_tex, want[0]) and torch.equal(t_sem, want[1])
    assert (t_sem >= t_tex).all() and 0 < (t_sem - t_tex).max() <= 0.3 + 1e-6
    # Unlike the offset clock nothing is clamped: no draw has a part at exactly 0 or 1.
    assert ((t_tex > 0) & (t_sem < 1)).all()


@pytest.mark.parametrize("method,options", [("heun", {"num_steps": 25}), ("dopri5", {}), ("euler", {"num_steps": 400})])
def test_every_sampler_honours_each_parts_own_rate(method, options):
    """On the exact Gaussian field each part reaches the data only if it moves by dt_part/dτ."""
    x0 = torch.randn(1024, C, SIDE, SIDE, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(1024, dtype=torch.long)
    exact = MU + SIGMA * x0
    clock = AsyncClock(0.3, C_SEM, "power")
    fn = gaussian_field()
    grids = ("exact", "authors") if method != "dopri5" else ("exact",)
    for grid in grids:
        result = sample(fn, x0, y, clock, method=method, grid=grid, **options)
        assert rms(result.x - exact) < 0.02, (method, grid)
    # Ignoring the rates (every part at rate 1 over [0, 1]) lands elsewhere: the check has teeth.
    wrong = sample(fn, x0, y, AsyncClock(0.0, C_SEM), method="heun", num_steps=25)
    assert rms(wrong.x - exact) < 0.02  # the synchronous clock is right for itself ...
    lead = sample(gaussian_field(), x0, y, clock, method="heun", num_steps=25, callback=None)
    assert not torch.equal(lead.x, wrong.x)  # ... and the schedules are different paths


def test_schedule_is_stored_with_the_model_and_read_by_the_samplers():
    m = ModelConfig(in_channels=8, semantic_chans=4, hidden_size=32, depth=2, num_heads=2, semfirst_schedule="power")
    assert clock_for(m, SamplingConfig()).schedule == "power"
    assert clock_for(ModelConfig(), SamplingConfig()).schedule == "offset"  # default: the paper's
    cfg = override(TrainConfig(), ["schedule=power", "delta_t=0.5"])  # -o schedule=... alias
    assert cfg.model.semfirst_schedule == "power" and cfg.delta_t == 0.5
    with pytest.raises(ConfigError, match="power schedule"):
        ModelConfig(semfirst_schedule="power", semfirst_delta_t=1.0)
    with pytest.raises(ConfigError, match="semfirst_schedule"):
        ModelConfig(semfirst_schedule="cosine")
