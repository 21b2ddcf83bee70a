"""Sampling throughput side by side: ours (eager, compiled) vs the authors' loop pattern.

One interleaved run: every round times each variant once on the same batch, so machine load hits
all of them alike; the table gives samples/s as the median over rounds with the min–max spread.
Variants (a LightningDiT preset with random weights, real shapes, perturbed off adaLN-Zero):

- ``authors dopri5``: their call, ``torchdiffeq.odeint(drift, x, linspace(0, 1+Δt, 250),
  method="dopri5", atol=1e-6, rtol=1e-3)`` over all 48 channels with the τ-masked drift
  (docs/method.md §7.1);
- ``authors euler N``: ``odeint(method="euler")`` on their N-point grid, the same drift;
- ``ours dopri5 authors-grid``: the same integration (tests/test_torchdiffeq_parity.py: same steps);
- ``ours dopri5 exact-grid``: phase by phase at rtol 1e-3 (the default), and at ``--equal-rtol``,
  the tolerance at which its error matches the authors' (bench/sampler_accuracy.py);
- ``ours euler N``: equal NFE to theirs; ``ours euler exact-grid M steps``: the fewest exact-grid
  Euler steps whose error is at most that of the authors' dopri5 (``--equal-euler-steps``);
- each of ours also compiled (``compile="on"``: torch.compile of the velocity function).

Needs torchdiffeq (the dev extra). Prints a table and JSON (``--out``).

Examples:
    python bench/sample.py --model tiny --batch 4 --rounds 5
    python bench/sample.py --model B/1 --batch 1 --rounds 3 --out runs/bench/sample.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sfd.config import model_preset
from sfd.diffusion import AsyncClock
from sfd.guidance import classifier_free_guidance, compile_velocity_fn, model_velocity
from sfd.models.lightningdit import LightningDiT
from sfd.models.standins import random_lightningdit
from sfd.samplers import initial_noise, sample


def random_model(name: str, seed: int) -> LightningDiT:
    return random_lightningdit(model_preset(name), seed)


def authors_drift(fn, y, delta_t: float, semantic_chans: int, counter: list[int]):
    """Their semantic_first_drift_with_masking as torchdiffeq calls it: scalar t, mask multiply."""

    def drift(t, x):
        counter[0] += 1
        t_B = torch.ones(x.shape[0], dtype=x.dtype, device=x.device) * t
        v = fn(x, torch.clamp(t_B - delta_t, min=0.0), torch.clamp(t_B, max=1.0), y)
        mask = torch.ones_like(v)
        if not bool(t >= delta_t):
            mask[:, :-semantic_chans] = 0
        if not bool(t <= 1.0):
            mask[:, -semantic_chans:] = 0
        return v * mask

    return drift


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="B/1", help="model preset (random weights)")
    ap.add_argument("--batch", type=int, default=1, help="samples per sampler call")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (each times every variant once, interleaved)")
    ap.add_argument("--euler-points", type=int, default=51, help="Euler grid points (N−1 steps = NFE), ours and theirs")
    ap.add_argument("--equal-rtol", type=float, default=1e-2,
                    help="exact-grid dopri5 rtol whose error matches the authors' dopri5 at 1e-3 (bench/sampler_accuracy.py)")
    ap.add_argument("--equal-euler-steps", type=int, default=8,
                    help="exact-grid Euler steps whose error is at most the authors' dopri5 error (bench/sampler_accuracy.py)")
    ap.add_argument("--cfg-scale", type=float, default=1.0, help="CFG for every variant (1 = off)")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled variants")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--out", default=None, help="JSON file")
    args = ap.parse_args()
    import torchdiffeq

    device = torch.device(args.device)
    model = random_model(args.model, 0).to(device)
    cfg = model.cfg
    clock = AsyncClock(delta_t=cfg.semfirst_delta_t, semantic_chans=cfg.semantic_chans)
    x0 = initial_noise(range(args.batch), (cfg.in_channels, cfg.input_size, cfg.input_size), 0, device=device)
    y = (torch.arange(args.batch) % cfg.num_classes).to(device)
    eager = model_velocity(model)
    if args.cfg_scale != 1.0:
        eager = classifier_free_guidance(eager, args.cfg_scale, null_class=cfg.num_classes, semantic_chans=cfg.semantic_chans)
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    fns = {"eager": eager}
    if not args.no_compile:
        fns["compiled"] = compile_velocity_fn(eager, args.batch, mode)
    T, N = clock.tau_end, args.euler_points

    def theirs(method: str) -> Callable[[], int]:
        def run() -> int:
            counter = [0]
            grid = torch.linspace(0, T, 250 if method == "dopri5" else N, device=device)
            opts = dict(atol=1e-6, rtol=1e-3) if method == "dopri5" else {}
            torchdiffeq.odeint(authors_drift(eager, y, cfg.semfirst_delta_t, cfg.semantic_chans, counter), x0, grid, method=method, **opts)
            return counter[0]
        return run

    def ours(fn, method: str, **opts) -> Callable[[], int]:
        return lambda: sample(fn, x0, y, clock, method=method, **opts).nfe

    variants: dict[str, Callable[[], int]] = {
        "authors dopri5 (torchdiffeq)": theirs("dopri5"),
        f"authors euler {N} points (torchdiffeq)": theirs("euler"),
    }
    for kind, fn in fns.items():
        variants[f"ours dopri5 authors-grid, {kind}"] = ours(fn, "dopri5", grid="authors")
        variants[f"ours dopri5 exact-grid rtol 1e-3, {kind}"] = ours(fn, "dopri5")
        variants[f"ours dopri5 exact-grid rtol {args.equal_rtol:g}, {kind}"] = ours(fn, "dopri5", rtol=args.equal_rtol)
        variants[f"ours euler {N} points, {kind}"] = ours(fn, "euler", num_steps=N)
        variants[f"ours euler exact-grid {args.equal_euler_steps} steps, {kind}"] = ours(
            fn, "euler", num_steps=args.equal_euler_steps, grid="exact")
    times: dict[str, list[float]] = {k: [] for k in variants}
    nfe: dict[str, int] = {}
    with torch.no_grad():
        for name, run in variants.items():  # warm-up (compiles), not timed
            nfe[name] = run()
        for _ in range(args.rounds):
            for name, run in variants.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                run()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["authors dopri5 (torchdiffeq)"])
    rows = []
    print(f"{args.model} random weights, batch {args.batch}, {args.rounds} rounds, device {device}, threads {torch.get_num_threads()}, "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("\n| variant | NFE | samples/s (median) | min–max | vs authors' dopri5 |\n|---|---|---|---|---|")
    for name, ts in times.items():
        rate = [args.batch / t for t in ts]
        med = statistics.median(ts)
        rows.append(dict(variant=name, nfe=nfe[name], seconds=ts, samples_per_s_median=args.batch / med,
                         samples_per_s_min=min(rate), samples_per_s_max=max(rate), speedup_vs_authors_dopri5=base / med))
        print(f"| {name} | {nfe[name]} | {args.batch / med:.3g} | {min(rate):.3g}–{max(rate):.3g} | {base / med:.2f}× |")
    report = dict(model=args.model, batch=args.batch, rounds=args.rounds, device=str(device), cfg_scale=args.cfg_scale,
                  torch=torch.__version__, threads=torch.get_num_threads(), loadavg=os.getloadavg(), rows=rows)
    print(json.dumps(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
