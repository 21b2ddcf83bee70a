"""A small convergence study on the demo data: Δt = 0.3 (SFD) vs Δt = 0 vs no semantic channels.

The same tiny LightningDiT (+REPA) as ``pipeline/demo.py``, the same seed, the same steps and
batch, in three variants that differ only in how the latent is denoised:

- ``sfd-dt0.3``   the composite latent [texture | semantic], semantic part leading by Δt = 0.3;
- ``sync-dt0``    the same composite latent, both parts on one clock (Δt = 0);
- ``no-semantic`` the texture channels of the same cache only (plain LightningDiT + REPA).

Each run checkpoints at ``--evals`` evenly spaced steps; every checkpoint's EMA weights generate
``--samples`` class-balanced images (Heun, 25 steps, fixed per-sample seeds), which are compared
with held-out demo images in a random-init Inception feature space: ``FD_random-inception``,
never FID (no Inception weights exist here). One line per checkpoint goes to
``<out>/<variant>/eval.jsonl``, and ``eval/plot.py`` draws all three runs on one figure.
Everything runs through the real command lines (encode, train, gen, ref, calc, plot) in
subprocesses, like the demo; every stage resumes if the study is run again.

The defaults (180 steps, 3 checkpoints, 40 samples, ~10-20 min on 2 CPU cores) are far too
small for the samples to look like the data: see docs/study.md for what a run shows.

Example:
    python pipeline/study.py --out runs/study
    python pipeline/study.py --out runs/study-quick --steps 60 --samples 20 --evals 2
    python pipeline/study.py --out runs/study-long --steps 3000 --evals 6 --samples 500   # GPU: meaningful
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sfd.checkpoint import list_checkpoints

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "pipeline"))  # demo_data sits beside this file (pipeline/ is no package)
from demo import STANDINS, TINY_MODEL, demo_env, encode_command, run  # noqa: E402
from demo_data import CLASSES, make_demo_dataset  # noqa: E402

METRIC = "FD_random-inception"
MODEL = TINY_MODEL  # the variants change only the latent channels and Δt
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "sfd-dt0.3": ("Δt=0.3 (SFD)", [
        "model.in_channels=52", "model.semantic_chans=4", "delta_t=0.3", "model.semfirst_delta_t=0.3",
    ]),
    "sync-dt0": ("Δt=0 (synchronous)", [
        "model.in_channels=52", "model.semantic_chans=4", "delta_t=0", "model.semfirst_delta_t=0",
    ]),
    "no-semantic": ("no semantic channels", [
        "use_semantic=false", "model.in_channels=48", "model.semantic_chans=0", "delta_t=0",
        "model.semfirst_delta_t=0",
    ]),
}


def evaluated_steps(path: Path) -> set[int]:
    if not path.is_file():
        return set()
    return {json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/study"), help="study folder (everything goes here)")
    ap.add_argument("--steps", type=int, default=180, help="training steps of every variant (docs/study.md: too few to converge)")
    ap.add_argument("--evals", type=int, default=3, help="evaluated checkpoints per variant, evenly spaced")
    ap.add_argument("--samples", type=int, default=40, help="generated images per checkpoint (class-balanced)")
    ap.add_argument("--seed", type=int, default=0, help="training seed (the same for all variants)")
    ap.add_argument("--jobs", type=int, default=2, help="variants run side by side (one per free CPU core; 1 = console output)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    args = ap.parse_args()

    per_class, held_out, semvae_steps = 48, 24, 100  # the demo's data and encode settings
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "study.log"
    env = demo_env()
    py = sys.executable
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    every = max(args.steps // args.evals, 1)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    print("SFD convergence study — stand-ins used: " + "; ".join(STANDINS.values()))

    # Data and cache once, shared by the three variants (re-used if a previous run built them).
    train_dir = make_demo_dataset(out / "data" / "train", per_class=per_class, size=64, seed=0)
    ref_dir = make_demo_dataset(out / "data" / "heldout", per_class=held_out, size=64, seed=1)
    cache = out / "cache"
    timings["encode"] = run("encode", encode_command(train_dir, cache, semvae_steps), log, env)
    ref_npz = out / "heldout_ref.npz"
    t0 = time.perf_counter()
    if not ref_npz.is_file():
        run("ref", [py, "eval/fid.py", "ref", str(ref_dir), "--out", str(ref_npz), "--detector", "random",
                    "--device", "cpu"], log, env)
    timings["ref"] = time.perf_counter() - t0

    # The variants are independent: with --jobs > 1 they run side by side (one thread per core),
    # each logging to <out>/<variant>.log instead of the console.
    echo = args.jobs == 1

    def variant(name: str) -> dict[str, float]:
        timings: dict[str, float] = {}
        log = out / f"{name}.log"
        label, overrides = VARIANTS[name]
        run_dir = out / name
        t0 = time.perf_counter()
        # One process: the study compares variants, not launchers (the demo covers torchrun).
        run(f"train {name}", [
            py, "train/main.py", "--preset", "tiny", "--cache", str(cache), "--out-dir", str(run_dir),
            *[a for o in (*MODEL, *overrides) for a in ("-o", o)],
            "-o", f"seed={args.seed}", "-o", f"max_steps={args.steps}", "-o", f"ckpt_every={every}",
            "-o", f"keep_last={args.evals + 1}", "-o", f"log_every={max(args.steps // 60, 1)}", "-o", "sample_every=0",
        ], log, env, echo)
        timings[f"train {name}"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        eval_log = run_dir / "eval.jsonl"
        done = evaluated_steps(eval_log)
        for step, ckpt in list_checkpoints(run_dir):
            if step in done or step % every:
                continue
            samples, result = run_dir / "samples" / ckpt.name, run_dir / "samples" / f"{ckpt.name}.json"
            run(f"gen {name} step {step}", [
                py, "eval/fid.py", "gen", "--ckpt", str(ckpt), "--stats", str(cache), "--out", str(samples),
                "--num-samples", str(args.samples), "--num-classes", str(len(CLASSES)), "--sampler", "heun",
                "--steps", "25", "--seed", "0", "--batch-size", "50", "--device", "cpu",
            ], log, env, echo)
            run(f"calc {name} step {step}", [
                py, "eval/fid.py", "calc", str(samples), "--ref", str(ref_npz), "--detector", "random",
                "--out", str(result), "--device", "cpu",
            ], log, env, echo)
            metrics = json.loads(result.read_text())["metrics"]
            line = {"step": step, METRIC: metrics[METRIC], "num_samples": args.samples, "variant": name,
                    "label": label, "ckpt": str(ckpt)}
            with open(eval_log, "a") as f:
                f.write(json.dumps(line) + "\n")
            print(f"   {name} step {step}: {METRIC} = {metrics[METRIC]:.3f}", flush=True)
        timings[f"eval {name}"] = time.perf_counter() - t0

        return timings

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for done_timings in pool.map(variant, variants):
            timings.update(done_timings)

    plots = out / "plots"
    run("plot", [
        py, "eval/plot.py", *[str(out / v) for v in variants],
        "--labels", ",".join(VARIANTS[v][0] for v in variants), "--out", str(plots),
    ], log, env)

    table: dict[str, dict[int, float]] = {}
    for v in variants:
        rows = [json.loads(x) for x in (out / v / "eval.jsonl").read_text().splitlines() if x.strip()]
        table[v] = {r["step"]: r[METRIC] for r in rows}
    total = time.perf_counter() - t_start
    summary = {
        "study": str(out), "metric": METRIC, "steps": args.steps, "samples_per_checkpoint": args.samples,
        "seed": args.seed, "table": table, "plot": str(plots / "metrics.png"), "losses": str(plots / "losses.png"),
        "total_seconds": round(total, 1), "stage_seconds": {k: round(s, 1) for k, s in timings.items()},
        "stand_ins": STANDINS,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    steps = sorted({s for t in table.values() for s in t})
    print("\n" + "=" * 78)
    print(f"{METRIC} (random-init Inception features, NOT FID; lower = closer to held-out images)")
    print(f"{'step':>8} " + " ".join(f"{VARIANTS[v][0]:>22}" for v in variants))
    for s in steps:
        print(f"{s:>8} " + " ".join(f"{table[v].get(s, float('nan')):>22.3f}" for v in variants))
    print(f"plot {plots / 'metrics.png'}; losses {plots / 'losses.png'}; summary {out / 'summary.json'}")
    print(f"study finished in {total / 60:.1f} min ({', '.join(f'{k} {s:.0f}s' for k, s in timings.items())})")
    print("=" * 78)


if __name__ == "__main__":
    main()
