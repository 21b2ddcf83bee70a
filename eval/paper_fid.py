"""Reproduce one published FID-50K of the SFD paper with the released weights, end to end.

Each row pairs a released checkpoint with the AutoGuidance guide checkpoint and scale the authors'
README table gives for it (docs/method.md §7.2, §9) and runs the authors' evaluation protocol:
dopri5 with atol 1e-6 / rtol 1e-3 over their single masked run of the global clock
(``--grid authors``), fp32 with TF32 matmuls as their inference, 50,000 class-balanced samples
(50 per class), the npz packed in the order shuffled with seed 42, and FID/sFID/IS/precision/recall
against the ADM reference batch (docs/method.md §7.1, §7.3, §8). It checks every file first and
lists all missing ones with the public command that fetches each.

Rows:
{rows}

Examples:
  just paper-fid xl-4m 8                                   # 8 GPUs of this node
  python eval/paper_fid.py xl-4m --weights weights --dry-run   # the two commands, nothing run
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from sfd.cli import Parser, run_cli
from sfd.weights import (
    DEFAULT_DIR,
    FILES,
    PAPER_ROWS,
    PaperRow,
    missing,
    missing_message,
    row_files,
)

REPO = Path(__file__).resolve().parents[1]
ROWS_HELP = "\n".join(
    f"  {r.name:<18} {r.model:<7} {FILES[r.ckpt].pattern}"
    + (f" + guide {r.guide.split('/')[1]} w={r.ag_scale}" if r.guide else " (no guidance)")
    + f"  -> FID {r.fid:.2f}"
    for r in PAPER_ROWS.values()
)


def commands(row: PaperRow, weights: Path, out: Path, nproc: int, batch_size: int, num_samples: int) -> list[list[str]]:
    """The generation command (torchrun over ``nproc`` processes) and the metrics command."""
    f = {k: str(FILES[k].find(weights)) for k in row_files(row)}
    gen = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(REPO / "eval" / "fid.py"), "gen",
        "--ckpt", f[row.ckpt], "--model", row.model, "--stats", f["latents_stats"], "--vae", f["texture_vae"],
        "--preset", "authors", "-o", "method=dopri5", "-o", "atol=1e-6", "-o", "rtol=1e-3", "-o", "grid=authors",
        "--num-samples", str(num_samples), "-o", f"batch_size={batch_size}", "-o", "seed=0",
        "--out", str(out / "samples"), "--npz", str(out / "samples.npz"), "-o", "shuffle_seed=42",
    ]
    if row.guide:
        gen += ["--guide", f[row.guide], "--guide-model", "B/1", "-o", f"ag_scale={row.ag_scale}"]
    calc = [
        sys.executable, str(REPO / "eval" / "fid.py"), "calc", str(out / "samples.npz"),
        "--ref", f["adm_reference"], "--inception", f["inception"], "--out", str(out / "metrics.json"),
    ]
    return [gen, calc]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="eval/paper_fid.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__[__doc__.index("Rows:"):].format(rows=ROWS_HELP),
    )
    p.add_argument("row", choices=sorted(PAPER_ROWS), metavar="ROW", help="paper row (listed below)")
    p.add_argument("--weights", default=str(DEFAULT_DIR), help="weights directory in the published layout (default: weights)")
    p.add_argument("--out", default=None, help="output folder (default: runs/paper-fid/ROW)")
    p.add_argument("--nproc", type=int, default=1, help="GPUs (processes) on this node")
    p.add_argument("--batch-size", type=int, default=32, help="samples per sampler call and GPU")
    p.add_argument("--num-samples", type=int, default=50_000,
                   help="samples (default 50,000, the protocol; fewer gives a number that is not the paper's)")
    p.add_argument("--dry-run", action="store_true", help="check the files and print the commands; run nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    row, weights = PAPER_ROWS[args.row], Path(args.weights)
    gone = missing(weights, row_files(row))
    if gone:
        print(f"error: row {row.name} cannot run. " + missing_message(weights, gone), file=sys.stderr)
        return 2
    out = Path(args.out or f"runs/paper-fid/{row.name}")
    cmds = commands(row, weights, out, args.nproc, args.batch_size, args.num_samples)
    print(f"paper row {row.name}: published FID {row.fid:.2f} (authors' GPU re-run {row.fid_gpu:.2f})")
    for c in cmds:
        print("  $ " + shlex.join(c))
    if args.dry_run:
        return 0
    for c in cmds:
        rc = subprocess.run(c).returncode
        if rc != 0:
            print(f"error: step failed with exit status {rc}: {shlex.join(c[:4])} … (it resumes when run again)",
                  file=sys.stderr)
            return rc
    results = json.loads((out / "metrics.json").read_text())
    fid = results["metrics"]["FID"]  # the real Inception was given, so the paper's names apply
    summary = {"row": row.name, "fid": fid, "paper_fid": row.fid, "paper_fid_gpu": row.fid_gpu,
               "num_samples": args.num_samples, "metrics": str(out / "metrics.json")}
    (out / "paper.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{row.name}: FID {fid:.2f} vs paper {row.fid:.2f} (GPU re-run {row.fid_gpu:.2f}); {out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
