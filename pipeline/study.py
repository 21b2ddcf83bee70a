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

Presets, all in one folder (a run another preset already made is reused, not retrained):
``full`` (the default) is the comparison a reviewer asks for first — SFD (Δt = 0.3) against the
synchronous model (Δt = 0) and the no-semantic model, 3 seeds, 52 min on 2 idle cores (timed)
(``--jobs 2``: two runs side by side, one thread each; each run ≈ 9 min of training and
judging); ``sweep`` adds Δt = 0.1, 0.5 and 1.0 (the paper's U-shape; ≈ 40 min more);
``schedules`` adds the smooth ``power`` and the ``learned`` schedule (≈ 27 min more); ``tiny``
checks the plumbing. docs/study.md has the arithmetic. Everything resumes: run the same command
again after an interruption.

Settings: StudyConfig below (``-o key=value`` for any field, ``--dry-run`` prints them resolved).

Example:
    python pipeline/study.py --out runs/study                       # SFD vs Δt = 0 vs no-semantic
    python pipeline/study.py --out runs/study --preset sweep        # + the Δt sweep (reuses runs)
    python pipeline/study.py --out runs/study --preset schedules    # + learned/power vs offset (reuses runs)
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
from demo import (  # noqa: E402
    NO_SEMANTIC,
    NUM_CLASSES,
    QUICK,
    SAMPLER,
    SEMANTIC,
    STANDINS,
    TINY_MODEL,
    Sizes,
    demo_env,
    prepare,
    run,
)

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
        "use_semantic=false", *NO_SEMANTIC, "delta_t=0", "model.semfirst_delta_t=0",
    ]),
}


# The first question (preset ``full``): SFD at the paper's Δt against its two baselines. The Δt
# sweep (preset ``sweep``) adds the rest of the Δt grid; the schedule study (preset ``schedules``)
# puts the smooth and the learned schedule beside the offset they start from. Run in the same
# folder, each reuses the runs the others made (same seeds, same settings).
DEFAULT_VARIANTS = ["dt0", "dt0.3", "no-semantic"]
SWEEP_VARIANTS = [v for v in VARIANTS if not v.startswith(("power", "learned"))]
SCHEDULE_VARIANTS = ["dt0", "dt0.3", "no-semantic", "power0.3", "learned0.3"]


@dataclass(frozen=True)
class StudyConfig:
    """The study's settings (presets: full, sweep, schedules, tiny)."""

    out: str = "runs/study"  # study folder (everything goes here)
    steps: int = 800  # training steps of every run (equal for all variants)
    evals: int = 4  # evaluated checkpoints per run, evenly spaced (unguided, test split)
    samples: int = 120  # class-balanced samples per evaluation (validation and test alike)
    seeds: int = 3  # training seeds per variant (0..N-1)
    jobs: int = 2  # runs side by side (one per free CPU core)
    variants: str = ",".join(DEFAULT_VARIANTS)  # comma-separated subset of the VARIANTS above
    # Classifier-free guidance scales tried at each run's last checkpoint on the *validation*
    # split; each variant is then reported on the test split at the scale with its lowest mean
    # validation FD_judge over seeds (the same grid, so the same tuning budget, for every variant).
    # With 2 / 3 / 4.5 every variant chose 4.5, the grid's edge, its validation score still
    # falling (docs/study.md): the grid reaches past it.
    guidance_scales: str = "3,4.5,6,8"
    grid_per_class: int = 4  # guided samples per class in the side-by-side grid (seed 0 of each variant)
    kernels: str = "compile"  # the training step (compile: ~2x eager on a CPU; eager for runs of a few steps)
    tiny: bool = False  # the demo's --quick data sizes (tests)
    report_only: bool = False  # rebuild the table, plot and summary from the runs' eval logs; train nothing

    def __post_init__(self) -> None:
        unknown = [v for v in self.variant_list if v not in VARIANTS]
        if unknown:
            raise ConfigError(f"variants: unknown {unknown}; choose from {','.join(VARIANTS)}")
        if min(self.steps, self.evals, self.samples, self.seeds, self.jobs, self.grid_per_class) < 1:
            raise ConfigError("steps, evals, samples, seeds, jobs and grid_per_class must be >= 1")
        try:
            scales = self.scale_list
        except ValueError:
            raise ConfigError(f"guidance_scales: comma-separated numbers, got {self.guidance_scales!r}") from None
        if not scales or min(scales) <= 1.0:
            raise ConfigError(f"guidance_scales: CFG scales > 1 (1 is no guidance, reported anyway), got {self.guidance_scales!r}")

    @property
    def variant_list(self) -> list[str]:
        return [v for v in self.variants.split(",") if v]

    @property
    def scale_list(self) -> list[float]:
        return [float(w) for w in self.guidance_scales.split(",") if w.strip()]


STUDY_PRESETS = {
    "full": StudyConfig(),
    "sweep": StudyConfig(variants=",".join(SWEEP_VARIANTS)),
    "schedules": StudyConfig(variants=",".join(SCHEDULE_VARIANTS)),
    "tiny": StudyConfig(steps=4, evals=2, samples=12, seeds=1, variants="dt0,dt0.3,no-semantic", tiny=True,
                        guidance_scales="2,4", grid_per_class=1, kernels="eager"),
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


def scale_setting(w: float) -> str:
    return f"cfg{w:g}"


def read_evals(run_dir: Path) -> dict[tuple[str, int], dict[str, float]]:
    """{(setting, step): metrics} of one run's eval log (lines from before settings existed are unguided)."""
    f = run_dir / "eval.jsonl"
    if not f.is_file():
        return {}
    rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    return {(r.get("setting", "unguided"), r["step"]): {k: r[k] for k in METRICS} for r in rows}


def _cell(vals: dict[int, float]) -> dict[str, Any]:
    mu, sd = mean_std(list(vals.values()))
    return {"mean": mu, "std": sd, "min": min(vals.values()), "max": max(vals.values()), "per_seed": vals}


def build_table(out: Path, variants: list[str], seeds: list[int], scales: list[float]) -> dict[str, Any]:
    """From the runs' eval logs:

    - ``unguided``: {variant: {step: {metric: cell}}} on the test split at every evaluated step;
    - ``validation``: {variant: {scale: {metric: cell}}} at the last step, on the validation split;
    - ``choice``: {variant: scale} — the lowest mean validation FD_judge (None until every seed has every scale);
    - ``guided``: {variant: {step: {metric: cell}}} on the test split at the chosen scale (last step);

    where a cell is {"mean", "std", "min", "max", "per_seed": {seed: value}} over seeds.
    """
    logs = {v: {s: read_evals(out / v / f"seed{s}") for s in seeds} for v in variants}

    def cells(v: str, setting: str, steps: set[int] | None = None) -> dict[int, dict[str, Any]]:
        per_seed = logs[v]
        common = set.intersection(*({st for (se, st) in per_seed[s] if se == setting} for s in seeds))
        return {st: {m: _cell({s: per_seed[s][(setting, st)][m] for s in seeds}) for m in METRICS}
                for st in sorted(common) if steps is None or st in steps}

    table: dict[str, Any] = {"unguided": {}, "validation": {}, "choice": {}, "guided": {}}
    for v in variants:
        table["unguided"][v] = cells(v, "unguided")
        val = {}
        for w in scales:
            c = cells(v, scale_setting(w))
            if c:
                val[w] = c[max(c)]
        table["validation"][v] = val
        table["choice"][v] = min(val, key=lambda w: val[w][METRIC_FD]["mean"]) if len(val) == len(scales) else None
        table["guided"][v] = cells(v, "guided")
    return table


def _fmt(m: str) -> str:
    return "{:.3f}" if m == METRIC_ACCURACY else "{:.2f}"


def write_markdown(path: Path, table: dict[str, Any], ceiling: dict[str, float], seeds: list[int]) -> str:
    lines: list[str] = []
    unguided, guided, val, choice = table["unguided"], table["guided"], table["validation"], table["choice"]
    # 1. The result: the last step, test split, unguided and at each variant's own best scale.
    lines.append(f"### Test split, last step: unguided and guided (each variant at its own CFG scale chosen on validation; mean ± std over {len(seeds)} seeds)\n")
    lines.append(f"| variant | CFG scale | {METRIC_FD} unguided | {METRIC_FD} guided | accuracy unguided | accuracy guided |")
    lines.append("|---|---:|---:|---:|---:|---:|")
    for v in unguided:
        row = [VARIANTS[v][0], f"{choice[v]:g}" if choice.get(v) is not None else "–"]
        for m in (METRIC_FD, METRIC_ACCURACY):
            for part in (unguided[v], guided.get(v, {})):
                if part:
                    c = part[max(part)][m]
                    row.append(f"{_fmt(m).format(c['mean'])} ± {_fmt(m).format(c['std'])}")
                else:
                    row.append("–")
        lines.append("| " + " | ".join(row) + " |")
    lines.append(f"| real test images (ceiling) | | {_fmt(METRIC_FD).format(ceiling[METRIC_FD])} | | "
                 f"{_fmt(METRIC_ACCURACY).format(ceiling[METRIC_ACCURACY])} | |")
    lines.append("")
    # 2. Unguided over training steps (test split).
    for m in METRICS:
        steps = sorted({s for t in unguided.values() for s in t})
        lines.append(f"### {m}, unguided, over training (test split; real images: {_fmt(m).format(ceiling[m])})\n")
        lines.append("| variant | " + " | ".join(f"step {s}" for s in steps) + " |")
        lines.append("|---|" + "---:|" * len(steps))
        for v, rows in unguided.items():
            cells = [f"{_fmt(m).format(rows[s][m]['mean'])} ± {_fmt(m).format(rows[s][m]['std'])}" if s in rows else "–" for s in steps]
            lines.append(f"| {VARIANTS[v][0]} | " + " | ".join(cells) + " |")
        lines.append("")
    # 3. Every per-seed number at the last step.
    for name, part in (("unguided", unguided), ("guided", guided)):
        for m in METRICS:
            have = {v: rows[max(rows)] for v, rows in part.items() if rows}
            if not have:
                continue
            lines.append(f"Per seed, last step, {name} ({m}, test split):\n")
            lines.append("| variant | " + " | ".join(f"seed {s}" for s in seeds) + " |")
            lines.append("|---|" + "---:|" * len(seeds))
            for v, row in have.items():
                lines.append(f"| {VARIANTS[v][0]} | " + " | ".join(_fmt(m).format(row[m]["per_seed"][s]) for s in seeds) + " |")
            lines.append("")
    # 4. How the scales were chosen (validation split only).
    if any(val.values()):
        scales = sorted({w for r in val.values() for w in r})
        lines.append(f"### Guidance scale selection: {METRIC_FD} on the validation split, last step (mean over seeds; chosen in bold)\n")
        lines.append("| variant | " + " | ".join(f"w = {w:g}" for w in scales) + " |")
        lines.append("|---|" + "---:|" * len(scales))
        for v, rows in val.items():
            cells = []
            for w in scales:
                if w not in rows:
                    cells.append("–")
                    continue
                txt = f"{rows[w][METRIC_FD]['mean']:.2f} ({rows[w][METRIC_ACCURACY]['mean']:.0%})"
                cells.append(f"**{txt}**" if choice.get(v) == w else txt)
            lines.append(f"| {VARIANTS[v][0]} | " + " | ".join(cells) + " |")
        lines.append("\n(in brackets: class accuracy)\n")
    lines += paired_lines(table, seeds)
    text = "\n".join(lines)
    path.write_text(text)
    return text


# Each baseline and the variants compared with it: every variant against the synchronous and the
# no-semantic run; the smooth and learned schedules also against the offset of the same lead.
COMPARISONS = {"dt0": lambda v: True, "no-semantic": lambda v: True, "dt0.3": lambda v: v.startswith(("power", "learned"))}


def paired(table_part: dict[str, Any], v: str, base: str, step: int, m: str, seeds: list[int]) -> list[float]:
    return [table_part[v][step][m]["per_seed"][s] - table_part[base][step][m]["per_seed"][s] for s in seeds]


def paired_lines(table: dict[str, Any], seeds: list[int]) -> list[str]:
    """Differences against the baselines seed by seed (mean ± std over seeds of the per-seed difference).

    Runs with the same seed share the batch order, the time draws and the sampling noise, so a
    paired difference cancels much of what the spread of each variant contains; its std is the
    yardstick for "real or noise" (with 3 seeds a mean difference within about one std is noise).
    The count "k/n" says in how many seeds the variant was better.
    """
    lines: list[str] = []
    if len(seeds) < 2:
        return lines
    for setting in ("unguided", "guided"):
        part = table[setting]
        for base, compared in COMPARISONS.items():
            if not part.get(base) or not any(compared(v) and part.get(v) for v in part if v != base):
                continue
            steps = sorted(part[base])
            for m in METRICS:
                better = "higher" if m == METRIC_ACCURACY else "lower"
                sign = 1 if m == METRIC_ACCURACY else -1
                lines.append(f"### {m}, {setting}: difference to {VARIANTS[base][0]}, same seed "
                             f"({better} is better; mean ± std over seeds, seeds better)\n")
                lines.append("| variant | " + " | ".join(f"step {s}" for s in steps) + " |")
                lines.append("|---|" + "---:|" * len(steps))
                for v, rows in part.items():
                    if v == base or not compared(v) or not rows:
                        continue
                    cells = []
                    for st in steps:
                        if st not in rows:
                            cells.append("–")
                            continue
                        d = paired(part, v, base, st, m, seeds)
                        mu, sd = mean_std(d)
                        wins = sum(1 for x in d if sign * x > 0)
                        cells.append(f"{'{:+.3f}' if m == METRIC_ACCURACY else '{:+.2f}'}".format(mu) + f" ± {abs(sd):.3g} ({wins}/{len(d)})")
                    lines.append(f"| {VARIANTS[v][0]} | " + " | ".join(cells) + " |")
                lines.append("")
    return lines


def verdicts(table: dict[str, Any], seeds: list[int]) -> list[str]:
    """One plain sentence per (setting, comparison) at the last step, on FD_judge: 'better' only when
    every seed agrees and the mean paired difference exceeds its std; otherwise 'no clear difference'."""
    out = []
    for setting in ("unguided", "guided"):
        part = table[setting]
        for base, compared in COMPARISONS.items():
            for v in part:
                if v == base or not compared(v) or not part.get(v) or not part.get(base) or len(seeds) < 2:
                    continue
                step = max(set(part[v]) & set(part[base]), default=None)
                if step is None:
                    continue
                d = paired(part, v, base, step, METRIC_FD, seeds)
                mu, sd = mean_std(d)
                if all(x < 0 for x in d) and -mu > sd:
                    word = "better"
                elif all(x > 0 for x in d) and mu > sd:
                    word = "worse"
                else:
                    word = "no clear difference"
                out.append(f"{setting}, step {step}: {VARIANTS[v][0]} vs {VARIANTS[base][0]}: {word} "
                           f"({METRIC_FD} paired difference {mu:+.2f} ± {sd:.2f}, per seed {', '.join(f'{x:+.2f}' for x in d)})")
    return out


def plot(path: Path, table: dict[str, Any], ceiling: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, m, title in ((axes[0], METRIC_ACCURACY, "judge class accuracy of samples (higher is better)"),
                         (axes[1], METRIC_FD, "FD_judge to real test images (lower is better; not FID)")):
        for v, rows in table["unguided"].items():
            steps = sorted(rows)
            if not steps:
                continue
            mu = [rows[s][m]["mean"] for s in steps]
            (line,) = ax.plot(steps, mu, marker="o", label=VARIANTS[v][0])
            ax.fill_between(steps, [rows[s][m]["min"] for s in steps], [rows[s][m]["max"] for s in steps], alpha=0.15)
            g = table["guided"].get(v)
            if g:  # the guided result at the last step: a star in the same colour
                st = max(g)
                ax.errorbar([st], [g[st][m]["mean"]], yerr=[[g[st][m]["mean"] - g[st][m]["min"]], [g[st][m]["max"] - g[st][m]["mean"]]],
                            marker="*", ms=11, color=line.get_color(), capsize=3)
        ax.axhline(ceiling[m], color="k", ls="--", lw=1, label="real test images")
        ax.set_xlabel("training step")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle("Δt study: lines unguided (mean, band min–max over seeds); stars guided at each variant's "
                 "validation-chosen CFG scale", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tile_grids(grids: dict[str, Path], out: Path) -> None:
    """The variants' guided sample grids side by side, each under its name (one PNG)."""
    from PIL import Image, ImageDraw

    ims = {v: Image.open(p).convert("RGB") for v, p in grids.items()}
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    # PIL's default bitmap font has no Greek letters: the names are written in ASCII.
    names = {v: VARIANTS[v][0].replace("Δt", "dt").replace("≤", "<=") for v in ims}
    widths = {v: max(im.width, int(probe.textlength(names[v])) + 4) for v, im in ims.items()}
    head, gap = 16, 8
    canvas = Image.new("RGB", (sum(widths.values()) + gap * (len(ims) - 1), max(im.height for im in ims.values()) + head), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for v, im in ims.items():
        draw.text((x + 2, 2), names[v], fill="black")
        canvas.paste(im, (x, head))
        x += widths[v] + gap
    tmp = out.with_suffix(".tmp.png")
    canvas.save(tmp)
    tmp.replace(out)


def run_variants(args: StudyConfig, out: Path, variants: list[str], seeds: list[int], log: Path,
                 env: dict[str, str], timings: dict[str, float]) -> dict[str, float]:
    """Build the shared inputs, train and evaluate every (variant, seed); returns the real-image ceiling.

    Three rounds: (1) every run trains, is judged unguided at each evaluated step on the test split
    and at each guidance scale at its last step on the validation split; (2) each variant's scale is
    chosen on validation (lowest mean FD_judge over seeds) and its runs are judged at that scale on
    the test split; (3) seed 0 of each variant draws a guided grid, tiled side by side.
    """
    py = sys.executable
    every = max(args.steps // args.evals, 1)
    ceiling_file = out / "ceiling.json"
    # Shared inputs, built once (the demo's data, judge, semantic ViT, autoencoder and cache).
    # tiny (tests): the plumbing only, so the shared networks train a few steps each.
    tiny = replace(QUICK, judge_steps=40, vit_steps=40, ae_steps=40, semvae_steps=20)  # one-cycle lr needs a few dozen
    sizes = replace(tiny if args.tiny else Sizes(), ceiling=max(args.samples // NUM_CLASSES, 1))
    inputs = prepare(out, sizes, log, env, timings)
    cache, judge, test_ref, val_ref = inputs["cache"], inputs["judge"], inputs["test"], inputs["val"]
    vae_flag = ["--vae", str(inputs["vae"])]  # the cache's texture autoencoder decodes every sample
    run("ceiling", [py, "pipeline/demo_models.py", "score", "--judge", str(judge), "--ref", str(test_ref),
                    str(inputs["ceiling"]), "--out", str(ceiling_file)], log, env)
    ceiling = next(iter(json.loads(ceiling_file.read_text()).values()))

    echo = args.jobs == 1

    def evaluate(name: str, seed: int, run_log: Path, settings: dict[str, list[str]], ref: Path, ref_name: str,
                 last: bool) -> None:
        """Judge run (name, seed) in one process: every setting (name → sampling flags) at every
        evaluated step (or the last only) against the real images of split ``ref``."""
        plan = [a for setting, flags in settings.items() for a in ("--setting", setting, "--flags", " ".join([*SAMPLER, *flags, *vae_flag]))]
        run(f"evaluate {name} seed {seed} {','.join(settings)}", [
            py, "pipeline/demo_models.py", "evaluate", "--run", str(out / name / f"seed{seed}"), "--cache", str(cache),
            "--judge", str(judge), "--ref", str(ref), "--ref-name", ref_name, "--samples", str(args.samples),
            "--every", str(every), *plan, *(["--last"] if last else []),
        ], run_log, env, echo)

    def train_and_validate(job: tuple[str, int]) -> dict[str, float]:
        name, seed = job
        _, overrides = VARIANTS[name]
        run_dir = out / name / f"seed{seed}"
        run_log = out / f"{name}-seed{seed}.log"
        t0 = time.perf_counter()
        # One process per run: the study compares variants, not launchers (the demo covers torchrun).
        run(f"train {name} seed {seed}", [
            py, "train/main.py", "--preset", "tiny", "--cache", str(cache), "--out-dir", str(run_dir),
            *[a for o in (*TINY_MODEL, *overrides) for a in ("-o", o)],
            "-o", f"kernels={args.kernels}", "-o", f"seed={seed}", "-o", f"max_steps={args.steps}", "-o", f"ckpt_every={every}",
            "-o", f"keep_last={args.evals + 1}", "-o", f"log_every={max(args.steps // 40, 1)}", "-o", "sample_every=0",
        ], run_log, env, echo)
        t1 = time.perf_counter()
        evaluate(name, seed, run_log, {"unguided": []}, test_ref, "test", last=False)
        t2 = time.perf_counter()
        evaluate(name, seed, run_log, {scale_setting(w): ["-o", f"cfg_scale={w:g}"] for w in args.scale_list},
                 val_ref, "val", last=True)
        return {f"train {name} seed {seed}": t1 - t0, f"evaluate {name} seed {seed}": t2 - t1,
                f"validate {name} seed {seed}": time.perf_counter() - t2}

    jobs = [(v, s) for s in seeds for v in variants]  # seed-major: an interrupted study has whole seeds
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for t in pool.map(train_and_validate, jobs):
            timings.update(t)

    choice = build_table(out, variants, seeds, args.scale_list)["choice"]

    def test_guided(job: tuple[str, int]) -> dict[str, float]:
        name, seed = job
        t0 = time.perf_counter()
        evaluate(name, seed, out / f"{name}-seed{seed}.log", {"guided": ["-o", f"cfg_scale={choice[name]:g}"]},
                 test_ref, "test", last=True)
        return {f"test guided {name} seed {seed}": time.perf_counter() - t0}

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for t in pool.map(test_guided, jobs):
            timings.update(t)

    # Seed 0 of each variant, guided at its chosen scale, the same noise for every variant.
    t0 = time.perf_counter()
    grids = {}
    for name in variants:
        png = out / "grids" / f"{name}.png"
        png.parent.mkdir(exist_ok=True)
        if not png.is_file():
            run(f"grid {name}", [
                py, "sample/grid.py", "--ckpt", str(out / name / "seed0"), "--stats", str(cache), *vae_flag,
                "--classes", ",".join(str(i) for i in range(NUM_CLASSES)), "--per-class", str(args.grid_per_class),
                *SAMPLER, "-o", f"cfg_scale={choice[name]:g}", "--out", str(png), "-o", "device=cpu",
            ], log, env, echo=False)
        grids[name] = png
    tile_grids(grids, out / "grids.png")
    timings["grids"] = time.perf_counter() - t0
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

    table = build_table(out, variants, seeds, args.scale_list)
    plot(out / "study.png", table, ceiling)
    md = write_markdown(out / "study_table.md", table, ceiling, seeds)
    verdict = verdicts(table, seeds)
    total = time.perf_counter() - t_start
    summary = {
        "study": str(out), "steps": args.steps, "evals": args.evals, "samples_per_evaluation": args.samples,
        "seeds": seeds, "variants": {v: VARIANTS[v][0] for v in variants},
        "sampling": " ".join(SAMPLER), "guidance_scales_tried_on_validation": args.scale_list,
        "chosen_guidance_scale": table["choice"], "ceiling_real_test": {m: ceiling[m] for m in METRICS},
        "splits": "networks trained on 'train'; guidance scales chosen on 'val'; every reported number on 'test'",
        "table": table, "verdicts": verdict,
        "plot": str(out / "study.png"), "table_md": str(out / "study_table.md"), "grids_png": str(out / "grids.png"),
        "wall_seconds": previous.get("wall_seconds") if args.report_only else round(total, 1),
        "stage_seconds": {k: round(s, 1) for k, s in timings.items()},
        "stand_ins": STANDINS,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n" + "=" * 78)
    print(md)
    print("Verdicts (FD_judge, last step, paired over seeds):")
    for line in verdict:
        print("  " + line)
    print(f"plot {out / 'study.png'}; table {out / 'study_table.md'}; grids {out / 'grids.png'}; summary {out / 'summary.json'}")
    if not args.report_only:
        print(f"study finished in {total / 60:.1f} min wall")
    print("=" * 78)
    return 0


if __name__ == "__main__":
    run_cli(main)  # a user error (bad setting, failed stage): one `error:` line, exit status 2
