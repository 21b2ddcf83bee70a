"""Plots from a training run's JSONL logs: loss curves (total and per term) and metrics vs step.

Reads ``<run>/metrics.jsonl`` (written by train/main.py: one ``"event": "train"`` line per log
interval) and, if present, ``<run>/eval.jsonl`` (one line per evaluated checkpoint with a
``step`` and numeric metric fields, as written by the demo and the convergence study). Writes
``<run>/plots/losses.png`` and ``<run>/plots/metrics.png``, and for runs of the learned schedule
``schedule.png``: the path t_sem against t_tex stored in each checkpoint's model config.

Examples:
    python eval/plot.py runs/demo/train
    python eval/plot.py runs/study/dt0.3 runs/study/dt0 --labels "Δt=0.3,Δt=0" --out runs/study/plots
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters or CI
import matplotlib.pyplot as plt  # noqa: E402

from sfd.cli import Parser, run_cli  # noqa: E402

LOSS_TERMS = ("total", "mse", "cos", "repa")
# Training signals beside the losses: (field, panel title, y-axis label, log scale?)
TRAIN_PANELS = (
    ("lr", "learning rate", "learning rate", False),
    ("grad_norm", "gradient norm (before clipping)", "‖g‖₂", True),
)
LOSS_YLABEL = {
    "total": "total loss",
    "mse": "velocity MSE (β-weighted)",
    "cos": "1 − cos(v̂, v)",
    "repa": "REPA term (unweighted)",
}
NOT_METRICS = {"step", "event", "images", "nfe", "seconds", "num_samples"}


def read_jsonl(path: Path, event: str | None = None) -> list[dict]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if event is None or r.get("event", event) == event]


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def plot_losses(runs: list[Path], labels: list[str], out: Path) -> Path | None:
    """One panel per loss term, then learning rate and gradient norm, one line per run; None when no
    run has training logs."""
    logs = [read_jsonl(run / "metrics.jsonl", "train") for run in runs]
    terms = [t for t in LOSS_TERMS if any(_finite(r.get(t)) and r.get(t) != 0 for rows in logs for r in rows)]
    if not terms:
        return None
    panels = [(t, f"loss: {t}", LOSS_YLABEL[t], False) for t in terms]
    panels += [p for p in TRAIN_PANELS if any(_finite(r.get(p[0])) for rows in logs for r in rows)]
    cols = min(3, len(panels))
    rows_ = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(4.6 * cols, 3.4 * rows_), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (field, title, ylabel, log) in zip(axes.flat, panels):
        for rows, label in zip(logs, labels):
            pts = [(r["step"], r[field]) for r in rows if _finite(r.get(field))]
            if pts:
                ax.plot(*zip(*pts), label=label, linewidth=1.2)
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    if len(runs) > 1:
        axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "losses.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_metrics(runs: list[Path], labels: list[str], out: Path) -> Path | None:
    """Every numeric field of ``eval.jsonl`` and of the trainer's own ``"event": "eval"`` lines in
    ``metrics.jsonl`` (``-o eval_every``) vs step, one panel per metric; None when absent."""
    # One series per source: the trainer's own evaluations, and each (setting, reference split) of
    # eval.jsonl (the study's unguided curve, a guidance candidate judged once on validation, ...),
    # so points measured under different settings are never joined into one curve.
    series: list[tuple[str, list[dict]]] = []
    for run, label in zip(runs, labels):
        during = read_jsonl(run / "metrics.jsonl", "eval")
        if during:
            series.append((f"{label} (during training)" if len(runs) > 1 else "during training", during))
        groups: dict[str, list[dict]] = {}
        for r in read_jsonl(run / "eval.jsonl"):
            key = str(r.get("setting", "unguided")) + (f", {r['ref']}" if r.get("ref") else "")
            groups.setdefault(key, []).append(r)
        series += [(f"{label} {k}" if len(runs) > 1 else k, rows) for k, rows in groups.items()]
    names = sorted({k for _, rows in series for r in rows for k, v in r.items() if k not in NOT_METRICS and _finite(v)})
    if not names:
        return None
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        for label, rows in series:
            pts = sorted((r["step"], r[name]) for r in rows if _finite(r.get(name)))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label, linewidth=1.2)
        ax.set_title(name)
        ax.set_xlabel("training step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "metrics.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_schedule(runs: list[Path], labels: list[str], out: Path) -> Path | None:
    """The learned schedule's path (t_tex, t_sem) in every checkpoint of each run that learns one,
    darker for later checkpoints, over the paper's offset path for the run's Δt; None when no
    run uses ``model.semfirst_schedule=learned``."""
    import torch

    from sfd.checkpoint import list_checkpoints, read_checkpoint
    from sfd.diffusion import AsyncClock

    tau = torch.linspace(0.0, 1.0, 401, dtype=torch.float64)
    panels = []
    for run, label in zip(runs, labels):
        configs = [(step, read_checkpoint(path, prefer_ema=True, weights=False).model_config) for step, path in list_checkpoints(run)]
        configs = [(step, m) for step, m in configs if m is not None and m.semfirst_schedule == "learned"]
        if configs:
            panels.append((label, configs))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.0), squeeze=False)
    for ax, (label, configs) in zip(axes[0], panels):
        m0 = configs[0][1]
        offset = AsyncClock(m0.semfirst_delta_t, m0.semantic_chans, "offset")
        t_off = offset.times(tau * offset.tau_end)
        ax.plot(*t_off, color="grey", linestyle="--", linewidth=1, label=f"offset Δt={m0.semfirst_delta_t:g}")
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="synchronous")
        for n, (step, m) in enumerate(configs):
            clock = AsyncClock(m.semfirst_delta_t, m.semantic_chans, "learned", m.semfirst_schedule_knots)
            shade = plt.cm.viridis(n / max(len(configs) - 1, 1))
            ax.plot(*clock.times(tau), color=shade, linewidth=1.4, label=f"step {step}")
        ax.set_title(f"{label}: learned path")
        ax.set_xlabel("t_tex (0 noise, 1 data)")
        ax.set_ylabel("t_sem")
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "schedule.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="eval/plot.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run directories (holding metrics.jsonl / eval.jsonl)")
    ap.add_argument("--labels", default=None, help="comma-separated legend labels (default: folder names)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: <first run>/plots)")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [r.name for r in args.runs]
    if len(labels) != len(args.runs):
        ap.error(f"{len(labels)} labels for {len(args.runs)} runs")
    for run in args.runs:
        if not run.is_dir():
            ap.error(f"no run directory at {run}")
    out = args.out or args.runs[0] / "plots"
    plots = (plot_losses(args.runs, labels, out), plot_metrics(args.runs, labels, out), plot_schedule(args.runs, labels, out))
    made = [p for p in plots if p]
    if not made:
        raise SystemExit(f"nothing to plot: no metrics.jsonl or eval.jsonl in {', '.join(map(str, args.runs))}")
    for p in made:
        print(f"wrote {p}")


if __name__ == "__main__":
    run_cli(main, ())
