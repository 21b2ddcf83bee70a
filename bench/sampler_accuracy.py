"""What each sampler and grid costs in accuracy: error against a tight reference vs NFE.

A LightningDiT with random weights (real shapes, perturbed off adaLN-Zero so the velocity is not
zero), a few samples; the reference is dopri5 on the exact three-phase grid at rtol 1e-7 (the
masked drift has one solution; both grids converge to it as their tolerance or step shrinks). Swept:
dopri5 rtol (atol 1e-6 as the authors), Euler and Heun step counts, each on the exact grid and
the authors' single τ-masked run (docs/method.md §7.1). Error: RMS over the texture channels (the
part that is decoded) and over all 48, per sample, averaged. Prints a table and JSON; writes a plot.

Examples:
    python bench/sampler_accuracy.py --model tiny --out runs/bench/sampler-accuracy.json --plot runs/bench/sampler-accuracy.png
    python bench/sampler_accuracy.py --model B/1 --batch 4 --plot docs/sampler-accuracy.png  # hours on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sfd.config import model_preset
from sfd.diffusion import AsyncClock
from sfd.guidance import model_velocity
from sfd.models.lightningdit import LightningDiT
from sfd.models.standins import random_lightningdit
from sfd.samplers import initial_noise, sample


def random_model(name: str, seed: int) -> LightningDiT:
    return random_lightningdit(model_preset(name), seed)


def sweep(quick: bool) -> list[tuple[str, str, dict]]:
    rtols = [1e-2, 1e-3, 1e-4] if quick else [1e-2, 3e-3, 1e-3, 1e-4, 1e-5]
    steps = [8, 32] if quick else [8, 16, 32, 64, 128]
    runs = []
    for grid in ("exact", "authors"):
        runs += [("dopri5", grid, dict(rtol=r, atol=1e-6)) for r in rtols]
        # Euler/Heun on the authors' grid count points (num_steps − 1 steps), as theirs: +1 to compare.
        extra = 1 if grid == "authors" else 0
        runs += [("euler", grid, dict(num_steps=n + extra)) for n in steps]
        runs += [("heun", grid, dict(num_steps=n // 2 + extra)) for n in steps]
    return runs


def rms_error(x: torch.Tensor, ref: torch.Tensor, channels: slice) -> float:
    return float((x - ref)[:, channels].square().flatten(1).mean(1).sqrt().mean())


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"dopri5": "o-", "heun": "s--", "euler": "^:"}
    colors = {"exact": "tab:blue", "authors": "tab:orange"}
    for method in ("dopri5", "heun", "euler"):
        for grid in ("exact", "authors"):
            pts = sorted((r["nfe"], r["err_texture"]) for r in rows if r["method"] == method and r["grid"] == grid)
            if pts:
                ax.loglog(*zip(*pts), styles[method], color=colors[grid], label=f"{method}, {grid} grid")
    for r in rows:
        if r["method"] == "dopri5":
            ax.annotate(f"{r['rtol']:g}", (r["nfe"], r["err_texture"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("NFE (velocity evaluations per sample batch)")
    ax.set_ylabel("RMS error of the texture latent vs reference")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="B/1", help="model preset (random weights)")
    ap.add_argument("--batch", type=int, default=4, help="number of samples (one batch)")
    ap.add_argument("--seed", type=int, default=0, help="weights and noise seed")
    ap.add_argument("--ref-rtol", type=float, default=1e-7, help="reference: exact-grid dopri5 at this rtol (atol rtol/100)")
    ap.add_argument("--quick", action="store_true", help="a smaller sweep")
    ap.add_argument("--out", default=None, help="JSON file")
    ap.add_argument("--plot", default=None, help="PNG file (e.g. docs/sampler-accuracy.png)")
    args = ap.parse_args()

    model = random_model(args.model, args.seed)
    cfg = model.cfg
    clock = AsyncClock(delta_t=cfg.semfirst_delta_t, semantic_chans=cfg.semantic_chans)
    x0 = initial_noise(range(args.batch), (cfg.in_channels, cfg.input_size, cfg.input_size), args.seed)
    y = torch.arange(args.batch) % cfg.num_classes
    fn = model_velocity(model)
    tex = slice(0, cfg.texture_chans)
    with torch.no_grad():
        t0 = time.perf_counter()
        ref = sample(fn, x0, y, clock, method="dopri5", rtol=args.ref_rtol, atol=args.ref_rtol / 100)
        print(f"reference: dopri5 exact grid rtol {args.ref_rtol:g}: NFE {ref.nfe} ({time.perf_counter() - t0:.0f} s)")
        rows = []
        for method, grid, opts in sweep(args.quick):
            res = sample(fn, x0, y, clock, method=method, grid=grid, **opts)
            row = dict(method=method, grid=grid, **opts, nfe=res.nfe,
                       err_texture=rms_error(res.x, ref.x, tex), err_all=rms_error(res.x, ref.x, slice(None)))
            rows.append(row)
            setting = f"rtol {opts['rtol']:g}" if method == "dopri5" else f"num_steps {opts['num_steps']}"
            print(f"{method:7s} {grid:8s} {setting:16s} NFE {res.nfe:5d}  err tex {row['err_texture']:.2e}  all {row['err_all']:.2e}", flush=True)
    print("\n| sampler | grid | setting | NFE | RMS error (texture) | RMS error (all) |\n|---|---|---|---|---|---|")
    for r in rows:
        setting = f"rtol {r['rtol']:g}" if r["method"] == "dopri5" else f"{r['num_steps']} {'points' if r['grid'] == 'authors' else 'steps'}"
        print(f"| {r['method']} | {r['grid']} | {setting} | {r['nfe']} | {r['err_texture']:.2e} | {r['err_all']:.2e} |")
    report = dict(model=args.model, batch=args.batch, seed=args.seed, weights="random (perturbed 0.02)",
                  reference=dict(method="dopri5", grid="exact", rtol=args.ref_rtol, atol=args.ref_rtol / 100, nfe=ref.nfe),
                  torch=torch.__version__, threads=torch.get_num_threads(), rows=rows)
    print(json.dumps(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(rows, Path(args.plot), f"{args.model}, random weights, {args.batch} samples; reference dopri5 exact grid rtol {args.ref_rtol:g} (NFE {ref.nfe})")
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
