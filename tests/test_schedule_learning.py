"""The learned asynchronous schedule (issue 22 item 3): a knot path through the (t_tex, t_sem)
square, fitted during training by a path search over the measured per-part velocity error.

Checked: the path's shape (monotone, semantics ahead, exact ends, rates = slopes), that bad knots
are refused and the fixed members refuse knots, that the path search finds known optima
(brute force on small grids; semantics first when texture is easy only after semantics; the
diagonal when leading costs), the learner's draws, moves and state, that every sampler follows a
learned clock, and a tiny training run: the knots move, are written into the checkpoint's model
config, resume bit for bit, and sample/grid.py samples along them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sfd.checkpoint import list_checkpoints, load_training_state
from sfd.config import ConfigError, ModelConfig, SamplingConfig
from sfd.diffusion import (
    SCHEDULES,
    AsyncClock,
    LearnedSchedule,
    check_knots,
    learned_initial_knots,
    sample_training_times,
)
from sfd.samplers import clock_for, sample
from sfd.schedule_learning import LearnSettings, ScheduleLearner, best_path, cell_index, part_errors
from tests.test_diffusion import C_SEM, MU, SIDE, SIGMA, C, gaussian_field, rms

TAU = torch.linspace(0, 1, 2001, dtype=torch.float64)
# A bumpy valid profile (K = 17): fast semantic start, a plateau, a dip, a late texture sprint.
BUMPY = (0.0, 0.125, 0.25, 0.375, 0.375, 0.3, 0.3, 0.2, 0.25, 0.25, 0.3, 0.3, 0.35, 0.375, 0.25, 0.125, 0.0)


def test_learned_path_is_monotone_semantics_first_with_exact_ends_and_slopes_as_rates():
    assert check_knots(BUMPY) == []
    clock = AsyncClock(0.3, C_SEM, "learned", BUMPY)
    t_tex, t_sem = clock.times(TAU)
    assert t_tex[0] == t_sem[0] == 0 and t_tex[-1] == t_sem[-1] == 1  # exact, not approximately
    assert (t_tex.diff() >= -1e-12).all() and (t_sem.diff() >= -1e-12).all() and (t_sem >= t_tex).all()
    assert torch.allclose((t_tex + t_sem) / 2, TAU, atol=1e-12)  # the clock is the mean progress
    # The rates are the derivatives of the maps (central differences; the path is C², so anywhere).
    h = 1e-6
    inner = TAU[5:-5]
    r_tex, r_sem = clock.rates(inner)
    up, down = clock.times(inner + h), clock.times(inner - h)
    assert torch.allclose(r_tex, (up[0] - down[0]) / (2 * h), atol=1e-6)
    assert torch.allclose(r_sem, (up[1] - down[1]) / (2 * h), atol=1e-6)
    assert torch.allclose(r_tex + r_sem, torch.full_like(r_tex, 2.0))  # mean rate 1
    assert (r_tex >= 0).all() and (r_sem >= 0).all() and (r_tex <= 2).all() and (r_sem <= 2).all()
    # ... and continuous: no jump at the knots (a bare polyline jumps by up to 2 there).
    assert r_tex.diff().abs().max() < 1e-2
    assert clock.tau_end == 1.0 and len(clock.phases()) == 1 and clock.max_step == 2 / 16
    # The knots are the control profile: on a straight stretch the path passes through them
    # (BUMPY is linear over its first three knots), a corner is rounded within one spacing.
    k = torch.linspace(0, 1, len(BUMPY), dtype=torch.float64)
    lead = clock.times(k)[1] - clock.times(k)[0]
    assert lead[1].item() == pytest.approx(BUMPY[1], abs=1e-12)
    assert (lead - torch.tensor(BUMPY, dtype=torch.float64)).abs().max() < 0.125 / 3 + 1e-12


def test_no_knots_is_the_offset_path_reclocked():
    """Without knots the learned member starts on the paper's path for Δt, (0,0) → (0,Δt) →
    (1−Δt,1) → (1,1), away from its two corners (cut between knots, then rounded over ±h)."""
    h = 1 / (LearnedSchedule.DEFAULT_KNOTS - 1)
    for delta_t in (0.0, 0.3, 0.5, 1.0):
        clock = AsyncClock(delta_t, C_SEM, "learned")
        t_tex, t_sem = clock.times(TAU)
        on_path = torch.where(t_sem < 1 - 1e-9, t_tex - (t_sem - delta_t).clamp(min=0), t_tex - (t_tex.clamp(min=1 - delta_t)))
        away = ((TAU - delta_t / 2).abs() > 2 * h) & ((TAU - (1 - delta_t / 2)).abs() > 2 * h)
        assert on_path[away].abs().max() < 1e-12, delta_t
        assert (t_sem - t_tex).max().item() == pytest.approx(delta_t, abs=1e-12 if delta_t < 1 else h)
    assert learned_initial_knots(0.0, 5) == (0.0,) * 5  # Δt = 0: the synchronous diagonal
    assert torch.equal(*AsyncClock(0.0, C_SEM, "learned").times(TAU))


def test_bad_knots_are_refused_and_fixed_members_take_none():
    for bad, why in [
        ((0.0, 0.5), "0 at both ends"),
        ((0.0, -0.1, 0.0), ">= 0"),
        ((0.0, 0.75, 0.0, 0.0, 0.0), "at most 2/"),  # t_tex would run backwards
        ((0.0, float("nan"), 0.0), "finite"),
    ]:
        with pytest.raises(ValueError, match=why):
            AsyncClock(0.3, C_SEM, "learned", bad)
        with pytest.raises(ConfigError, match=why):
            ModelConfig(semfirst_schedule="learned", semfirst_schedule_knots=bad)
    for fixed in ("offset", "power"):
        with pytest.raises(ConfigError, match="'learned' schedule"):
            ModelConfig(semfirst_schedule=fixed, semfirst_schedule_knots=BUMPY)
        assert SCHEDULES[fixed].with_knots(()) is SCHEDULES[fixed]  # the same object: untouched arithmetic
    with pytest.raises(ValueError, match="semantic channels"):
        AsyncClock(0.0, 0, "learned", BUMPY)


def test_offset_is_untouched_by_the_learned_member():
    """Bit for bit the paper's clock, its draws and its phases (tests/test_schedule.py pins more)."""
    clock = AsyncClock(0.3, C_SEM)
    tau = torch.linspace(0, 1.3, 97)
    t_tex, t_sem = clock.times(tau)
    assert torch.equal(t_tex, (tau - 0.3).clamp(min=0.0)) and torch.equal(t_sem, tau.clamp(max=1.0))
    assert clock.rates(tau) is None and len(clock.phases()) == 3
    a = sample_training_times(64, 0.3, generator=torch.Generator().manual_seed(3))
    u = torch.sigmoid(torch.randn(64, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(a[0], (u * 1.3 - 0.3).clamp(min=0.0)) and torch.equal(a[1], (u * 1.3).clamp(max=1.0))


def test_learned_training_draws_follow_the_knots():
    t_tex, t_sem = sample_training_times(
        4096, 0.3, generator=torch.Generator().manual_seed(2), schedule="learned", knots=BUMPY
    )
    u = torch.sigmoid(torch.randn(4096, generator=torch.Generator().manual_seed(2)))
    want = AsyncClock(0.3, C_SEM, "learned", BUMPY).times(u)
    assert torch.equal(t_tex, want[0]) and torch.equal(t_sem, want[1])


def test_knots_travel_with_the_model_config_to_the_samplers():
    m = ModelConfig(in_channels=8, semantic_chans=4, hidden_size=32, depth=2, num_heads=2,
                    semfirst_schedule="learned", semfirst_schedule_knots=BUMPY)
    clock = clock_for(m, SamplingConfig())
    assert clock.schedule == "learned" and clock.knots == BUMPY
    assert ModelConfig().semfirst_schedule_knots == ()  # every existing config reads unchanged


# ---- the path search ---------------------------------------------------------------------------------


def cell_centres(G: int) -> tuple[torch.Tensor, torch.Tensor]:
    c = (torch.arange(G, dtype=torch.float64) + 0.5) / G
    return c.view(G, 1).expand(G, G), c.view(1, G).expand(G, G)  # (t_tex, t_sem) of cell [a, b]


def path_cost(path: list[tuple[int, int]], et: torch.Tensor, es: torch.Tensor, kinetic: float) -> float:
    """The objective of :func:`best_path` written out move by move, for the brute force."""
    G = et.shape[0]

    def mean_known(e, cells):
        vals = [e[a, b].item() for a, b in cells if 0 <= a < G and 0 <= b < G and b >= a]
        vals = [v for v in vals if not math.isnan(v)]
        return sum(vals) / len(vals) if vals else math.inf

    total = 0.0
    for (i0, j0), (i1, j1) in zip(path, path[1:]):
        if i1 > i0 and j1 > j0:
            total += (et[i0, j0] + es[i0, j0]).item() / G
        elif j1 > j0:  # semantics moves along texture level i0
            total += (mean_known(es, [(i0 - 1, j0), (i0, j0)]) + kinetic) / G
        else:
            total += (mean_known(et, [(i0, j0 - 1), (i0, j0)]) + kinetic) / G
    return total


def all_paths(G: int):
    def walk(node):
        i, j = node
        if node == (G, G):
            yield [node]
            return
        for nxt in ((i + 1, j + 1), (i, j + 1), (i + 1, j)):
            if nxt[0] <= nxt[1] <= G:
                for rest in walk(nxt):
                    yield [node, *rest]

    yield from walk((0, 0))


def lead_of(path: list[tuple[int, int]], G: int) -> tuple[float, ...]:
    lead = [None] * (2 * G + 1)
    for (i0, j0), (i1, j1) in zip(path, path[1:]):
        lead[i0 + j0] = (j0 - i0) / G
        if i1 > i0 and j1 > j0:
            lead[i0 + j0 + 1] = (j0 - i0) / G
    lead[2 * G] = 0.0
    return tuple(lead)


@pytest.mark.parametrize("seed", range(4))
def test_path_search_matches_brute_force(seed):
    G = 4
    g = torch.Generator().manual_seed(seed)
    et, es = torch.rand(G, G, generator=g, dtype=torch.float64), torch.rand(G, G, generator=g, dtype=torch.float64)
    for kinetic in (0.0, 0.05):
        best = min(all_paths(G), key=lambda p: path_cost(p, et, es, kinetic))
        found = best_path(et, es, kinetic)
        assert check_knots(found) == []
        want = path_cost(best, et, es, kinetic)
        got = min(path_cost(p, et, es, kinetic) for p in all_paths(G) if lead_of(p, G) == found)
        assert got == pytest.approx(want, abs=1e-12), (seed, kinetic)


def test_texture_easy_after_semantics_sends_semantics_first():
    """Texture error is high until semantics are mostly known (t_sem ≥ 0.75), the semantic error is
    the same everywhere: the best path brings semantics to 0.75 before texture moves at all."""
    G = 8
    t_tex, t_sem = cell_centres(G)
    et = torch.where(t_sem < 0.75, 1.0, 0.1).double()
    es = torch.ones(G, G, dtype=torch.float64)
    lead = torch.tensor(best_path(et, es, kinetic=0.01), dtype=torch.float64)
    tau = torch.linspace(0, 1, 2 * G + 1, dtype=torch.float64)
    tex, sem = tau - lead / 2, tau + lead / 2
    assert (sem[tex > 0] > 0.75).all() and lead.max() >= 0.75
    # The mirror image (semantics easy only after texture) cannot lead with texture: the path
    # stays semantics-first, and the best it can do is the diagonal.
    assert best_path(es, et.T.contiguous(), kinetic=0.01) == (0.0,) * (2 * G + 1)


def test_costly_lead_and_ties_give_the_diagonal():
    G = 8
    t_tex, t_sem = cell_centres(G)
    lead_cost = (1 + (t_sem - t_tex)).double()  # both parts predict worse the further apart they are
    assert best_path(lead_cost, lead_cost, kinetic=0.0) == (0.0,) * (2 * G + 1)
    # Each part's error depends on its own time only: every path integrates the same error (up
    # to the rounding of the sums), and the kinetic term picks the diagonal.
    assert best_path(t_tex.exp(), t_sem.exp(), kinetic=0.01) == (0.0,) * (2 * G + 1)


def test_path_search_only_crosses_measured_cells():
    G = 6
    t_tex, t_sem = cell_centres(G)
    ones = torch.ones(G, G, dtype=torch.float64)
    assert best_path(ones, ones, kinetic=0.01) == (0.0,) * (2 * G + 1)  # all known: the diagonal
    a, b = torch.meshgrid(torch.arange(G), torch.arange(G), indexing="ij")
    unknown = (b - a < 2) & (a >= 1) & (b <= G - 2)  # the middle of the diagonal band never measured
    nan = torch.full((G, G), math.nan, dtype=torch.float64)
    lead = best_path(torch.where(unknown, nan, ones), torch.where(unknown, nan, ones), kinetic=0.01)
    assert lead is not None and lead[G] >= 2 / G  # forced off the diagonal mid-way
    assert best_path(nan, nan) is None


# ---- the learner ----------------------------------------------------------------------------------


def test_learner_draws_measures_moves_and_round_trips():
    settings = LearnSettings(update_every=3, explore=0.5, decay=0.9, step=0.5, kinetic=0.0, until=6)
    start = learned_initial_knots(0.3, 9)
    learner = ScheduleLearner(settings, start, semantic_chans=2)
    g = torch.Generator().manual_seed(0)
    t_tex, t_sem = learner.draw_times(4000, 0, generator=g, device=torch.device("cpu"), mean=0.0, std=1.0)
    assert (t_sem >= t_tex).all() and (t_tex >= 0).all() and (t_sem <= 1).all()
    path_tex, _ = LearnedSchedule(start).times(0.0, (t_tex + t_sem) / 2)  # the path point at each row's clock
    explored = ~torch.isclose(path_tex, t_tex, atol=1e-6)
    assert 0.45 < explored.float().mean() < 0.55  # about half the rows explore the triangle
    # After `until` no row explores: the draws are the path's.
    late = learner.draw_times(64, 6, generator=torch.Generator().manual_seed(1), device=torch.device("cpu"), mean=0.0, std=1.0)
    path = sample_training_times(64, 0.0, generator=torch.Generator().manual_seed(1), schedule="learned", knots=start)
    assert torch.equal(late[0], path[0]) and torch.equal(late[1], path[1])

    # Per-part errors and their cells.
    pred, target = torch.zeros(2, 6, 2, 2), torch.ones(2, 6, 2, 2)
    target[:, 4:] = 3.0  # semantic channels (the last 2) err by 3
    e_tex, e_sem = part_errors(pred, target, 2)
    assert e_tex.tolist() == [1.0, 1.0] and e_sem.tolist() == [9.0, 9.0]
    assert cell_index(torch.tensor([0.0, 0.3, 1.0]), torch.tensor([0.1, 0.9, 1.0]), 4).tolist() == [0, 1 * 4 + 3, 15]

    # A world where texture is easy only once semantics are known: the knots move towards a
    # larger lead, part of the way, and only on update steps.
    G = learner.grid
    a, b = torch.meshgrid(torch.arange(G), torch.arange(G), indexing="ij")
    t = torch.rand(2, 20000, generator=g)
    lo, hi = t.min(0).values, t.max(0).values
    cells = cell_index(lo, hi, G)
    err_tex = torch.where(hi < 0.75, 4.0, 0.04)
    inc = torch.zeros(3, G * G)
    inc[0].index_add_(0, cells, torch.ones(20000))
    inc[1].index_add_(0, cells, err_tex)
    inc[2].index_add_(0, cells, torch.ones(20000))
    for step in (1, 2):
        learner.accumulate(inc.flatten())
        assert not learner.maybe_update(step)
    learner.accumulate(inc.flatten())
    assert learner.maybe_update(3) and learner.updates == 1
    moved = learner.knot_tuple
    assert check_knots(moved) == [] and max(moved) > max(start)
    target_path = best_path(*learner.error_maps(), kinetic=0.0)
    assert moved == pytest.approx([(s + p) / 2 for s, p in zip(start, target_path)], abs=1e-12)

    state = learner.state_dict()
    other = ScheduleLearner(settings, start, semantic_chans=2)
    other.load_state_dict(state)
    assert other.knot_tuple == moved and torch.equal(other.counts, learner.counts) and other.updates == 1
    assert not other.maybe_update(9)  # past `until`: the path stays
    with pytest.raises(ValueError, match="knots"):
        ScheduleLearner(settings, learned_initial_knots(0.3, 11), 2).load_state_dict(state)
    with pytest.raises(ValueError, match="odd"):
        ScheduleLearner(settings, learned_initial_knots(0.3, 8), 2)


# ---- samplers on a learned clock ---------------------------------------------------------------------


@pytest.mark.parametrize("method,options", [("euler", {"num_steps": 400}), ("heun", {"num_steps": 40}), ("dopri5", {})])
def test_every_sampler_follows_a_learned_clock(method, options):
    """On the exact Gaussian field each part lands on the data only if it moves at its own rate
    along the knot path (kinks included); errors shrink as the steps grow."""
    x0 = torch.randn(512, C, SIDE, SIDE, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(512, dtype=torch.long)
    exact = MU + SIGMA * x0
    clock = AsyncClock(0.3, C_SEM, "learned", BUMPY)
    grids = ("exact", "authors") if method != "dopri5" else ("exact",)
    for grid in grids:
        result = sample(gaussian_field(), x0, y, clock, method=method, grid=grid, **options)
        assert rms(result.x - exact) < 0.02, (method, grid)
    if method != "dopri5":
        errs = [rms(sample(gaussian_field(), x0, y, clock, method=method, grid="exact", num_steps=n).x - exact)
                for n in (8, 16, 32)]
        assert errs[0] > errs[1] > errs[2], errs
    else:
        loose = sample(gaussian_field(), x0, y, clock, method="dopri5", rtol=1e-2, atol=1e-4)
        tight = sample(gaussian_field(), x0, y, clock, method="dopri5", rtol=1e-5, atol=1e-7)
        assert rms(tight.x - exact) < rms(loose.x - exact) and tight.nfe > loose.nfe


# ---- the trainer ----------------------------------------------------------------------------------


LEARN = ["model.semfirst_schedule=learned", "schedule_update_every=5", "schedule_grid=4",
         "schedule_explore=0.5", "schedule_decay=0.99"]


def test_tiny_run_learns_the_path_writes_it_resumes_exactly_and_samples(tmp_path: Path):
    from sfd.checkpoint import file_sha256, save_safetensors
    from sfd.config import TEXTURE_VAE_PRESETS, to_dict
    from sfd.models.autoencoder import AutoencoderKL
    from tests.test_sample_eval import load_script
    from tests.test_train import SEM, argv, assert_same_weights, final_weights, losses, make_cache
    from train import main as trainer

    torch.set_num_threads(1)  # the bitwise comparison below, as tests/test_train.py
    vae_cfg = TEXTURE_VAE_PRESETS["tiny"]
    torch.manual_seed(0)
    vae = tmp_path / "vae.safetensors"
    save_safetensors(AutoencoderKL(vae_cfg).state_dict(), vae)
    encoder = {"kind": "weights", "name": "tiny-vae", "config": to_dict(vae_cfg), "file": vae.name, "sha256": file_sha256(vae)}
    cache = make_cache(tmp_path / "c8.zarr", tex=vae_cfg.embed_dim, texture_encoder=encoder).path
    extra = ["-o", f"model.in_channels={vae_cfg.embed_dim + SEM}"]

    def train(out: Path, steps: int) -> None:
        trainer.main([*argv(cache, out, f"max_steps={steps}", "ckpt_every=10", *LEARN), *extra])

    train(tmp_path / "ref", 20)
    train(tmp_path / "split", 10)
    train(tmp_path / "split", 20)  # resume at step 10
    assert losses(tmp_path / "split") == losses(tmp_path / "ref")
    assert_same_weights(final_weights(tmp_path / "split"), final_weights(tmp_path / "ref"))
    step, ckpt = list_checkpoints(tmp_path / "ref")[-1]
    state = load_training_state(ckpt)["schedule"]
    split_state = load_training_state(list_checkpoints(tmp_path / "split")[-1][1])["schedule"]
    assert all(torch.equal(state[k], split_state[k]) for k in ("knots", "counts", "sums"))
    assert state["updates"] == split_state["updates"] == 4  # steps 5, 10, 15, 20

    # The checkpoint's model config carries the learned knots, which moved off the start.
    with safe_open(str(ckpt / "ema.safetensors"), "pt") as f:
        stored = json.loads(f.metadata()["model_config"])
    knots = tuple(stored["semfirst_schedule_knots"])
    assert knots == tuple(state["knots"].tolist()) and len(knots) == 9
    assert knots != learned_initial_knots(0.3, 9) and check_knots(knots) == []

    # sample/grid.py reads the checkpoint and samples along the learned path.
    grid = load_script("sample/grid.py")
    png = tmp_path / "grid.png"
    grid.main(["--ckpt", str(tmp_path / "ref"), "--vae", str(vae), "--vae-preset", "tiny", "--classes", "1,2",
               "--per-class", "2", "-o", "method=heun", "-o", "num_steps=6", "--out", str(png)])
    assert png.is_file()
    assert json.loads(png.with_suffix(".json").read_text())["sampling"]["method"] == "heun"

    # eval/plot.py draws the path of every checkpoint.
    plot = load_script("eval/plot.py")
    plot.main([str(tmp_path / "ref"), "--out", str(tmp_path / "plots")])
    assert (tmp_path / "plots" / "schedule.png").is_file()

    # Resuming with other knots on the command line keeps the checkpoint's (trained state), and says so.
    cfg = trainer.resolve_config(trainer.parse_args([*argv(cache, tmp_path / "ref", "max_steps=20", *LEARN), *extra,
                                                     "-o", "model.semfirst_schedule_knots=[0,0.25,0.5,0.25,0,0,0,0,0]"]))
    from sfd.checkpoint import read_checkpoint

    notes = trainer.check_resume(cfg, read_checkpoint(ckpt, prefer_ema=False, weights=False))
    assert any("learned knots are kept" in n for n in notes)


def test_torchrun_two_processes_learn_the_same_path(tmp_path: Path):
    """The histogram rides on the step's all-reduce: two ranks move the knots as one process does."""
    import subprocess
    import sys

    from tests.test_train import REPO, TRAIN, argv, losses, make_cache, run, subprocess_env

    torch.set_num_threads(1)
    cache = make_cache(tmp_path / "c.zarr").path
    common = ("max_steps=4", "global_batch=8", "model.semfirst_schedule=learned", "schedule_update_every=2",
              "schedule_grid=2", "schedule_explore=0.5", "schedule_decay=0.5")
    run(cache, tmp_path / "one", *common)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(TRAIN),
           *argv(cache, tmp_path / "two", *common, "micro_batch=2")]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=180, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    one, two = (load_training_state(list_checkpoints(tmp_path / r)[-1][1])["schedule"] for r in ("one", "two"))
    assert one["updates"] == two["updates"] == 2
    torch.testing.assert_close(two["knots"], one["knots"], atol=1e-9, rtol=0)
    torch.testing.assert_close(two["sums"], one["sums"], atol=1e-5, rtol=1e-5)
    assert torch.equal(two["counts"], one["counts"])
    assert list(losses(tmp_path / "one")) == list(losses(tmp_path / "two")) == [1, 2, 3, 4]
