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
  docs/decisions.md), and ``learned`` (ours) a piecewise-linear member whose knots the trainer
  fits (:class:`LearnedSchedule`, sfd/schedule_learning.py).
- Velocity functions have one signature, ``fn(x, t_tex, t_sem, y) -> v`` with x (B, C, H, W),
  t_tex and t_sem (B,) and y (B,) int64 labels (the null class is ``num_classes``).

Sampling lives beside this module: ``sfd/guidance.py`` (velocity functions and guidance) and
``sfd/samplers.py`` (Euler, Heun, dopri5 over the clock; per-index noise; generation).

Sections: clock · training (time split, noising, losses).
"""

from __future__ import annotations

import functools
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
    "LearnedSchedule",
    "learned_initial_knots",
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

    def max_step(self, delta_t: float) -> float | None:
        """The largest clock step an adaptive solver may take (None: no limit). For schedules
        whose rates change over clock spans a step-size controller can step over unseen."""
        return None

    def with_knots(self, knots: tuple[float, ...]) -> Schedule:
        """This schedule with the parameters ``knots`` (``model.semfirst_schedule_knots``). A fixed
        member has none: it refuses knots rather than ignore them, and returns itself, so a fixed
        member's arithmetic is untouched by the learned one's existence."""
        if knots:
            raise ValueError("semfirst_schedule_knots are parameters of the 'learned' schedule; this one takes none")
        return self

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


class LearnedSchedule(Schedule):
    """Ours: a path through the (t_tex, t_sem) square given by K knots, fitted during training.

    The clock is the parts' mean progress τ = (t_tex + t_sem)/2 ∈ [0, 1], so one number per
    clock value fixes the path: the lead D(τ) = t_sem − t_tex, and t_tex = τ − D/2,
    t_sem = τ + D/2. The knots d_k are a control profile at τ_k = k·h, h = 1/(K−1): D is their
    piecewise-linear interpolant averaged with triangle weights over ±h (continued past the ends
    by odd reflection), i.e. the uniform cubic B-spline with those control points. The average
    makes D twice continuously differentiable, so each part's rate dt/dτ = 1 ∓ D′/2 is smooth
    enough for Heun and dopri5 to keep their order (a bare polyline has a rate jump at every knot:
    Heun's error then fell only as 1/steps, and dopri5 at its default tolerances missed by 0.05 on
    the Gaussian test); it moves nothing on straight stretches and rounds each corner within h.
    A profile is valid (:func:`check_knots`) when d = 0 at both ends, d ≥ 0 (semantics never
    behind) and |d_{k+1} − d_k| ≤ 2h (neither part runs backwards; a part stands still at the
    bound). The average keeps all three: D(0) = D(1) = 0, D ≥ 0, |D′| ≤ 2. Valid profiles form
    a convex set, so the trainer's partial moves stay valid. No knots: the paper's offset path for
    Δt on the mean clock (:func:`learned_initial_knots`), the trainer's starting point; with
    knots Δt plays no part.
    """

    DEFAULT_KNOTS = 33  # 2·16 + 1: a 16 × 16 grid over the square for the trainer's path search

    def __init__(self, knots: tuple[float, ...] = ()) -> None:
        self.knots = tuple(float(k) for k in knots)
        problems = check_knots(self.knots) if self.knots else []
        if problems:
            raise ValueError("semfirst_schedule_knots: " + "; ".join(problems))
        self._tables: dict[tuple[float, torch.device], tuple[Tensor, Tensor, Tensor]] = {}

    def with_knots(self, knots: tuple[float, ...]) -> Schedule:
        return LearnedSchedule(knots)

    def max_step(self, delta_t: float) -> float:
        """Two knot spacings, the width of a rounded corner. Uncapped, dopri5 at its default
        tolerances stepped straight over corners (Gaussian test, K = 33: 5 steps, error 0.023);
        capped at two spacings: 110 NFE, error 2e-4; at four: 74 NFE, 5e-3, and 0.036 for K = 17."""
        return 2.0 / (len(self.lead(delta_t)) - 1)

    def lead(self, delta_t: float) -> tuple[float, ...]:
        """The control profile d_k in use: the knots, or the offset path's for ``delta_t``."""
        return self.knots or learned_initial_knots(delta_t, self.DEFAULT_KNOTS)

    def _table(self, delta_t: float, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """The profile extended by one knot past each end (odd reflection: d_{−1} = −d_1,
        d_K = −d_{K−2}) with its first and second running integrals at those K + 2 points;
        float64 (float32 on MPS, which has no float64), built once per (Δt, device): the samplers
        ask at every evaluation."""
        key = (delta_t, device)
        if key not in self._tables:
            d = torch.tensor(self.lead(delta_t), dtype=torch.float64)
            ext = torch.cat([-d[1:2], d, -d[-2:-1]])
            h = 1.0 / (len(d) - 1)
            zero = torch.zeros(1, dtype=torch.float64)
            first = torch.cat([zero, ((ext[1:] + ext[:-1]) * (h / 2)).cumsum(0)])
            # Exact over a linear segment: ∫∫ = F_j·h + h²·(d_j/3 + d_{j+1}/6).
            second = torch.cat([zero, (first[:-1] * h + h * h * (ext[:-1] / 3 + ext[1:] / 6)).cumsum(0)])
            work = _work_dtype(device)
            self._tables[key] = (ext.to(device, work), first.to(device, work), second.to(device, work))
        return self._tables[key]

    @staticmethod
    def _integrals(table: tuple[Tensor, Tensor, Tensor], s: Tensor) -> tuple[Tensor, Tensor]:
        """The extended polyline's first and second integrals from −h, at s ∈ [−h, 1 + h]."""
        ext, first, second = table
        n = len(ext) - 1  # segments of the extended profile; h = 1/(n − 2)
        h = 1.0 / (n - 2)
        pos = s / h + 1.0
        j = pos.floor().clamp(0, n - 1)
        w = pos - j
        j = j.long()
        lo, slope = ext[j], ext[j + 1] - ext[j]
        f = first[j] + h * w * (lo + w / 2 * slope)
        g = second[j] + first[j] * (h * w) + h * h * w * w * (lo / 2 + w / 6 * slope)
        return f, g

    def _lead(self, delta_t: float, tau: Tensor) -> tuple[Tensor, Tensor]:
        """D(τ) and D′(τ) in float64 (MPS: float32) as second differences of the integrals over ±h (the
        triangle-weighted average); D is exactly 0 at (and beyond) both ends."""
        table = self._table(delta_t, tau.device)
        t = tau.to(table[0].dtype).clamp(0.0, 1.0)
        h = 1.0 / (len(table[0]) - 3)
        (f_hi, g_hi), (f_mid, g_mid), (f_lo, g_lo) = (self._integrals(table, t + o) for o in (h, 0.0, -h))
        inside = (t > 0) & (t < 1)
        lead = (g_hi - 2 * g_mid + g_lo) / (h * h)
        lead = torch.where(inside, lead, torch.zeros((), dtype=t.dtype, device=t.device))
        return lead.clamp(min=0.0), (f_hi - 2 * f_mid + f_lo) / (h * h)

    def times(self, delta_t: float, tau: Tensor) -> tuple[Tensor, Tensor]:
        lead, _ = self._lead(delta_t, tau)
        t = tau.to(lead.dtype).clamp(0.0, 1.0)
        # The clamps only absorb rounding: mathematically 0 ≤ τ − D/2 ≤ τ + D/2 ≤ 1.
        return (t - lead / 2).clamp(0.0, 1.0).to(tau.dtype), (t + lead / 2).clamp(0.0, 1.0).to(tau.dtype)

    def rates(self, delta_t: float, tau: Tensor) -> tuple[Tensor, Tensor]:
        _, slope = self._lead(delta_t, tau)
        return (1 - slope / 2).clamp(0.0, 2.0).to(tau.dtype), (1 + slope / 2).clamp(0.0, 2.0).to(tau.dtype)


def _work_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


SCHEDULES.register("offset", OffsetSchedule())
SCHEDULES.register("power", PowerSchedule())
SCHEDULES.register("learned", LearnedSchedule())


def learned_initial_knots(delta_t: float, num_knots: int = LearnedSchedule.DEFAULT_KNOTS) -> tuple[float, ...]:
    """The offset path for ``delta_t`` as a lead profile: (0,0) → (0,Δt) → (1−Δt,1) → (1,1) in
    (t_tex, t_sem) has lead min(2τ, Δt, 2(1−τ)) on the mean clock τ, sampled at ``num_knots``
    points (exact at the knots; the two corners between knots are cut by the interpolation)."""
    if num_knots < 2:
        raise ValueError(f"a learned schedule needs at least 2 knots, got {num_knots}")
    return tuple(min(2 * t, delta_t, 2 * (1 - t)) for t in (k / (num_knots - 1) for k in range(num_knots)))


def check_knots(knots: tuple[float, ...] | list[float]) -> list[str]:
    """Problems (empty if none) with a lead profile for :class:`LearnedSchedule`."""
    k = len(knots)
    if k < 2:
        return [f"need at least 2 knots, got {k}"]
    if not all(math.isfinite(x) for x in knots):
        return ["knots must be finite"]
    problems = []
    tol = 1e-9  # rounding of stored floats; larger violations are real
    if abs(knots[0]) > tol or abs(knots[-1]) > tol:
        problems.append(f"the lead must be 0 at both ends (both parts start at noise and end at data), got {knots[0]}, {knots[-1]}")
    if min(knots) < -tol:
        problems.append(f"the lead t_sem − t_tex must be >= 0 (semantics first), got {min(knots)}")
    steep = max(abs(b - a) for a, b in zip(knots, knots[1:]))
    if steep > 2 / (k - 1) + tol:
        problems.append(f"consecutive knots may differ by at most 2/(K−1) = {2 / (k - 1):.6g} (else a part runs backwards), got {steep:.6g}")
    return problems


def power_gamma(delta_t: float) -> float:
    """γ of the ``power`` schedule whose largest lead t_sem − t_tex (at τ = ½) equals ``delta_t``."""
    if not 0.0 <= delta_t < 1.0:
        raise ValueError(f"the power schedule needs delta_t in [0, 1), got {delta_t}")
    return 1.0 - math.log2(1.0 - delta_t)  # 1 − 2·(½)^γ = Δt


def schedule_times(schedule: str, delta_t: float, tau: Tensor, knots: tuple[float, ...] = ()) -> tuple[Tensor, Tensor]:
    """(t_tex, t_sem) at global clock ``tau`` under ``schedule`` (docs/method.md §4.2, §7.1).

    ``offset`` (the paper): t_sem = min(τ, 1), t_tex = max(τ − Δt, 0), τ ∈ [0, 1 + Δt].
    ``power`` (ours, smooth): t_tex = τ^γ, t_sem = 1 − (1 − τ)^γ, τ ∈ [0, 1], with γ from
    :func:`power_gamma` so that the largest lead is Δt. Both maps are monotone, t_sem ≥ t_tex,
    and Δt = 0 gives t_tex = t_sem = τ in both. ``learned``: :class:`LearnedSchedule` with
    ``knots``. Others: :data:`SCHEDULES`.
    """
    return SCHEDULES[schedule].with_knots(knots).times(delta_t, tau)


@dataclass(frozen=True)
class AsyncClock:
    """The asynchronous schedule: the semantic part leads the texture part.

    ``schedule="offset"`` is the paper's: a constant lead ``delta_t``. ``"power"`` is a smooth
    member of the family of monotone maps τ ↦ (t_tex, t_sem) whose largest lead is ``delta_t``
    (:func:`schedule_times`); each part then moves with its own rate dt/dτ (:meth:`rates`).
    ``"learned"`` follows ``knots`` (:class:`LearnedSchedule`; Δt only sets the path used when
    there are none).
    ``semantic_chans`` counts the last channels of the composite latent. Δt > 0 needs semantic
    channels (the authors assert the same, docs/method.md §4.2); Δt ∈ [0, 1], where Δt = 1 is fully
    sequential generation (§4.3) and has an empty stage II.
    """

    delta_t: float = 0.3
    semantic_chans: int = 16
    schedule: str = "offset"
    knots: tuple[float, ...] = ()  # the learned schedule's lead profile (model.semfirst_schedule_knots)

    def __post_init__(self) -> None:
        if not 0.0 <= self.delta_t <= 1.0:
            raise ValueError(f"delta_t must lie in [0, 1], got {self.delta_t}")
        if self.semantic_chans < 0:
            raise ValueError(f"semantic_chans must be >= 0, got {self.semantic_chans}")
        if self.delta_t > 0 and self.semantic_chans == 0:
            raise ValueError("delta_t > 0 needs semantic channels (semantic_chans > 0)")
        for problem in SCHEDULES[self.schedule].check(self.delta_t):
            raise ValueError(problem)
        if self.knots and self.semantic_chans == 0:
            raise ValueError("a learned lead (knots) needs semantic channels (semantic_chans > 0)")
        self._schedule  # noqa: B018  refuse bad knots here, not at the first sampler call

    @functools.cached_property
    def _schedule(self) -> Schedule:
        """The registered member, with this clock's knots (a fixed member is the registered object)."""
        return SCHEDULES[self.schedule].with_knots(self.knots)

    @property
    def tau_end(self) -> float:
        return self._schedule.tau_end(self.delta_t)

    @property
    def max_step(self) -> float | None:
        """The schedule's cap on an adaptive solver's clock step (None: none; see Schedule.max_step)."""
        return self._schedule.max_step(self.delta_t)

    def times(self, tau: Tensor) -> tuple[Tensor, Tensor]:
        """(t_tex, t_sem) at clock value ``tau`` (§4.2 step 3, §7.1); texture first."""
        return self._schedule.times(self.delta_t, tau)

    def rates(self, tau: Tensor) -> tuple[Tensor, Tensor] | None:
        """(dt_tex/dτ, dt_sem/dτ), or None where every moving part has rate 1 (the offset
        schedule: its phases say which parts move, and a moving part moves with the clock)."""
        return self._schedule.rates(self.delta_t, tau)

    def phases(self) -> list[Phase]:
        """The non-empty phases I, II, III in order (a single phase [0, 1] when Δt = 0 or the
        schedule is smooth: both parts move all the way, at their own rates)."""
        if self.delta_t == 0 or not self._schedule.phased:
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
    knots: tuple[float, ...] = (),
) -> tuple[Tensor, Tensor]:
    """Draw (t_tex, t_sem), each (B,) float32, from one logit-normal draw (docs/method.md §4.2).

    u = σ(n), n ~ N(mean, std²); τ = u·(1+Δt); t_sem = min(τ, 1), t_tex = max(τ − Δt, 0), so
    t_sem ≥ t_tex always. Δt = 0 gives t_tex = t_sem = u. Another ``schedule`` maps u over its
    own clock length instead (:func:`schedule_times`; ``power``, ``learned``: τ = u). The draw comes from ``generator``
    (torch RNG; the authors used unseeded scipy, §12.3 item 9) on the generator's device, so a
    seed gives the same times on any ``device``.
    """
    if not 0.0 <= delta_t <= 1.0:
        raise ValueError(f"delta_t must lie in [0, 1], got {delta_t}")
    rng_device = generator.device if generator is not None else device
    n = torch.randn(batch_size, generator=generator, device=rng_device)
    u = torch.sigmoid(n * std + mean)
    member = SCHEDULES[schedule].with_knots(knots)
    tau = u * member.tau_end(delta_t)  # over the clock's length (× 1.0 is exact)
    t_tex, t_sem = member.times(delta_t, tau)
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
