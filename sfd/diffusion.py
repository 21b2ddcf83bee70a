"""Asynchronous ("semantic-first") flow matching: the clock, the forward process and the losses.

Conventions (docs/architecture.md, Conventions; docs/method.md §4.1):

- Time: t = 0 is pure noise, t = 1 is data. x_t = t·x1 + (1−t)·x0 with x0 ~ N(0, I) and the
  velocity target u = x1 − x0. Times enter the network in [0, 1] unscaled.
- Composite latent (B, C, H, W) = [texture C − semantic_chans | semantic semantic_chans]: texture
  first in the tensor and in every (t_tex, t_sem) pair, although the paper writes [s, z]
  (docs/method.md §12.3 item 22).
- One global clock τ drives both parts: t_sem = min(τ, 1), t_tex = max(τ − Δt, 0) (§4.2, §7.1).
  Training draws τ = u·(1+Δt) with u ~ LogitNormal(0, 1); sampling runs τ from 0 to 1 + Δt in
  three phases: I (τ < Δt) only the semantic channels move, II both, III (τ > 1) only texture.
  Δt = 0 is the synchronous baseline on the same composite latent; semantic_chans = 0 (with
  Δt = 0) is plain flow matching, i.e. LightningDiT(+REPA).
  That is the ``offset`` schedule; ``power`` (ours) is a smooth member of the same family of
  monotone maps τ ↦ (t_tex, t_sem), each part moving at its own rate (:class:`AsyncClock`,
  docs/decisions.md).
- Velocity functions have one signature, ``fn(x, t_tex, t_sem, y) -> v`` with x (B, C, H, W),
  t_tex and t_sem (B,) and y (B,) int64 labels (the null class is ``num_classes``).

Sampling lives beside this module: ``sfd/guidance.py`` (velocity functions and guidance) and
``sfd/samplers.py`` (Euler, Heun, dopri5 over the clock; per-index noise; generation).

Sections: clock · training (time split, noising, losses).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from sfd.registry import Registry

__all__ = [
    "AsyncClock",
    "Schedule",
    "SCHEDULES",
    "power_gamma",
    "schedule_times",
    "Phase",
    "per_channel",
    "sample_training_times",
    "noise_composite",
    "LossTerms",
    "REPA_MODES",
    "repa_loss",
    "sfd_loss",
    "VelocityFn",
]

VelocityFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]  # fn(x, t_tex, t_sem, y) -> v
RepaMode = str  # a name in REPA_MODES: cos | mse | cos_mse


# ---------------------------------------------------------------------------------------------
# The clock


@dataclass(frozen=True)
class Phase:
    """A stretch [start, end] of the global clock τ and which parts move in it (docs/method.md §7.1)."""

    start: float
    end: float
    texture_moves: bool
    semantic_moves: bool


class Schedule(ABC):
    """A monotone map from the global clock τ ∈ [0, ``tau_end``] to (t_tex, t_sem) with t_sem ≥ t_tex,
    whose largest lead is Δt; Δt = 0 must give t_tex = t_sem = τ. Register an instance in
    :data:`SCHEDULES` to make it a ``model.semfirst_schedule`` choice."""

    # True: each part moves with the clock (rate 1) in phases and is frozen outside them (the
    # samplers then restart at the phase boundaries); False: both parts move all the way, each at
    # its own rate (:meth:`rates`).
    phased: bool = False

    def check(self, delta_t: float) -> list[str]:
        """Problems (empty if none) with this schedule at lead ``delta_t``."""
        return []

    def tau_end(self, delta_t: float) -> float:
        return 1.0

    @abstractmethod
    def times(self, delta_t: float, tau: Tensor) -> tuple[Tensor, Tensor]:
        """(t_tex, t_sem) at global clock ``tau``."""

    @abstractmethod
    def rates(self, delta_t: float, tau: Tensor) -> tuple[Tensor, Tensor] | None:
        """(dt_tex/dτ, dt_sem/dτ), or None where every moving part has rate 1."""


SCHEDULES: Registry[Schedule] = Registry("schedule")


class OffsetSchedule(Schedule):
    """The paper's: t_sem = min(τ, 1), t_tex = max(τ − Δt, 0), τ ∈ [0, 1 + Δt]."""

    phased = True

    def tau_end(self, delta_t: float) -> float:
        return 1.0 + delta_t

    def times(self, delta_t: float, tau: Tensor) -> tuple[Tensor, Tensor]:
        return (tau - delta_t).clamp(min=0.0), tau.clamp(max=1.0)

    def rates(self, delta_t: float, tau: Tensor) -> None:
        return None  # the phases say which parts move; a moving part moves with the clock


class PowerSchedule(Schedule):
    """Ours, smooth: t_tex = τ^γ, t_sem = 1 − (1 − τ)^γ, τ ∈ [0, 1], γ from :func:`power_gamma`."""

    def check(self, delta_t: float) -> list[str]:
        return [] if 0.0 <= delta_t < 1.0 else [f"the power schedule needs delta_t in [0, 1), got {delta_t}"]

    def times(self, delta_t: float, tau: Tensor) -> tuple[Tensor, Tensor]:
        g = power_gamma(delta_t)
        tau = tau.clamp(0.0, 1.0)
        if g == 1.0:  # Δt = 0: exactly the synchronous clock (1 − (1 − τ) is not τ in floats)
            return tau, tau
        return tau.pow(g), 1.0 - (1.0 - tau).pow(g)

    def rates(self, delta_t: float, tau: Tensor) -> tuple[Tensor, Tensor]:
        g = power_gamma(delta_t)
        tau = tau.clamp(0.0, 1.0)
        return g * tau.pow(g - 1.0), g * (1.0 - tau).pow(g - 1.0)


SCHEDULES.register("offset", OffsetSchedule())
SCHEDULES.register("power", PowerSchedule())


def power_gamma(delta_t: float) -> float:
    """γ of the ``power`` schedule whose largest lead t_sem − t_tex (at τ = ½) equals ``delta_t``."""
    if not 0.0 <= delta_t < 1.0:
        raise ValueError(f"the power schedule needs delta_t in [0, 1), got {delta_t}")
    return 1.0 - math.log2(1.0 - delta_t)  # 1 − 2·(½)^γ = Δt


def schedule_times(schedule: str, delta_t: float, tau: Tensor) -> tuple[Tensor, Tensor]:
    """(t_tex, t_sem) at global clock ``tau`` under ``schedule`` (docs/method.md §4.2, §7.1).

    ``offset`` (the paper): t_sem = min(τ, 1), t_tex = max(τ − Δt, 0), τ ∈ [0, 1 + Δt].
    ``power`` (ours, smooth): t_tex = τ^γ, t_sem = 1 − (1 − τ)^γ, τ ∈ [0, 1], with γ from
    :func:`power_gamma` so that the largest lead is Δt. Both maps are monotone, t_sem ≥ t_tex,
    and Δt = 0 gives t_tex = t_sem = τ in both. Others: :data:`SCHEDULES`.
    """
    return SCHEDULES[schedule].times(delta_t, tau)


@dataclass(frozen=True)
class AsyncClock:
    """The asynchronous schedule: the semantic part leads the texture part.

    ``schedule="offset"`` is the paper's: a constant lead ``delta_t``. ``"power"`` is a smooth
    member of the family of monotone maps τ ↦ (t_tex, t_sem) whose largest lead is ``delta_t``
    (:func:`schedule_times`); each part then moves with its own rate dt/dτ (:meth:`rates`).
    ``semantic_chans`` counts the last channels of the composite latent. Δt > 0 needs semantic
    channels (the authors assert the same, docs/method.md §4.2); Δt ∈ [0, 1], where Δt = 1 is fully
    sequential generation (§4.3) and has an empty stage II.
    """

    delta_t: float = 0.3
    semantic_chans: int = 16
    schedule: str = "offset"

    def __post_init__(self) -> None:
        if not 0.0 <= self.delta_t <= 1.0:
            raise ValueError(f"delta_t must lie in [0, 1], got {self.delta_t}")
        if self.semantic_chans < 0:
            raise ValueError(f"semantic_chans must be >= 0, got {self.semantic_chans}")
        if self.delta_t > 0 and self.semantic_chans == 0:
            raise ValueError("delta_t > 0 needs semantic channels (semantic_chans > 0)")
        for problem in SCHEDULES[self.schedule].check(self.delta_t):
            raise ValueError(problem)

    @property
    def tau_end(self) -> float:
        return SCHEDULES[self.schedule].tau_end(self.delta_t)

    def times(self, tau: Tensor) -> tuple[Tensor, Tensor]:
        """(t_tex, t_sem) at clock value ``tau`` (§4.2 step 3, §7.1); texture first."""
        return schedule_times(self.schedule, self.delta_t, tau)

    def rates(self, tau: Tensor) -> tuple[Tensor, Tensor] | None:
        """(dt_tex/dτ, dt_sem/dτ), or None where every moving part has rate 1 (the offset
        schedule: its phases say which parts move, and a moving part moves with the clock)."""
        return SCHEDULES[self.schedule].rates(self.delta_t, tau)

    def phases(self) -> list[Phase]:
        """The non-empty phases I, II, III in order (a single phase [0, 1] when Δt = 0 or the
        schedule is smooth: both parts move all the way, at their own rates)."""
        if self.delta_t == 0 or not SCHEDULES[self.schedule].phased:
            return [Phase(0.0, 1.0, True, True)]
        dt = self.delta_t
        phases = [
            Phase(0.0, dt, False, True),
            Phase(dt, 1.0, True, True),
            Phase(1.0, 1.0 + dt, True, False),
        ]
        return [p for p in phases if p.end > p.start]


def per_channel(
    tex: Tensor, sem: Tensor, num_channels: int, semantic_chans: int, ndim: int
) -> Tensor:
    """Spread per-sample part values (B,) over channels: (B, C, 1, …, 1), texture channels first.

    Works for times, guidance scales and boolean masks alike; B may be 1 for a static value.
    """
    tex_BC = tex.reshape(-1, 1).expand(-1, num_channels - semantic_chans)
    sem_BC = sem.reshape(-1, 1).expand(-1, semantic_chans)
    out = torch.cat([tex_BC, sem_BC], dim=1)
    return out.reshape(*out.shape, *([1] * (ndim - 2)))


# ---------------------------------------------------------------------------------------------
# Training: time split, noising, losses (docs/method.md §4.2, §4.5, §4.6)


def sample_training_times(
    batch_size: int,
    delta_t: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    mean: float = 0.0,
    std: float = 1.0,
    schedule: str = "offset",
) -> tuple[Tensor, Tensor]:
    """Draw (t_tex, t_sem), each (B,) float32, from one logit-normal draw (docs/method.md §4.2).

    u = σ(n), n ~ N(mean, std²); τ = u·(1+Δt); t_sem = min(τ, 1), t_tex = max(τ − Δt, 0), so
    t_sem ≥ t_tex always. Δt = 0 gives t_tex = t_sem = u. Another ``schedule`` maps u over its
    own clock length instead (:func:`schedule_times`; ``power``: τ = u). The draw comes from ``generator``
    (torch RNG; the authors used unseeded scipy, §12.3 item 9) on the generator's device, so a
    seed gives the same times on any ``device``.
    """
    if not 0.0 <= delta_t <= 1.0:
        raise ValueError(f"delta_t must lie in [0, 1], got {delta_t}")
    rng_device = generator.device if generator is not None else device
    n = torch.randn(batch_size, generator=generator, device=rng_device)
    u = torch.sigmoid(n * std + mean)
    tau = u * SCHEDULES[schedule].tau_end(delta_t)  # over the clock's length (× 1.0 is exact)
    t_tex, t_sem = schedule_times(schedule, delta_t, tau)
    return t_tex.to(device), t_sem.to(device)


def noise_composite(
    x1: Tensor,
    t_tex: Tensor,
    t_sem: Tensor,
    semantic_chans: int,
    *,
    x0: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Noise each part at its own time: returns (x_t, target u = x1 − x0, x0) (docs/method.md §4.2).

    x0 ~ N(0, I) on every element, hence independent between the parts; pass ``x0`` to fix it.
    """
    if x0 is None:
        rng_device = generator.device if generator is not None else x1.device
        x0 = torch.randn(x1.shape, generator=generator, device=rng_device, dtype=x1.dtype).to(
            x1.device
        )
    t = per_channel(t_tex.to(x1.dtype), t_sem.to(x1.dtype), x1.shape[1], semantic_chans, x1.ndim)
    x_t = t * x1 + (1 - t) * x0
    return x_t, x1 - x0, x0


@dataclass
class LossTerms:
    """Every loss term as a batch mean (scalar tensors) plus the per-sample values (B,).

    ``repa`` is the unweighted REPA term; ``total`` = mse + cos + repa_weight·repa. Disabled
    terms are zeros so logging code need not branch.
    """

    total: Tensor
    mse: Tensor
    cos: Tensor
    repa: Tensor
    per_sample: dict[str, Tensor] = field(default_factory=dict)


# REPA alignment per sample (B,) of projected tokens vs encoder tokens, both (B, N, D) float32:
# the authors' three modes (transport.py); ``repa_mode`` names one.
REPA_MODES: Registry[Callable[[Tensor, Tensor], Tensor]] = Registry("REPA loss mode")


@REPA_MODES.register("cos")
def repa_cos(projection: Tensor, target: Tensor) -> Tensor:
    """Mean over tokens of 1 − cos."""
    return (1 - F.cosine_similarity(projection, target, dim=-1)).mean(dim=1)


@REPA_MODES.register("mse")
def repa_mse(projection: Tensor, target: Tensor) -> Tensor:
    """Mean over tokens and features of the squared error."""
    return (projection - target).square().mean(dim=(1, 2))


@REPA_MODES.register("cos_mse")
def repa_cos_mse(projection: Tensor, target: Tensor) -> Tensor:
    """The average of ``cos`` and ``mse``."""
    return (repa_cos(projection, target) + repa_mse(projection, target)) / 2


def repa_loss(projection: Tensor, target: Tensor, mode: RepaMode = "cos") -> Tensor:
    """Per-sample REPA alignment (B,) of projected tokens vs encoder tokens (docs/method.md §4.6).

    Both (B, N, D), compared in float32 under ``mode`` (a name in :data:`REPA_MODES`).
    """
    if projection.shape != target.shape:
        raise ValueError(
            f"REPA projection {tuple(projection.shape)} != target {tuple(target.shape)}"
        )
    return REPA_MODES[mode](projection.float(), target.float())


def sfd_loss(
    pred: Tensor,
    target: Tensor,
    *,
    semantic_chans: int,
    semantic_weight: float = 2.0,
    use_cosine_loss: bool = True,
    repa_projection: Tensor | None = None,
    repa_target: Tensor | None = None,
    repa_weight: float = 1.0,
    repa_mode: RepaMode = "cos",
    t_tex: Tensor | None = None,
    t_sem: Tensor | None = None,
    mask_clamped: bool = False,
) -> LossTerms:
    """The SFD training loss (docs/method.md §4.5, §4.6), computed in fp32.

    - mse: (1/(C·HW))·[Σ_tex (v̂ − u)² + β·Σ_sem (v̂ − u)²] per sample, β = ``semantic_weight``
      (the authors' normalisation: one mean over all C·HW elements of the β-weighted error).
    - cos: mean over positions of 1 − cos(v̂, u), the cosine taken over all C channels jointly
      and without β (§12.3 item 8), when ``use_cosine_loss``.
    - repa: :func:`repa_loss` when ``repa_projection`` and ``repa_target`` are given. It always
      counts in ``total``: the authors' train.py adds REPA only when the cosine loss is also on
      (§12.3 item 1), which silently drops it otherwise; we do not copy that.

    ``mask_clamped`` (our deviation, off by default, §12.3 item 7) drops the clamped parts: the
    semantic channels of samples with t_sem = 1 (target holds unseen noise) and the texture
    channels of samples with t_tex = 0 (never used at inference). It zeroes their MSE weight
    (the normaliser stays C·HW) and removes them from the cosine; it needs ``t_tex``/``t_sem``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} != target {tuple(target.shape)}")
    if (repa_projection is None) != (repa_target is None):
        raise ValueError("REPA needs both repa_projection and repa_target (or neither)")
    pred, target = pred.float(), target.float()
    B, C = pred.shape[:2]
    ones = torch.ones(1, device=pred.device)
    w_tex, w_sem = ones, ones * semantic_weight
    if mask_clamped:
        if t_tex is None or t_sem is None:
            raise ValueError("mask_clamped needs t_tex and t_sem")
        w_tex = (t_tex > 0).float()
        w_sem = (t_sem < 1).float() * semantic_weight
    weight = per_channel(w_tex, w_sem, C, semantic_chans, pred.ndim)  # (B|1, C, 1, 1)
    reduce = tuple(range(1, pred.ndim))
    mse = ((pred - target).square() * weight).mean(dim=reduce)

    zeros = torch.zeros(B, device=pred.device)
    cos = zeros
    if use_cosine_loss:
        if mask_clamped:
            keep = (weight > 0).float()
            pred, target = pred * keep, target * keep
        cos = (1 - F.cosine_similarity(pred, target, dim=1)).flatten(1).mean(dim=1)

    repa = zeros
    if repa_projection is not None:
        repa = repa_loss(repa_projection, repa_target, repa_mode)

    total = mse + cos + repa_weight * repa
    per_sample = {"total": total, "mse": mse, "cos": cos, "repa": repa}
    return LossTerms(total.mean(), mse.mean(), cos.mean(), repa.mean(), per_sample)
