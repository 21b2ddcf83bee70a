"""Learning the asynchronous schedule while the denoiser trains (ours; docs/decisions.md, "A learned
asynchronous schedule").

The ``learned`` schedule (:class:`sfd.diffusion.LearnedSchedule`) is a monotone path through the
(t_tex, t_sem) square, stored as the lead t_sem − t_tex at K = 2G + 1 knots of the mean clock
τ = (t_tex + t_sem)/2. This module fits that path:

1. **Explore.** A fraction ``schedule_explore`` of each batch draws (t_tex, t_sem) uniformly
   over the whole semantics-first triangle t_sem ≥ t_tex instead of along the current path
   (:meth:`ScheduleLearner.draw_times`), so the network is trained, and measured, where the path
   might move to. The rest of the batch follows the path (logit-normal over τ).
2. **Measure.** Every sample's squared velocity error per part (:func:`part_errors`, from the
   prediction the loss already made: no extra forward) is binned into a G × G histogram over
   (t_tex, t_sem), as exponentially decayed sums and counts (:meth:`ScheduleLearner.observe`,
   :meth:`ScheduleLearner.accumulate`). The trainer all-reduces the increments with its loss
   sums, so every rank holds the same histogram.
3. **Solve.** Every ``schedule_update_every`` steps, dynamic programming over the grid's lattice
   finds the monotone semantics-first path that minimises the error both parts accumulate along
   it, Σ_part ∫ e_part(t_tex, t_sem) dt_part with e the cell's RMS velocity error, plus
   ``schedule_kinetic`` times the clock's excess kinetic energy ∫ (ṫ_tex² + ṫ_sem² − 2) dτ
   (zero on the diagonal; it breaks ties and discourages zig-zags) (:func:`best_path`).
4. **Move.** The knots move ``schedule_step`` of the way to that path (valid lead profiles form a
   convex set, so every mixture is valid), which averages the noisy solutions over updates.

Why this objective: along a path both parts traverse [0, 1] once, and to first order the
sampler's end-point error in a part is the velocity error it integrates, ∫ (v̂ − v) dt_part;
the RMS training error at (t_tex, t_sem) is the measurable proxy for that velocity error there.
A texture velocity is easier to predict once semantics are known, so the error map is what
decides how far semantics should lead, and where. Built on: learned noise schedules (VDM,
Kingma et al. 2021: the schedule is a trained monotone function), loss-adaptive time schedules
(Kingma & Gao 2023, noise levels weighted by the loss measured there), and the abstract of
"Learning When to Denoise" (Qian & Cheng 2026: a monotone parametric class of asynchronous
schedules, learned by a cheap probe jointly with the denoiser). The DP, the histogram and the
update rule are ours; that paper's method text is not public.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sfd.diffusion import LearnedSchedule, check_knots, learned_initial_knots, sample_training_times

__all__ = ["LearnSettings", "ScheduleLearner", "best_path", "part_errors", "cell_index", "schedule_summary", "MIN_CELL_COUNT"]

# A cell enters the path search once it holds this much (decayed) sample weight: a path may only
# cross cells where the error was measured.
MIN_CELL_COUNT = 1.0


def part_errors(pred: Tensor, target: Tensor, semantic_chans: int) -> tuple[Tensor, Tensor]:
    """Per-sample mean squared velocity error over the texture and the semantic channels,
    each (B,) float32, detached (the error map must not feed gradients)."""
    err = (pred.detach().float() - target.detach().float()).square()
    split = err.shape[1] - semantic_chans
    reduce = tuple(range(1, err.ndim))
    return err[:, :split].mean(dim=reduce), err[:, split:].mean(dim=reduce)


def cell_index(t_tex: Tensor, t_sem: Tensor, grid: int) -> Tensor:
    """Flat cell index a·G + b of each (t_tex, t_sem): a the texture cell, b the semantic cell;
    t = 1 falls in the last cell."""
    a = (t_tex.float() * grid).floor().clamp(0, grid - 1).long()
    b = (t_sem.float() * grid).floor().clamp(0, grid - 1).long()
    return a * grid + b


def best_path(err_tex: Tensor, err_sem: Tensor, kinetic: float = 0.0) -> tuple[float, ...] | None:
    """The lead profile (2G + 1 knots) of the monotone lattice path from (0, 0) to (1, 1) with
    t_sem ≥ t_tex that minimises Σ_part ∫ e_part dt_part + kinetic·∫ (ṫ_tex² + ṫ_sem² − 2) dτ.

    ``err_tex``, ``err_sem``: (G, G) error per cell [texture cell a, semantic cell b], NaN where
    unknown. Lattice nodes (i, j) are (t_tex, t_sem) = (i/G, j/G) with j ≥ i; a move advances
    texture, semantics or both by 1/G. A one-part move costs that part's error on the edge it runs
    along (the mean of the known cells either side) and kinetic/G (its clock rate is 2 for half
    the τ a diagonal move takes); a diagonal move costs both errors of the cell it crosses. Ties go
    to the diagonal, then to semantics first. None when no path crosses only known cells.
    """
    G = err_tex.shape[0]
    if err_tex.shape != (G, G) or err_sem.shape != (G, G):
        raise ValueError(f"error maps must both be square (G, G), got {tuple(err_tex.shape)}, {tuple(err_sem.shape)}")
    et, es = err_tex.double().tolist(), err_sem.double().tolist()

    def edge(e: list[list[float]], cells: Sequence[tuple[int, int]]) -> float:
        known = [e[a][b] for a, b in cells if 0 <= a < G and 0 <= b < G and b >= a and not math.isnan(e[a][b])]
        return sum(known) / len(known) if known else math.inf

    inf = math.inf
    cost = [[inf] * (G + 1) for _ in range(G + 1)]
    came: list[list[tuple[int, int] | None]] = [[None] * (G + 1) for _ in range(G + 1)]
    cost[0][0] = 0.0
    for i in range(G + 1):
        for j in range(i, G + 1):
            if i == j == 0:
                continue
            options = []  # (cost, predecessor) in tie-break order: diagonal, semantic, texture
            if i >= 1 and j >= 1:
                c = et[i - 1][j - 1] + es[i - 1][j - 1]
                options.append((cost[i - 1][j - 1] + (c if not math.isnan(c) else inf) / G, (i - 1, j - 1)))
            if j - 1 >= i:
                e = edge(es, [(i - 1, j - 1), (i, j - 1)])
                options.append((cost[i][j - 1] + (e + kinetic) / G, (i, j - 1)))
            if i >= 1:
                e = edge(et, [(i - 1, j - 1), (i - 1, j)])
                options.append((cost[i - 1][j] + (e + kinetic) / G, (i - 1, j)))
            for c, prev in options:
                if c < cost[i][j]:
                    cost[i][j], came[i][j] = c, prev
    if math.isinf(cost[G][G]):
        return None
    lead = [0.0] * (2 * G + 1)
    node = (G, G)
    while node != (0, 0):
        i, j = node
        lead[i + j] = (j - i) / G
        prev = came[i][j]
        assert prev is not None
        if prev == (i - 1, j - 1):  # a diagonal move keeps the lead: the knot between holds it too
            lead[i + j - 1] = (j - i) / G
        node = prev
    return tuple(lead)


@dataclass(frozen=True)
class LearnSettings:
    """The trainer's ``schedule_*`` fields (sfd.config.TrainConfig)."""

    update_every: int = 1000  # steps between path updates; 0 = the knots stay fixed (no exploring)
    explore: float = 0.25  # fraction of each batch drawn over the whole triangle while learning
    decay: float = 0.999  # per-step decay of the error histogram (time constant 1/(1−decay) steps)
    step: float = 0.5  # fraction of the way the knots move to each new path
    kinetic: float = 0.01  # weight of the clock's kinetic-energy penalty in the path search
    until: int = 0  # last step at which the path moves (and exploring stops after it); 0 = whole run

    @classmethod
    def of(cls, cfg: object) -> LearnSettings:
        """From a TrainConfig's ``schedule_*`` fields."""
        return cls(
            update_every=cfg.schedule_update_every, explore=cfg.schedule_explore, decay=cfg.schedule_decay,  # type: ignore[attr-defined]
            step=cfg.schedule_step, kinetic=cfg.schedule_kinetic, until=cfg.schedule_learn_until,  # type: ignore[attr-defined]
        )

    def learning(self, step: int) -> bool:
        """Is the path still being learned at (0-based) optimisation step ``step``?"""
        return self.update_every > 0 and (self.until == 0 or step < self.until)


class ScheduleLearner:
    """The learned schedule's knots and the error histogram that moves them; its state travels in
    the training checkpoint (:meth:`state_dict`), so a resumed run continues bit for bit."""

    def __init__(self, settings: LearnSettings, knots: Sequence[float], semantic_chans: int) -> None:
        problems = check_knots(tuple(knots))
        if problems or len(knots) % 2 == 0 or len(knots) < 3:
            raise ValueError(
                "the learned schedule needs an odd number K = 2G + 1 >= 3 of valid knots (a G × G search grid)"
                + (": " + "; ".join(problems) if problems else f", got {len(knots)}")
            )
        self.settings = settings
        self.semantic_chans = semantic_chans
        self.knots = torch.tensor(knots, dtype=torch.float64)
        self.grid = (len(knots) - 1) // 2
        self.counts = torch.zeros(self.grid, self.grid, dtype=torch.float64)
        self.sums = torch.zeros(2, self.grid, self.grid, dtype=torch.float64)  # texture, semantic
        self.updates = 0

    @classmethod
    def initial_knots(cls, knots: Sequence[float], delta_t: float, grid: int) -> tuple[float, ...]:
        """The model's knots, or the offset path for Δt on a (2·grid + 1)-knot profile."""
        return tuple(knots) if knots else learned_initial_knots(delta_t, 2 * grid + 1)

    @property
    def knot_tuple(self) -> tuple[float, ...]:
        return tuple(self.knots.tolist())

    @property
    def increment_size(self) -> int:
        """Length of :meth:`observe`'s vector (counts, texture sums, semantic sums per cell)."""
        return 3 * self.grid * self.grid

    def draw_times(
        self, batch_size: int, step: int, *, generator: torch.Generator, device: torch.device,
        mean: float, std: float,
    ) -> tuple[Tensor, Tensor]:
        """(t_tex, t_sem) for the global batch of ``step``: logit-normal along the path, and while
        learning a Bernoulli(``explore``) share of rows uniform over the triangle t_sem ≥ t_tex."""
        t_tex, t_sem = sample_training_times(
            batch_size, 0.0, generator=generator, device=device, mean=mean, std=std,
            schedule="learned", knots=self.knot_tuple,
        )
        if not (self.settings.learning(step) and self.settings.explore > 0):
            return t_tex, t_sem
        explore = torch.rand(batch_size, generator=generator, device=generator.device) < self.settings.explore
        pair = torch.rand(2, batch_size, generator=generator, device=generator.device)
        lo, hi = pair.min(dim=0).values.to(device), pair.max(dim=0).values.to(device)
        explore = explore.to(device)
        return torch.where(explore, lo, t_tex), torch.where(explore, hi, t_sem)

    def observe(self, t_tex: Tensor, t_sem: Tensor, pred: Tensor, target: Tensor) -> Tensor:
        """This rank's histogram increment (:attr:`increment_size`,) float32 for one micro-batch."""
        err_tex, err_sem = part_errors(pred, target, self.semantic_chans)
        cells = cell_index(t_tex, t_sem, self.grid)
        n = self.grid * self.grid
        out = torch.zeros(3, n, device=pred.device)
        out[0].index_add_(0, cells, torch.ones_like(err_tex))
        out[1].index_add_(0, cells, err_tex)
        out[2].index_add_(0, cells, err_sem)
        return out.flatten()

    def accumulate(self, increment: Sequence[float] | Tensor) -> None:
        """Fold one step's all-reduced increment into the decayed histogram (skipped steps: not called)."""
        inc = torch.as_tensor(increment, dtype=torch.float64).reshape(3, self.grid, self.grid)
        decay = self.settings.decay
        self.counts.mul_(decay).add_(inc[0])
        self.sums.mul_(decay).add_(inc[1:])

    def error_maps(self) -> tuple[Tensor, Tensor]:
        """(texture, semantic) RMS velocity error per cell, NaN where the cell has too little weight."""
        known = self.counts >= MIN_CELL_COUNT
        rms = (self.sums / self.counts.clamp(min=1e-12)).sqrt()
        nan = torch.tensor(math.nan, dtype=torch.float64)
        return torch.where(known, rms[0], nan), torch.where(known, rms[1], nan)

    def maybe_update(self, steps_done: int) -> bool:
        """After ``steps_done`` optimisation steps: move the knots if an update is due and a path is
        found. Deterministic in the (all-reduced) histogram, so every rank moves alike."""
        s = self.settings
        if not (s.update_every > 0 and steps_done % s.update_every == 0 and s.learning(steps_done - 1)):
            return False
        path = best_path(*self.error_maps(), kinetic=s.kinetic)
        if path is None:
            return False
        self.knots = torch.lerp(self.knots, torch.tensor(path, dtype=torch.float64), s.step)
        self.knots[0] = self.knots[-1] = 0.0
        self.updates += 1
        return True

    def state_dict(self) -> dict[str, Tensor | int]:
        return {"knots": self.knots.clone(), "counts": self.counts.clone(), "sums": self.sums.clone(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Tensor | int]) -> None:
        knots = torch.as_tensor(state["knots"], dtype=torch.float64)
        if knots.shape != self.knots.shape:
            raise ValueError(
                f"the checkpoint's learned schedule has {len(knots)} knots, this run {len(self.knots)} "
                "(schedule_grid or model.semfirst_schedule_knots changed)"
            )
        self.knots = knots.clone()
        self.counts = torch.as_tensor(state["counts"], dtype=torch.float64).clone()
        self.sums = torch.as_tensor(state["sums"], dtype=torch.float64).clone()
        self.updates = int(state["updates"])


def schedule_summary(knots: Sequence[float], points: int = 5) -> dict[str, list[float]]:
    """(t_tex, t_sem) at ``points`` evenly spaced clock values and the largest lead, for logs."""
    member = LearnedSchedule(tuple(knots))
    tau = torch.linspace(0.0, 1.0, points, dtype=torch.float64)
    t_tex, t_sem = member.times(0.0, tau)
    return {"t_tex": [round(v, 4) for v in t_tex.tolist()], "t_sem": [round(v, 4) for v in t_sem.tolist()],
            "max_lead": [round(max(knots), 4)]}
