"""The whole SFD system on a laptop: data → Ray encode → torchrun training → grid → metrics.

Runs the same entry points as the full-scale ImageNet recipe, in a few minutes on 2 CPU cores,
with no download and no weight file:

1. a procedurally generated class-conditional image set (10 classes of coloured shapes, 64²);
2. ``pipeline/encode.py`` (the Ray job) into a real Zarr cache, Semantic-VAE training included;
3. ``train/main.py`` under ``torchrun`` with 2 processes (gloo);
4. ``sample/grid.py`` for a labelled PNG grid from the EMA weights;
5. ``eval/fid.py gen``/``ref``/``calc`` for a Fréchet distance against held-out images;
6. ``eval/plot.py`` for the loss curves.

Weights the demo cannot have are replaced by stand-ins, and every output says so:
the texture VAE by an invertible pixel-unshuffle "autoencoder" (so samples are visible),
DINOv2 by a random-init tiny ViT, and the FID Inception by a random-init Inception whose
distance is reported as ``FD_random-inception`` — never as FID.

Example:
    python pipeline/demo.py --out runs/demo
    python pipeline/demo.py --out runs/demo-quick --quick   # smaller, for CI
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "pipeline"))  # demo_data sits beside this file (pipeline/ is no package)
from demo_data import CLASSES, make_demo_dataset  # noqa: E402

STANDINS = {
    "texture encoder": "pixel-unshuffle-f4 (stand-in, not a VAE)",
    "semantic encoder": "random-init tiny DINOv2-style ViT (not DINOv2)",
    "distance features": "random-init Inception (not FID's Inception): reported as FD_random-inception",
}


# The demo's tiny model: 16x16 latents of the stand-in cache; the study changes only the latent
# channels and Δt (pipeline/study.py).
TINY_MODEL = [
    "model.input_size=16", f"model.num_classes={len(CLASSES)}", "model.repa_target_dim=64",
    "model.hidden_size=128", "model.depth=4", "model.num_heads=4", "model.repa_projector_dim=128",
    "global_batch=32", "lr=1e-3", "ema_decay=0.99",
]


def demo_env() -> dict[str, str]:
    return {
        **os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "5",
    }


def encode_command(train_dir: Path, cache: Path, semvae_steps: int) -> list[str]:
    """The real encode job on the demo images: stand-in texture AE, random tiny DINO, SemVAE trained here."""
    return [
        sys.executable, "pipeline/encode.py", "--images", str(train_dir), "--out", str(cache), "--image-size", "64",
        "--texture", "standin-f4", "--random-encoders", "0", "--semvae-steps", str(semvae_steps),
        "--rows-per-shard", "128", "--rows-per-chunk", "32",
    ]


def run(stage: str, cmd: list[str], log: Path, env: dict[str, str], echo: bool = True) -> float:
    """Run one stage's real command line, tee its output to ``log`` (and stdout if ``echo``); stop on failure."""
    print(f"\n== {stage}: {' '.join(cmd)}" + ("" if echo else f"  (output in {log})"), flush=True)
    t0 = time.perf_counter()
    with open(log, "a", buffering=1) as f:  # line-buffered: `tail -f` follows the stage
        f.write(f"\n== {stage}: {' '.join(cmd)}\n")
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            if echo:
                sys.stdout.write(line)
        code = proc.wait()
    if code != 0:
        raise SystemExit(f"stage '{stage}' failed (exit {code}); its output is in {log}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder (everything goes here)")
    ap.add_argument("--quick", action="store_true", help="fewer images, steps and samples (CI smoke of the same path)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 300, quick 30)")
    ap.add_argument("--nproc", type=int, default=2, help="training processes under torchrun")
    ap.add_argument("--fresh", action="store_true", help="delete the run folder first (otherwise every stage resumes)")
    args = ap.parse_args()

    per_class, held_out, steps, samples, semvae_steps = (48, 10, 300, 100, 100)
    if args.quick:
        per_class, held_out, steps, samples, semvae_steps = (16, 4, 30, 40, 20)
    steps = args.steps or steps
    out = args.out.resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "demo.log"
    env = demo_env()
    py = sys.executable
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    print("SFD demo — stand-ins used (no weights are downloaded or needed):")
    for what, name in STANDINS.items():
        print(f"  {what}: {name}")

    # 1. Data: training images and a held-out set from other seeds, for the distance.
    t0 = time.perf_counter()
    train_dir = make_demo_dataset(out / "data" / "train", per_class=per_class, size=64, seed=0)
    ref_dir = make_demo_dataset(out / "data" / "heldout", per_class=held_out, size=64, seed=1)
    timings["data"] = time.perf_counter() - t0
    print(f"\n== data: {len(CLASSES)} classes, {per_class} training and {held_out} held-out images each, 64x64")

    # 2. Encode with the real Ray job (stand-in texture AE, random tiny DINO, SemVAE trained here).
    cache = out / "cache"
    timings["encode"] = run("encode", encode_command(train_dir, cache, semvae_steps), log, env)

    # 3. Train a tiny SFD (Δt = 0.3, REPA on the stand-in DINO tokens) with torchrun, 2 processes.
    train = out / "train"
    timings["train"] = run("train", [
        py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}", "train/main.py",
        "--preset", "tiny", "--cache", str(cache), "--out-dir", str(train),
        *[a for o in ("model.in_channels=52", "model.semantic_chans=4", *TINY_MODEL) for a in ("-o", o)],
        "-o", f"max_steps={steps}", "-o", f"ckpt_every={max(steps // 3, 1)}", "-o", f"log_every={max(steps // 30, 1)}",
        "-o", f"sample_every={steps}",
    ], log, env)

    # Sampling and feature extraction run alone: let them use both cores (training and encoding
    # run one thread per process).
    env_solo = {**env, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}

    # 4. A labelled grid from the EMA weights: every class, Heun on the exact three-phase grid.
    grid = out / "grid.png"
    timings["grid"] = run("grid", [
        py, "sample/grid.py", "--ckpt", str(train), "--stats", str(cache),
        "--classes", ",".join(str(i) for i in range(len(CLASSES))), "--per-class", "4",
        "--sampler", "heun", "--steps", "25", "--out", str(grid), "--device", "cpu",
    ], log, env_solo)

    # 5. Distance to held-out images in a random feature space (honestly named, not FID).
    samples_dir, ref_npz, metrics = out / "samples", out / "heldout_ref.npz", out / "metrics.json"
    timings["eval"] = run("eval gen", [
        py, "eval/fid.py", "gen", "--ckpt", str(train), "--stats", str(cache), "--out", str(samples_dir),
        "--num-samples", str(samples), "--num-classes", str(len(CLASSES)), "--sampler", "heun", "--steps", "25",
        "--batch-size", "50", "--device", "cpu",
    ], log, env_solo)
    timings["eval"] += run("eval ref", [
        py, "eval/fid.py", "ref", str(ref_dir), "--out", str(ref_npz), "--detector", "random", "--device", "cpu",
    ], log, env_solo)
    timings["eval"] += run("eval calc", [
        py, "eval/fid.py", "calc", str(samples_dir), "--ref", str(ref_npz), "--detector", "random",
        "--out", str(metrics), "--device", "cpu",
    ], log, env_solo)

    # 6. Loss curves.
    timings["plot"] = run("plot", [py, "eval/plot.py", str(train)], log, env)

    total = time.perf_counter() - t_start
    result = json.loads(metrics.read_text()) if metrics.is_file() else {}
    summary = {
        "run": str(out), "total_seconds": round(total, 1), "stage_seconds": {k: round(v, 1) for k, v in timings.items()},
        "grid_png": str(grid), "loss_curves_png": str(train / "plots" / "losses.png"), "metrics_json": str(metrics),
        "checkpoints": str(train / "checkpoints"), "cache": str(cache), "log": str(log),
        "metrics": result.get("metrics", result), "stand_ins": STANDINS,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n" + "=" * 78)
    print(f"SFD demo finished in {total / 60:.1f} min ({', '.join(f'{k} {v:.0f}s' for k, v in timings.items())})")
    print(f"  sample grid      {grid}")
    print(f"  loss curves      {summary['loss_curves_png']}")
    print(f"  metrics          {metrics}")
    print(f"  checkpoints      {summary['checkpoints']}")
    print(f"  latent cache     {cache}")
    print(f"  full log         {log}")
    print("  stand-ins        " + "; ".join(STANDINS.values()))
    print("=" * 78)


if __name__ == "__main__":
    main()
