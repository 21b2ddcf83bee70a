"""What a sampler setting costs in quality on a *trained* model: the demo's, judged.

`bench/sampler_accuracy.py` measures the integration error of each grid against a tight reference
on random weights. This script asks the user's question on a trained model (the demo run's last
EMA checkpoint, with its guidance chosen on validation): at equal NFE, and for the two dopri5
grids at the authors' tolerances (exact-phase grid ≈ 50 NFE vs the authors' grid ≈ 120), how far
are the samples from a tight dopri5 solution, and does the judge see a difference?

For every setting: NFE per batch (mean), seconds, the mean absolute error of the latents against
the reference solution (same noise, same labels), class accuracy and FD_judge of the decoded
samples on the test split. The same per-index seeds throughout, so the differences are the
sampler's, not the noise's; FD_judge on a few hundred samples has a noise floor of its own
(read the reference row's distance to the others as that floor).

Example (after `just demo`):
    python bench/sampler_demo.py --run runs/demo --samples 200
Prints one line per setting, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

# (name, sampling flags). A fixed-step solver on the authors' grid spends one step fewer than its
# num_steps (their last point is the end), so each pair below is at equal NFE (checked in the output).
SETTINGS: list[tuple[str, list[str]]] = [
    ("dopri5, exact grid (ours, default)", ["-o", "method=dopri5", "-o", "grid=exact"]),
    ("dopri5, authors' grid", ["-o", "method=dopri5", "-o", "grid=authors"]),
    ("heun 16, exact grid (the demo's)", ["-o", "method=heun", "-o", "num_steps=16", "-o", "grid=exact"]),
    ("heun 17, authors' grid", ["-o", "method=heun", "-o", "num_steps=17", "-o", "grid=authors"]),
    ("euler 32, exact grid", ["-o", "method=euler", "-o", "num_steps=32", "-o", "grid=exact"]),
    ("euler 33, authors' grid", ["-o", "method=euler", "-o", "num_steps=33", "-o", "grid=authors"]),
]
REFERENCE = ("reference: dopri5 rtol 1e-6, atol 1e-8, exact grid",
             ["-o", "method=dopri5", "-o", "grid=exact", "-o", "rtol=1e-6", "-o", "atol=1e-8"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("runs/demo"), help="a finished demo run folder (`just demo`)")
    ap.add_argument("--samples", type=int, default=200, help="class-balanced samples per setting")
    ap.add_argument("--guidance", default=None, help="sampling flags of the guidance (default: the demo's choice on validation)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from sfd.checkpoint import list_checkpoints
    from sfd.demo.evaluate import sample_images
    from sfd.demo.judge import METRIC_ACCURACY, METRIC_FD, judge_outputs, judge_report, load_judge
    from sfd.demo.shapes import CLASSES, read_split

    run = args.run
    summary_file = run / "summary.json"
    if not summary_file.is_file():
        sys.exit(f"error: {summary_file} not found; run `just demo` (or pass --run to a finished demo run)")
    summary = json.loads(summary_file.read_text())
    guidance = (args.guidance or summary["guidance"]["flags"]).split()
    step, ckpt = list_checkpoints(run / "train")[-1]
    vae = ["--vae", str(run / "texture" / "demo-vae.safetensors")]
    judge = load_judge(run / "judge" / "judge.safetensors")
    xr, _ = read_split(run / "data" / "test")
    _, ref_feats = judge_outputs(judge, xr)
    print(f"demo run {run} step {step}, guidance {' '.join(guidance)}, {args.samples} samples per setting, "
          f"{torch.get_num_threads()} thread(s)")

    rows: dict[str, dict] = {}
    ref_latents = None
    for name, flags in [REFERENCE, *SETTINGS]:
        record: dict[str, list] = {}
        t0 = time.perf_counter()
        images, labels = sample_images(ckpt, run / "cache", args.samples, len(CLASSES), [*flags, *guidance, *vae], record=record)
        seconds = time.perf_counter() - t0
        lat = torch.cat(record["latents"])
        if ref_latents is None:
            ref_latents = lat
        rep = judge_report(judge, images, labels, ref_feats)
        rows[name] = {"nfe": float(np.mean(record["nfe"])), "seconds": round(seconds, 1),
                      "latent_mae_vs_reference": float((lat - ref_latents).abs().mean()),
                      METRIC_ACCURACY: rep[METRIC_ACCURACY], METRIC_FD: rep[METRIC_FD], "flags": " ".join(flags)}
        r = rows[name]
        print(f"{name:52s} NFE {r['nfe']:6.1f}  {r['seconds']:6.1f} s  |latent - ref| {r['latent_mae_vs_reference']:.2e}  "
              f"accuracy {r[METRIC_ACCURACY]:.3f}  {METRIC_FD} {r[METRIC_FD]:.2f}", flush=True)
    result = {"run": str(run), "step": step, "samples": args.samples, "guidance": " ".join(guidance), "settings": rows}
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
