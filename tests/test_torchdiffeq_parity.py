"""The authors' grid follows torchdiffeq step for step (docs/method.md §7.1): ``sample_dopri5(...,
grid="authors")`` against ``torchdiffeq.odeint(method="dopri5")`` itself, run on the authors'
channel-masked drift over τ ∈ [0, 1+Δt] — the same NFE, the same accepted step times and the same
sample. torchdiffeq is a development dependency (requirements.txt, the ``dev`` extra)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from sfd.config import model_preset
from sfd.diffusion import AsyncClock
from sfd.guidance import classifier_free_guidance, model_velocity
from sfd.models.lightningdit import LightningDiT
from sfd.models.standins import random_lightningdit
from sfd.samplers import sample_dopri5

torchdiffeq = pytest.importorskip("torchdiffeq", reason="pip install torchdiffeq (the dev extra) to compare with it")


def random_model(name: str, seed: int = 0, **changes) -> LightningDiT:
    """Real names and shapes, random weights perturbed off adaLN-Zero (else the velocity is 0)."""
    return random_lightningdit(replace(model_preset(name), **changes), seed)


class AuthorsDrift:
    """The authors' ``semantic_first_drift_with_masking`` as torchdiffeq calls it: a scalar clock
    t → (t_tex, t_sem) = (max(t − Δt, 0), min(t, 1)), texture moves where t ≥ Δt, semantics where
    t ≤ 1; torchdiffeq reports each accepted step through ``callback_accept_step``."""

    def __init__(self, fn, y, delta_t: float, semantic_chans: int) -> None:
        self.fn, self.y, self.delta_t, self.semantic_chans = fn, y, delta_t, semantic_chans
        self.nfe, self.accepted = 0, []

    def __call__(self, t, x):
        self.nfe += 1
        t_B = torch.ones(x.shape[0], dtype=x.dtype) * t
        v = self.fn(x, torch.clamp(t_B - self.delta_t, min=0.0), torch.clamp(t_B, max=1.0), self.y)
        mask = torch.ones_like(v)
        if not bool(t >= self.delta_t):
            mask[:, : -self.semantic_chans] = 0
        if not bool(t <= 1.0):
            mask[:, -self.semantic_chans :] = 0
        return v * mask

    def callback_accept_step(self, t0, y0, dt) -> None:
        self.accepted.append(float(t0 + dt))


def compare(fn, model: LightningDiT, x0, y, rtol: float = 1e-3) -> tuple[int, int, list[float]]:
    cfg = model.cfg
    drift = AuthorsDrift(fn, y, cfg.semfirst_delta_t, cfg.semantic_chans)
    T = 1 + cfg.semfirst_delta_t
    with torch.no_grad():
        # The authors' call: a 250-point float32 output grid (it does not steer the steps).
        ref = torchdiffeq.odeint(drift, x0, torch.linspace(0, T, 250), method="dopri5", atol=1e-6, rtol=rtol)[-1]
        taus: list[float] = []
        ours = sample_dopri5(fn, x0, y, AsyncClock(cfg.semfirst_delta_t, cfg.semantic_chans), grid="authors", rtol=rtol,
                             callback=lambda s: taus.append(float(s.tau[0])))
    accepted = [t for i, t in enumerate(taus) if i == 0 or t != taus[i - 1]]
    assert ours.nfe == drift.nfe
    assert accepted == drift.accepted  # float64 clock values, exactly
    assert ours.num_steps == len(drift.accepted) and ours.nfe == 2 + 6 * (ours.num_steps + ours.num_rejected)
    # Same ops in the same order: equal to float32 rounding (in practice bit for bit).
    torch.testing.assert_close(ours.x, ref, rtol=0, atol=2 * torch.finfo(torch.float32).eps * ref.abs().max().item())
    return ours.nfe, ours.num_rejected, accepted


# Tight tolerances make torchdiffeq reject steps at the drift's jumps (τ = Δt, τ = 1), so the
# controller's rejection branch is compared too.
@pytest.mark.parametrize(
    ("batch", "cfg_scale", "rtol", "nfe", "rejected"),
    [(1, None, 1e-3, 20, 0), (3, None, 1e-5, 290, 36), (2, 1.5, 1e-4, 332, 45)],
)
def test_authors_grid_dopri5_is_torchdiffeq(batch, cfg_scale, rtol, nfe, rejected) -> None:
    model = random_model("tiny")
    torch.manual_seed(1)
    x0 = torch.randn(batch, model.cfg.in_channels, model.cfg.input_size, model.cfg.input_size)
    y = torch.arange(batch) % model.cfg.num_classes
    fn = model_velocity(model)
    if cfg_scale is not None:
        fn = classifier_free_guidance(fn, cfg_scale, null_class=model.cfg.num_classes, semantic_chans=model.cfg.semantic_chans)
    got_nfe, got_rejected, accepted = compare(fn, model, x0, y, rtol)
    # Cross-check of both solvers, recorded on torch 2.14.1 / torchdiffeq 0.2.5 (CPU).
    assert (got_nfe, got_rejected) == (nfe, rejected)
    assert accepted[-1] >= 1.3 > accepted[-2]  # the last step overshoots τ_end and is interpolated


@pytest.mark.slow
def test_authors_grid_dopri5_is_torchdiffeq_on_b1() -> None:
    """LightningDiT-B/1 (random weights, batch 1): its 12 blocks of width 768, on a 4×4 latent
    (16 tokens instead of 256) so the two solvers' ~2 × 75 forwards take seconds, not minutes;
    the step controller sees the same network depth, width and channel layout."""
    model = random_model("LightningDiT-B/1", input_size=4)
    torch.manual_seed(1)
    x0 = torch.randn(1, model.cfg.in_channels, model.cfg.input_size, model.cfg.input_size)
    nfe, _, _ = compare(model_velocity(model), model, x0, torch.tensor([207]))
    assert nfe == 86  # recorded on torch 2.14.1 / torchdiffeq 0.2.5 (CPU), 4×4 latent
