"""The whole SFD system on a laptop, and evidence that it learns: data → semantic ViT → Ray encode
→ torchrun training → grid → judged samples.

Runs the same entry points as the full-scale ImageNet recipe, sized for ≤ 10 minutes on 2 idle CPU cores (6.9 min measured; docs/decisions.md),
with no download and no weight file:

1. a procedural class-conditional image set: 6 shapes (the classes) drawn with random position,
   size, colour and fill texture (upright), 24² (sfd/demo/shapes.py), plus held-out splits;
2. a judge (small CNN classifier, sfd/demo/judge.py) trained on the training images, and a
   DINOv2-architecture ViT trained on them as the semantic encoder (sfd/demo/semantic.py),
   written in DINOv2's own weight layout (``pipeline/demo_models.py``);
3. ``pipeline/encode.py`` (the Ray job) into a real Zarr cache, loading that ViT through the
   same ``--dino`` path as DINOv2, Semantic-VAE training included;
4. ``train/main.py`` under ``torchrun`` with 2 processes (gloo), Δt = 0.3;
5. ``sample/grid.py`` for a labelled PNG grid from the EMA weights (with the demo's CFG);
6. ``eval/fid.py gen`` for class-balanced samples with and without guidance, scored by the judge:
   class accuracy and ``FD_judge`` (Fréchet distance on the judge's features; not FID), next to
   the same numbers for real held-out images (the ceiling);
7. ``eval/plot.py`` for the loss curves.

What remains a stand-in, and every output says so: the texture VAE is an invertible
pixel-unshuffle "autoencoder" (the demo then diffuses in pixel space, 48×6×6), and the semantic
encoder is a small ViT trained here on labels, not DINOv2. Settings and their reasons:
docs/decisions.md ("The CPU demo").

Settings: DemoConfig below (presets ``full`` and ``quick``; ``-o key=value`` for any field,
``--dry-run`` prints them resolved).

Example:
    python pipeline/demo.py --out runs/demo
    python pipeline/demo.py --out runs/demo-quick --preset quick   # smaller, for CI
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
from sfd.cli import Arg, config_parser, parse_config, print_config, run_cli  # noqa: E402
from sfd.config import ConfigError  # noqa: E402
from sfd.demo.judge import METRIC_ACCURACY, METRIC_FD  # noqa: E402
from sfd.demo.shapes import CLASSES, write_split  # noqa: E402

STANDINS = {
    "texture encoder": "pixel-unshuffle-f4 (stand-in, not a VAE: the demo diffuses pixels)",
    "semantic encoder": "DINOv2-architecture ViT (64 wide, 4 blocks) trained here on the demo's labels (not DINOv2)",
    "judge": "CNN classifier trained on the demo's training images: judge_accuracy and FD_judge (not FID)",
}

IMAGE_SIZE = 24
NUM_CLASSES = len(CLASSES)
# The seed of each split: train for every network, val for every choice (lr, steps, guidance),
# test only for reported numbers, ceiling = real test images scored like samples.
SPLITS = {"train": 0, "val": 1, "test": 2, "ceiling": 3}
TEXTURE = "standin-f4"  # 24² RGB → 48×6×6 (pixel-unshuffle); the ViT's patch-4 grid is 6×6 too
# The demo's model on the 6×6 latents (48 texture + 4 semantic channels); the study changes
# only the latent channels, Δt and the seed (pipeline/study.py). Choices: docs/decisions.md.
TINY_MODEL = [
    "model.input_size=6", f"model.num_classes={len(CLASSES)}", "model.repa_target_dim=64",
    "model.hidden_size=128", "model.depth=4", "model.num_heads=4", "model.repa_projector_dim=128",
    "global_batch=64", "lr=4e-3", "lr_decay_start=0.5", "ema_decay=0.995", "grad_clip=1.0",
]
SEMANTIC = ["model.in_channels=52", "model.semantic_chans=4"]
SAMPLER = ["-o", "method=heun", "-o", "num_steps=16"]
# The demo's guidance: classifier-free guidance with its own scale per part (the samplers' per-part
# CFG): 3 on the texture channels, 8 on the semantic ones, which carry the class. Measured against
# one scale for both: docs/decisions.md ("The CPU demo").
CFG_TEX, CFG_SEM = 3.0, 8.0


def demo_env() -> dict[str, str]:
    return {
        **os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "5",
    }


def encode_command(train_dir: Path, cache: Path, dino: Path, semvae_steps: int, semvae_lr: float = 1e-3) -> list[str]:
    """The real encode job on the demo images: stand-in texture AE, the trained ViT as DINO, SemVAE trained here.

    The SemVAE gets lr ``semvae_lr`` after 30 warm-up steps: the authors' 5e-5 (with 500 warm-up
    steps) is a rate for 1M steps; in the demo's 300 it left the per-token cosine of the
    reconstructed features at 0.84, against 0.975 at 1e-3 (docs/decisions.md).
    """
    return [
        sys.executable, "pipeline/encode.py", "--images", str(train_dir), "--out", str(cache),
        "--image-size", str(IMAGE_SIZE), "--texture", TEXTURE, "--dino", str(dino), "-o", "semvae_preset=tiny",
        "-o", f"semvae_steps={semvae_steps}", "-o", f"semvae_args=-o lr={semvae_lr:g} -o warmup_steps=30",
        "-o", "rows_per_shard=256", "-o", "rows_per_chunk=64", "-o", "stats_samples=2000",
    ]


STAGE_CPU: dict[str, float] = {}  # user+system CPU seconds of each finished stage's processes


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (the stages)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run(stage: str, cmd: list[str], log: Path, env: dict[str, str], echo: bool = True) -> float:
    """Run one stage's real command line, tee its output to ``log`` (and stdout if ``echo``); stop on failure."""
    print(f"\n== {stage}: {' '.join(cmd)}" + ("" if echo else f"  (output in {log})"), flush=True)
    t0, cpu0 = time.perf_counter(), _children_cpu()
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
    if echo:  # with parallel stages (study --jobs > 1) a child's CPU cannot be told apart
        STAGE_CPU[stage] = STAGE_CPU.get(stage, 0.0) + _children_cpu() - cpu0
    return time.perf_counter() - t0



@dataclass(frozen=True)
class Sizes:
    """How much data and training the shared inputs get (the demo's defaults; --quick is smaller)."""

    per_class: int = 200  # training images per class
    held_out: int = 100  # validation and test images per class (each split; FD_judge reference, accuracies)
    ceiling: int = 40  # a second real test set per class: the real-image ceiling (= samples per class)
    semvae_steps: int = 300
    vit_steps: int = 1000
    vit_lr: float = 4e-3
    judge_steps: int = 250


QUICK = Sizes(per_class=40, held_out=20, ceiling=4, semvae_steps=20, vit_steps=20, judge_steps=60)


@dataclass(frozen=True)
class DemoConfig:
    """The demo's settings (presets: full, quick)."""

    out: str = "runs/demo"  # run folder (everything goes here)
    quick: bool = False  # the smaller data sizes (Sizes vs QUICK above): the CI smoke of the same path
    steps: int = 1200  # training steps
    samples: int = 240  # judged samples per guidance setting (a multiple of the 6 classes)
    cfg_scale_tex: float = CFG_TEX  # CFG scale on the texture channels (grid and guided samples)
    cfg_scale_sem: float = CFG_SEM  # CFG scale on the semantic channels (grid and guided samples)
    nproc: int = 2  # training processes under torchrun
    fresh: bool = False  # delete the run folder first (otherwise every stage resumes)

    def __post_init__(self) -> None:
        if self.samples <= 0 or self.samples % len(CLASSES):
            raise ConfigError(f"samples must be a positive multiple of {len(CLASSES)} (class-balanced), got {self.samples}")


DEMO_PRESETS = {"full": DemoConfig(), "quick": DemoConfig(quick=True, steps=40, samples=24)}


def build_parser() -> argparse.ArgumentParser:
    return config_parser(
        DemoConfig, prog="pipeline/demo.py", description=__doc__, presets=DEMO_PRESETS, default_preset="full",
        args=(Arg("--out", metavar="PATH"), Arg("--fresh")),
        deprecated={"--quick": "--preset quick", "--steps": "steps", "--samples": "samples",
                    "--cfg-scale-tex": "cfg_scale_tex", "--cfg-scale-sem": "cfg_scale_sem", "--nproc": "nproc"},
    )


def prepare(out: Path, sizes: Sizes, log: Path, env: dict[str, str], timings: dict[str, float]) -> dict[str, Path]:
    """Data splits, judge, semantic ViT and latent cache under ``out`` (each skipped when done)."""
    py = sys.executable
    # 1. Data, four splits from distinct seeds: train (every network), val (every choice), test
    # (every reported number: FD_judge reference, accuracies) and ceiling (a second real test set,
    # scored against the test reference like samples are).
    t0 = time.perf_counter()
    data = out / "data"
    counts = {"train": sizes.per_class, "val": sizes.held_out, "test": sizes.held_out, "ceiling": sizes.ceiling}
    dirs = {name: write_split(data / name, n, IMAGE_SIZE, seed=SPLITS[name]) for name, n in counts.items()}
    train_dir, ref_dir = dirs["train"], dirs["test"]
    timings["data"] = time.perf_counter() - t0
    print(f"\n== data: {NUM_CLASSES} classes ({', '.join(CLASSES)}), per class {sizes.per_class} train, "
          f"{sizes.held_out} val, {sizes.held_out} test and {sizes.ceiling} ceiling images, {IMAGE_SIZE}x{IMAGE_SIZE}")

    # 2. The judge and the semantic encoder, both trained on the training split only, side by
    # side (one thread each: two cores, and neither waits for the other).
    judge_file, vit_file = out / "judge" / "judge.safetensors", out / "semantic" / "demo-vit.safetensors"
    jobs = {
        "judge": [py, "pipeline/demo_models.py", "judge", "--train", str(train_dir), "--ref", str(ref_dir),
                  "--out", str(judge_file), "--steps", str(sizes.judge_steps)],
        "semantic ViT": [py, "pipeline/demo_models.py", "semantic", "--out", str(vit_file), "--per-class", str(sizes.per_class),
                         "--size", str(IMAGE_SIZE), "--heldout-per-class", str(sizes.held_out), "--heldout-seed", str(SPLITS["test"]), "--steps", str(sizes.vit_steps),
                         "--lr", str(sizes.vit_lr)],
    }
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = dict(zip(jobs, pool.map(lambda kv: run(kv[0], kv[1], log, env, echo=False), jobs.items())))
    timings.update(done)
    timings["judge + semantic ViT (side by side)"] = time.perf_counter() - t0
    for name, f, key, what in (("judge", judge_file, "heldout_accuracy", "accuracy"),
                               ("semantic ViT", vit_file, "linear_probe_heldout_accuracy", "linear probe")):
        print(f"   {name}: held-out {what} {json.loads(f.with_suffix('.json').read_text())[key]:.1%} ({f})")

    # 3. Encode with the real Ray job; the ViT goes in through --dino like DINOv2.
    cache = out / "cache"
    timings["encode"] = run("encode", encode_command(train_dir, cache, vit_file, sizes.semvae_steps), log, env)
    return {**dirs, "judge": judge_file, "vit": vit_file, "cache": cache}


def main(argv: Sequence[str] | None = None) -> int:
    args, ns = parse_config(build_parser(), argv)
    if ns.dry_run:
        return print_config(args)
    steps, samples = args.steps, args.samples
    sizes = replace(QUICK if args.quick else Sizes(), ceiling=samples // len(CLASSES))
    out = Path(args.out).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "demo.log"
    env = demo_env()
    py = sys.executable
    timings: dict[str, float] = {}
    t_start, cpu_start = time.perf_counter(), cpu_seconds()

    print("SFD demo — stand-ins used (no weights are downloaded or needed):")
    for what, name in STANDINS.items():
        print(f"  {what}: {name}")

    inputs = prepare(out, sizes, log, env, timings)
    ref_dir, ceiling_dir = inputs["test"], inputs["ceiling"]
    judge_file, vit_file, cache = inputs["judge"], inputs["vit"], inputs["cache"]

    # 4. Train the SFD model (Δt = 0.3, REPA on the ViT's tokens) with torchrun, 2 processes.
    train = out / "train"
    timings["train"] = run("train", [
        py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}", "train/main.py",
        "--preset", "tiny", "--cache", str(cache), "--out-dir", str(train),
        *[a for o in (*SEMANTIC, *TINY_MODEL) for a in ("-o", o)],
        "-o", f"max_steps={steps}", "-o", f"ckpt_every={max(steps // 3, 1)}", "-o", f"log_every={max(steps // 30, 1)}",
        "-o", "sample_every=0",
    ], log, env)

    # Sampling and scoring run alone: let them use both cores (training and encoding run one
    # thread per process).
    env_solo = {**env, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    cfg = ["-o", f"cfg_scale_tex={args.cfg_scale_tex}", "-o", f"cfg_scale_sem={args.cfg_scale_sem}"]
    guided = f"samples (CFG texture {args.cfg_scale_tex:g}, semantic {args.cfg_scale_sem:g})"

    # 5. A labelled grid from the EMA weights: every class (full names), with the demo's guidance,
    #    each row led by a held-out real image of its class.
    grid = out / "grid.png"
    timings["grid"] = run("grid", [
        py, "sample/grid.py", "--ckpt", str(train), "--stats", str(cache),
        "--classes", ",".join(str(i) for i in range(len(CLASSES))), "--per-class", "8",
        *SAMPLER, *cfg, "--out", str(grid), "-o", "device=cpu", "--real-images", str(inputs["test"]),
    ], log, env_solo)

    # 6. Class-balanced samples with and without guidance, judged against held-out real images.
    folders = {"guided": out / "samples-cfg", "unguided": out / "samples-noguide"}
    t0 = time.perf_counter()
    for name, folder in folders.items():
        run(f"samples {name}", [
            py, "eval/fid.py", "gen", "--ckpt", str(train), "--stats", str(cache), "--out", str(folder),
            "--num-samples", str(samples), "-o", f"num_classes={len(CLASSES)}", *SAMPLER,
            *(cfg if name == "guided" else []), "-o", f"batch_size={samples}", "-o", "device=cpu",
        ], log, env_solo)
    scores_file = out / "judge_scores.json"
    run("judge scores", [
        py, "pipeline/demo_models.py", "score", "--judge", str(judge_file), "--ref", str(ref_dir),
        str(folders["guided"]), str(folders["unguided"]), str(ceiling_dir), "--out", str(scores_file),
    ], log, env_solo)
    timings["samples+judge"] = time.perf_counter() - t0

    # 7. Loss curves.
    timings["plot"] = run("plot", [py, "eval/plot.py", str(train)], log, env)

    total, cpu = time.perf_counter() - t_start, cpu_seconds() - cpu_start
    scores = json.loads(scores_file.read_text())
    judge_rec = json.loads(judge_file.with_suffix(".json").read_text())
    vit_rec = json.loads(vit_file.with_suffix(".json").read_text())
    keep = (METRIC_ACCURACY, METRIC_FD, "num_images", "per_class_accuracy")
    metrics = {
        guided: {k: scores[str(folders["guided"])][k] for k in keep},
        "samples (no guidance)": {k: scores[str(folders["unguided"])][k] for k in keep},
        "real test images (ceiling)": {k: scores[str(ceiling_dir)][k] for k in keep},
    }
    summary = {
        "run": str(out), "wall_seconds": round(total, 1), "cpu_seconds": round(cpu, 1),
        "stage_seconds": {k: round(v, 1) for k, v in timings.items()},
        "stage_cpu_seconds": {k: round(v, 1) for k, v in STAGE_CPU.items()},
        "cpu_note": "user+system CPU of the stage processes and their waited-for descendants (RUSAGE_CHILDREN); Ray's daemons and actors may escape it: measure the whole run with /usr/bin/time -v",
        "training_steps": steps, "cfg_scale": {"texture": args.cfg_scale_tex, "semantic": args.cfg_scale_sem}, "sampler": " ".join(SAMPLER),
        "metrics": metrics,
        "judge": {"heldout_accuracy": judge_rec["heldout_accuracy"], "heldout_images": judge_rec["heldout_images"], "file": str(judge_file)},
        "semantic_encoder": {k: vit_rec[k] for k in ("linear_probe_heldout_accuracy", "linear_probe_heldout_accuracy_random_init", "probe", "objective", "file")},
        "grid_png": str(grid), "loss_curves_png": str(train / "plots" / "losses.png"), "judge_scores": str(scores_file),
        "checkpoints": str(train / "checkpoints"), "cache": str(cache), "log": str(log), "stand_ins": STANDINS,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n" + "=" * 78)
    print(f"SFD demo finished in {total / 60:.1f} min wall, {cpu:.0f} CPU-s "
          f"({', '.join(f'{k} {v:.0f}s' for k, v in timings.items())})")
    print(f"  judge (CNN trained on the training images): {judge_rec['heldout_accuracy']:.1%} on {judge_rec['heldout_images']} held-out images")
    print(f"  semantic ViT linear probe on held-out images: {vit_rec['linear_probe_heldout_accuracy']:.1%} "
          f"(random-init ViT {vit_rec['linear_probe_heldout_accuracy_random_init']:.1%})")
    print(f"  {'':40}{'class accuracy':>16}{METRIC_FD + ' (not FID)':>22}")
    for name, m in metrics.items():
        print(f"  {name:40}{m[METRIC_ACCURACY]:>16.1%}{m[METRIC_FD]:>22.3f}")
    print(f"  sample grid      {grid}")
    print(f"  loss curves      {summary['loss_curves_png']}")
    print(f"  summary          {out / 'summary.json'}")
    print(f"  checkpoints      {summary['checkpoints']}")
    print(f"  latent cache     {cache}")
    print(f"  full log         {log}")
    print("  stand-ins        " + "; ".join(STANDINS.values()))
    print("=" * 78)
    return 0


if __name__ == "__main__":
    run_cli(main)  # a user error (bad setting, failed stage): one `error:` line, exit status 2
