"""The Δt study on the demo domain: does semantic-first help, and is a moderate offset best?

The paper's Δt ablation (docs/method.md §4.3, §9.3: Δt = 0 → FID 5.24, 0.3 → 3.03, 1.0 → 5.41)
in miniature. The demo's model (pipeline/demo.py: same data, judge, trained semantic ViT, cache,
model, batch, lr) is trained in these variants, at equal steps and equal compute (the composite
latent costs the same for every Δt; the no-semantic model has 4 input channels fewer):

- ``dt0``, ``dt0.1``, ``dt0.3``, ``dt0.5``, ``dt1.0``: the composite latent [texture | semantic],
  semantic part leading by Δt (Δt = 0: one clock for both, the synchronous baseline);
- ``no-semantic``: the texture channels only (LightningDiT + REPA; REPA targets are still the
  trained ViT's tokens, as in the paper's "+REPA" rows).

each with ``--seeds`` training seeds. Every run checkpoints at ``--evals`` evenly spaced steps;
each checkpoint's EMA weights draw ``--samples`` class-balanced samples *without guidance* (the
paper's ablation is unguided), which the judge scores: class accuracy and ``FD_judge`` against
held-out real images (not FID). The table gives mean ± sample std over seeds per variant and
step, and every per-seed number; the plot draws the mean with a min–max band over seeds.

Budget: the defaults are sized to ≈ 60 min on 2 idle cores (``--jobs 2``: two runs side by
side, one thread each); docs/study.md has the arithmetic. Everything resumes: run the same
command again after an interruption.

Settings: StudyConfig below (presets ``full`` and ``tiny``; ``-o key=value`` for any field,
``--dry-run`` prints them resolved).

Example:
    python pipeline/study.py --out runs/study                       # the real study
    python pipeline/study.py --out runs/study-tiny --preset tiny     # plumbing check (4 steps, 1 seed)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "pipeline"))  # demo.py sits beside this file (pipeline/ is no package)
from demo import QUICK, SEMANTIC, STANDINS, TINY_MODEL, Sizes, demo_env, prepare, run  # noqa: E402

from sfd.cli import Arg, config_parser, parse_config, print_config, run_cli  # noqa: E402
from sfd.config import ConfigError  # noqa: E402
from sfd.demo.judge import METRIC_ACCURACY, METRIC_FD  # noqa: E402

METRICS = (METRIC_ACCURACY, METRIC_FD)


def _dt(dt: float) -> list[str]:
    return [*SEMANTIC, f"delta_t={dt}", f"model.semfirst_delta_t={dt}"]


VARIANTS: dict[str, tuple[str, list[str]]] = {
    "dt0": ("Δt=0 (synchronous)", _dt(0.0)),
    "dt0.1": ("Δt=0.1", _dt(0.1)),
    "dt0.3": ("Δt=0.3 (paper default)", _dt(0.3)),
    "dt0.5": ("Δt=0.5", _dt(0.5)),
    "dt1.0": ("Δt=1.0 (sequential)", _dt(1.0)),
    # Optional (issue 15 item 6): the smooth "power" member of the schedule family, its largest
    # lead 0.3, against the fixed offset Δt = 0.3 (sfd/diffusion.py schedule_times).
    "power0.3": ("power schedule, lead ≤ 0.3 (ours)", [*_dt(0.3), "schedule=power"]),
    # Issue 22 item 3: the learned schedule (docs/decisions.md), starting on the Δt = 0.3 path; an
    # 8 × 8 search grid, the path moved every 50 steps over the first half, then frozen.
    "learned0.3": ("learned schedule from Δt=0.3 (ours)", [
        *_dt(0.3), "schedule=learned", "schedule_grid=8", "schedule_update_every=50", "schedule_decay=0.98",
        "schedule_learn_until=400",
    ]),
    "no-semantic": ("no semantic channels", [
        "use_semantic=false", "model.in_channels=48", "model.semantic_chans=0", "delta_t=0", "model.semfirst_delta_t=0",
    ]),
}


# The design: the Δt grid and the no-semantic baseline (add power0.3 with --variants).
DEFAULT_VARIANTS = [v for v in VARIANTS if not v.startswith("power")]


@dataclass(frozen=True)
class StudyConfig:
    """The study's settings (presets: full, tiny)."""

    out: str = "runs/study"  # study folder (everything goes here)
    steps: int = 800  # training steps of every run (equal for all variants)
    evals: int = 4  # evaluated checkpoints per run, evenly spaced
    samples: int = 120  # unguided class-balanced samples per checkpoint
    seeds: int = 3  # training seeds per variant (0..N-1)
    jobs: int = 2  # runs side by side (one per free CPU core)
    variants: str = ",".join(DEFAULT_VARIANTS)  # comma-separated subset of the VARIANTS above
    tiny: bool = False  # the demo's --quick data sizes (tests)
    report_only: bool = False  # rebuild the table, plot and summary from the runs' eval logs; train nothing

    def __post_init__(self) -> None:
        unknown = [v for v in self.variant_list if v not in VARIANTS]
        if unknown:
            raise ConfigError(f"variants: unknown {unknown}; choose from {','.join(VARIANTS)}")
        if min(self.steps, self.evals, self.samples, self.seeds, self.jobs) < 1:
            raise ConfigError("steps, evals, samples, seeds and jobs must be >= 1")

    @property
    def variant_list(self) -> list[str]:
        return [v for v in self.variants.split(",") if v]


STUDY_PRESETS = {
    "full": StudyConfig(),
    "tiny": StudyConfig(steps=4, evals=2, samples=12, seeds=1, variants="dt0,dt0.3,no-semantic", tiny=True),
}


def build_parser() -> argparse.ArgumentParser:
    return config_parser(
        StudyConfig, prog="pipeline/study.py", description=__doc__, presets=STUDY_PRESETS, default_preset="full",
        args=(Arg("--out", metavar="PATH"), Arg("--variants"), Arg("--seeds"), Arg("--report-only")),
        deprecated={"--steps": "steps", "--evals": "evals", "--samples": "samples", "--jobs": "jobs",
                    "--tiny": "tiny=true"},
    )


def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")
    return m, s


def read_evals(run_dir: Path) -> dict[int, dict[str, float]]:
    f = run_dir / "eval.jsonl"
    if not f.is_file():
        return {}
    rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    return {r["step"]: {k: r[k] for k in METRICS} for r in rows}


def build_table(out: Path, variants: list[str], seeds: list[int]) -> dict[str, Any]:
    """{variant: {step: {metric: {"mean", "std", "per_seed": {seed: value}}}}} from the eval logs."""
    table: dict[str, Any] = {}
    for v in variants:
        per_seed = {s: read_evals(out / v / f"seed{s}") for s in seeds}
        steps = sorted(set.intersection(*(set(e) for e in per_seed.values()))) if per_seed else []
        table[v] = {}
        for step in steps:
            row = {}
            for m in METRICS:
                vals = {s: per_seed[s][step][m] for s in seeds}
                mu, sd = mean_std(list(vals.values()))
                row[m] = {"mean": mu, "std": sd, "min": min(vals.values()), "max": max(vals.values()), "per_seed": vals}
            table[v][step] = row
    return table


def write_markdown(path: Path, table: dict[str, Any], ceiling: dict[str, float], seeds: list[int]) -> str:
    lines = []
    for m, fmt in ((METRIC_ACCURACY, "{:.3f}"), (METRIC_FD, "{:.2f}")):
        steps = sorted({s for t in table.values() for s in t})
        lines.append(f"### {m} (mean ± std over {len(seeds)} seeds; real held-out images: {fmt.format(ceiling[m])})\n")
        lines.append("| variant | " + " | ".join(f"step {s}" for s in steps) + " |")
        lines.append("|---|" + "---:|" * len(steps))
        for v, rows in table.items():
            cells = [f"{fmt.format(rows[s][m]['mean'])} ± {fmt.format(rows[s][m]['std'])}" if s in rows else "–" for s in steps]
            lines.append(f"| {VARIANTS[v][0]} | " + " | ".join(cells) + " |")
        lines.append("")
        last = max(steps) if steps else None
        if last is not None:
            lines.append(f"Per seed at step {last} ({m}):\n")
            lines.append("| variant | " + " | ".join(f"seed {s}" for s in seeds) + " |")
            lines.append("|---|" + "---:|" * len(seeds))
            for v, rows in table.items():
                if last in rows:
                    lines.append(f"| {VARIANTS[v][0]} | " + " | ".join(fmt.format(rows[last][m]["per_seed"][s]) for s in seeds) + " |")
            lines.append("")
    lines += paired_lines(table, seeds)
    text = "\n".join(lines)
    path.write_text(text)
    return text


def paired_lines(table: dict[str, Any], seeds: list[int]) -> list[str]:
    """Differences against the baselines seed by seed (mean ± std over seeds of the per-seed difference).

    Runs with the same seed share the batch order, the time draws and the sampling noise, so a
    paired difference cancels much of what the spread of each variant contains; its std is the
    yardstick for "real or noise" (a mean difference within about one std is noise with 3 seeds).
    """
    lines: list[str] = []
    # Each baseline and the variants compared with it: every variant against the synchronous and the
    # no-semantic run; the smooth schedules also against the offset of the same Δt.
    comparisons = {"dt0": lambda v: True, "no-semantic": lambda v: True, "dt0.3": lambda v: v.startswith("power")}
    for base, compared in comparisons.items():
        if base not in table or len(seeds) < 2 or not any(compared(v) for v in table if v != base):
            continue
        steps = sorted(table[base])
        for m, fmt in ((METRIC_ACCURACY, "{:+.3f}"), (METRIC_FD, "{:+.2f}")):
            better = "higher" if m == METRIC_ACCURACY else "lower"
            lines.append(f"### {m}: difference to {VARIANTS[base][0]}, same seed ({better} is better; mean ± std over seeds)\n")
            lines.append("| variant | " + " | ".join(f"step {s}" for s in steps) + " |")
            lines.append("|---|" + "---:|" * len(steps))
            for v, rows in table.items():
                if v == base or not compared(v):
                    continue
                cells = []
                for st in steps:
                    if st not in rows:
                        cells.append("–")
                        continue
                    d = [rows[st][m]["per_seed"][sd] - table[base][st][m]["per_seed"][sd] for sd in seeds]
                    mu, sd_ = mean_std(d)
                    cells.append(f"{fmt.format(mu)} ± {abs(sd_):.3g}")
                lines.append(f"| {VARIANTS[v][0]} | " + " | ".join(cells) + " |")
            lines.append("")
    return lines


def plot(path: Path, table: dict[str, Any], ceiling: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, m, title in ((axes[0], METRIC_ACCURACY, "judge class accuracy of samples (higher is better)"),
                         (axes[1], METRIC_FD, "FD_judge to held-out images (lower is better; not FID)")):
        for v, rows in table.items():
            steps = sorted(rows)
            if not steps:
                continue
            mu = [rows[s][m]["mean"] for s in steps]
            ax.plot(steps, mu, marker="o", label=VARIANTS[v][0])
            ax.fill_between(steps, [rows[s][m]["min"] for s in steps], [rows[s][m]["max"] for s in steps], alpha=0.15)
        ax.axhline(ceiling[m], color="k", ls="--", lw=1, label="real held-out images")
        ax.set_xlabel("training step")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle("Δt study on the demo domain: mean over seeds, band = min–max over seeds, no guidance", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_variants(args: StudyConfig, out: Path, variants: list[str], seeds: list[int], log: Path,
                 env: dict[str, str], timings: dict[str, float]) -> dict[str, float]:
    """Build the shared inputs, train and evaluate every (variant, seed); returns the real-image ceiling."""
    py = sys.executable
    every = max(args.steps // args.evals, 1)
    ceiling_file = out / "ceiling.json"
    # Shared inputs, built once (the demo's data, judge, semantic ViT and cache).
    sizes = replace(QUICK if args.tiny else Sizes(), ceiling=max(args.samples // 6, 1))
    inputs = prepare(out, sizes, log, env, timings)
    cache, judge, ref = inputs["cache"], inputs["judge"], inputs["heldout"]
    run("ceiling", [py, "pipeline/demo_models.py", "score", "--judge", str(judge), "--ref", str(ref),
                    str(inputs["ceiling"]), "--out", str(ceiling_file)], log, env)
    ceiling = next(iter(json.loads(ceiling_file.read_text()).values()))

    echo = args.jobs == 1

    def one(job: tuple[str, int]) -> dict[str, float]:
        name, seed = job
        label, overrides = VARIANTS[name]
        run_dir = out / name / f"seed{seed}"
        run_log = out / f"{name}-seed{seed}.log"
        t0 = time.perf_counter()
        # One process per run: the study compares variants, not launchers (the demo covers torchrun).
        run(f"train {name} seed {seed}", [
            py, "train/main.py", "--preset", "tiny", "--cache", str(cache), "--out-dir", str(run_dir),
            *[a for o in (*TINY_MODEL, *overrides) for a in ("-o", o)],
            "-o", f"seed={seed}", "-o", f"max_steps={args.steps}", "-o", f"ckpt_every={every}",
            "-o", f"keep_last={args.evals + 1}", "-o", f"log_every={max(args.steps // 40, 1)}", "-o", "sample_every=0",
        ], run_log, env, echo)
        t1 = time.perf_counter()
        run(f"evaluate {name} seed {seed}", [
            py, "pipeline/demo_models.py", "evaluate", "--run", str(run_dir), "--cache", str(cache),
            "--judge", str(judge), "--ref", str(ref), "--samples", str(args.samples), "--every", str(every),
        ], run_log, env, echo)
        return {f"train {name} seed {seed}": t1 - t0, f"evaluate {name} seed {seed}": time.perf_counter() - t1}

    jobs = [(v, s) for s in seeds for v in variants]  # seed-major: an interrupted study has whole seeds
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for t in pool.map(one, jobs):
            timings.update(t)

    return ceiling


def main(argv: Sequence[str] | None = None) -> int:
    args, ns = parse_config(build_parser(), argv)
    if ns.dry_run:
        return print_config(args)
    variants = args.variant_list
    seeds = list(range(args.seeds))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "study.log"
    env = demo_env()
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    print("SFD Δt study — stand-ins: " + "; ".join(STANDINS.values()))

    previous: dict[str, Any] = {}
    if args.report_only:
        ceiling_file, summary_file = out / "ceiling.json", out / "summary.json"
        if not ceiling_file.is_file():
            raise ConfigError(f"{out} holds no study (no ceiling.json); run it without --report-only first")
        ceiling = next(iter(json.loads(ceiling_file.read_text()).values()))
        previous = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
        timings = previous.get("stage_seconds", {})
    else:
        ceiling = run_variants(args, out, variants, seeds, log, env, timings)

    table = build_table(out, variants, seeds)
    plot(out / "study.png", table, ceiling)
    md = write_markdown(out / "study_table.md", table, ceiling, seeds)
    total = time.perf_counter() - t_start
    summary = {
        "study": str(out), "steps": args.steps, "evals": args.evals, "samples_per_checkpoint": args.samples,
        "seeds": seeds, "variants": {v: VARIANTS[v][0] for v in variants}, "sampling": "heun 16 steps, no guidance",
        "ceiling_real_heldout": {m: ceiling[m] for m in METRICS}, "table": table,
        "plot": str(out / "study.png"), "table_md": str(out / "study_table.md"),
        "wall_seconds": previous.get("wall_seconds") if args.report_only else round(total, 1),
        "stage_seconds": {k: round(s, 1) for k, s in timings.items()},
        "stand_ins": STANDINS,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n" + "=" * 78)
    print(md)
    print(f"plot {out / 'study.png'}; table {out / 'study_table.md'}; summary {out / 'summary.json'}")
    if not args.report_only:
        print(f"study finished in {total / 60:.1f} min wall")
    print("=" * 78)
    return 0


if __name__ == "__main__":
    run_cli(main)  # a user error (bad setting, failed stage): one `error:` line, exit status 2
