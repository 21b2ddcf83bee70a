"""The demo's helper networks, as command lines: the semantic ViT, the texture autoencoder and the judge.

  semantic  train the DINOv2-architecture ViT on the demo training split's pixels alone
            (contrastive, SimCLR, no labels: sfd/demo/semantic.py), write it in
            DINOv2's original layout for ``pipeline/encode.py --dino``, and report a linear
            probe on held-out images (the same probe on a random-init ViT beside it; the probe
            is the only place labels are read);
  autoencoder  train the texture KL autoencoder (LDM AutoencoderKL, f4 or f8) on the demo
            images, write it in the LDM layout with its ddconfig for ``pipeline/encode.py
            --texture-vae`` (sfd/demo/texture.py), and report held-out PSNR against a bilinear
            down/up-sample at the same factor;
  judge     train the judge classifier on the training split (sfd/demo/judge.py) and report its
            accuracy on held-out images (and its FD_judge between two real held-out sets: the
            ceiling);
  score     judge accuracy and FD_judge of sample folders (``eval/fid.py gen`` outputs) or real
            class folders against the held-out reference;
  evaluate  sample every checkpoint of a training run in one process and judge it (one line
            per checkpoint in ``<run>/eval.jsonl``; resumable): the study's evaluator.

Every command writes a JSON report beside its output and skips work whose output exists.

Example:
    python pipeline/demo_models.py judge --per-class 200 --out runs/demo/judge.safetensors
    python pipeline/demo_models.py score --judge runs/demo/judge.safetensors \\
        --ref runs/demo/data/heldout runs/demo/samples-cfg --out runs/demo/score.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sfd.cli import Parser, run_cli
from sfd.config import ConfigError
from sfd.demo.judge import (
    METRIC_ACCURACY,
    METRIC_FD,
    JudgeConfig,
    judge_outputs,
    judge_report,
    load_judge,
    read_sample_folder,
    save_judge,
    train_judge,
)
from sfd.demo.semantic import (
    DEMO_VIT,
    SSLConfig,
    build_vit,
    linear_probe,
    mean_patch_features,
    save_semantic_vit,
    train_semantic_vit,
)
from sfd.demo.shapes import CLASSES, IMAGE_SIZE, SPLITS, read_split, render_arrays


def _write(path: Path, report: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


def _semantic_objective(ssl: SSLConfig) -> str:
    """The report's one-line description of the label-free objective that ran."""
    views = f"2 global + {ssl.local_crops} local crops" if ssl.local_crops else "2 global crops"
    aug = (f"silhouette p={list(ssl.silhouette)}, blur p={list(ssl.blur)} σ={list(ssl.blur_sigma)}, "
           f"solarise p={list(ssl.solarize)}")
    if ssl.objective == "simclr":
        return (f"self-supervised, no labels: SimCLR NT-Xent (τ {ssl.contrast_temp}) on the CLS and the mean patch token, "
                f"{views}; pixel-only fill-destroying views ({aug})")
    if ssl.objective == "contrastive":
        return f"self-supervised, no labels: MoCo v3-style InfoNCE with an EMA key encoder, {views} ({aug})"
    return ("self-supervised, no labels: DINO self-distillation (CLS and mean patch token, "
            f"{views}, EMA teacher, centering + sharpening) + iBOT masked-patch distillation ({aug})")


def cmd_semantic(args: argparse.Namespace) -> dict[str, Any]:
    out, report_file = Path(args.out), Path(args.out).with_suffix(".json")
    if out.is_file() and report_file.is_file():
        print(f"semantic ViT exists: {out}")
        return json.loads(report_file.read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    # In memory from the same (seed, class, index) function as the PNGs. Training reads the
    # pixels only; the labels are for the probe.
    x, y, _ = render_arrays(args.per_class, args.size, args.seed)
    xh, yh, _ = render_arrays(args.heldout_per_class, args.size, args.heldout_seed)
    ssl = SSLConfig(objective=args.objective, steps=args.steps, batch_size=args.batch_size, lr=args.lr)
    t0, c0 = time.perf_counter(), time.process_time()
    vit = train_semantic_vit(x, ssl=ssl, seed=args.train_seed)
    train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    probe = linear_probe(mean_patch_features(vit, x), y, mean_patch_features(vit, xh), yh)
    rand = build_vit(seed=args.train_seed).eval()
    probe_random = linear_probe(mean_patch_features(rand, x), y, mean_patch_features(rand, xh), yh)
    report = {
        "file": str(out), "architecture": DEMO_VIT,
        "objective": _semantic_objective(ssl),
        "ssl": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(ssl).items()},
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "train_images": len(x), "train_seconds": round(train_s, 1),
        "train_cpu_seconds": round(train_cpu, 1),  # the budget's measure: wall time stretches when cores are shared
        "torch_threads": torch.get_num_threads(),
        "linear_probe_heldout_accuracy": probe, "linear_probe_heldout_accuracy_random_init": probe_random,
        "chance": 1 / len(CLASSES), "heldout_seed": args.heldout_seed,
        "probe": f"logistic regression on the mean final-norm patch token, {len(x)} train / {len(xh)} held-out images (seed {args.heldout_seed})",
    }
    save_semantic_vit(vit, out, record=report)
    _write(report_file, report)
    print(f"semantic ViT: linear probe on held-out images {probe:.3f} (random-init ViT: {probe_random:.3f}); {out}")
    return report


def cmd_judge(args: argparse.Namespace) -> dict[str, Any]:
    out, report_file = Path(args.out), Path(args.out).with_suffix(".json")
    if out.is_file() and report_file.is_file():
        print(f"judge exists: {out}")
        return json.loads(report_file.read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    x, y = read_split(args.train)
    t0 = time.perf_counter()
    judge = train_judge(x, y, JudgeConfig(num_classes=len(CLASSES), image_size=x.shape[1]), steps=args.steps, seed=args.train_seed)
    train_s = time.perf_counter() - t0
    xh, yh = read_split(args.ref)
    preds, _ = judge_outputs(judge, xh)
    report = {
        "file": str(out), "steps": args.steps, "train_images": len(x), "train_seconds": round(train_s, 1),
        "heldout_accuracy": float((preds == yh).mean()), "heldout_images": len(xh),
    }
    save_judge(judge, out, report)
    _write(report_file, report)
    print(f"judge: accuracy on {len(xh)} held-out real images {report['heldout_accuracy']:.4f}; {out}")
    return report


def score(judge_file: str | Path, ref: str | Path, target: str | Path) -> dict[str, Any]:
    """Judge report of a sample folder (gen.json labels) or a real class-folder split vs ``ref``."""
    judge = load_judge(judge_file)
    xr, _ = read_split(ref)
    _, ref_feats = judge_outputs(judge, xr)
    target = Path(target)
    x, y = read_sample_folder(target) if (target / "gen.json").is_file() else read_split(target)
    return judge_report(judge, x, y, ref_feats)


def cmd_score(args: argparse.Namespace) -> dict[str, Any]:
    reports = {str(t): score(args.judge, args.ref, t) for t in args.targets}
    for t, r in reports.items():
        print(f"{t}: {METRIC_ACCURACY} {r[METRIC_ACCURACY]:.3f}  {METRIC_FD} {r[METRIC_FD]:.3f}  ({r['num_images']} images)")
    if args.out:
        _write(Path(args.out), reports)
    return reports


def cmd_evaluate(args: argparse.Namespace) -> None:
    from sfd.checkpoint import list_checkpoints
    from sfd.demo.evaluate import judge_checkpoint

    run_dir = Path(args.run)
    eval_log = run_dir / "eval.jsonl"
    done = set()
    if eval_log.is_file():  # (setting, step) pairs already judged: a rerun resumes
        done = {(r.get("setting", "unguided"), r["step"]) for r in map(json.loads, eval_log.read_text().splitlines()) if r}
    judge = load_judge(args.judge)
    xr, _ = read_split(args.ref)
    _, ref_feats = judge_outputs(judge, xr)
    settings = args.setting or ["unguided"]
    all_flags = args.flags or ["-o method=heun -o num_steps=16"]
    if len(all_flags) != len(settings):
        raise ConfigError(f"give one --flags per --setting ({len(settings)} settings, {len(all_flags)} --flags)")
    checkpoints = list_checkpoints(run_dir)
    if args.last:
        checkpoints = checkpoints[-1:]
    # Settings inside the checkpoint loop: one process judges a run's whole plan (each process
    # start costs ~10 CPU-s of imports and first-use work, more than the tiny model's sampling).
    for step, ckpt in checkpoints:
        for setting, flag_text in zip(settings, all_flags):
            flags = flag_text.split()
            if (setting, step) in done or (args.every and step % args.every):
                continue
            t0 = time.perf_counter()
            r = judge_checkpoint(judge, ref_feats, ckpt, args.cache, args.samples, args.num_classes, flags)
            line = {"step": step, "setting": setting, "ref": args.ref_name or str(args.ref),
                    METRIC_ACCURACY: r[METRIC_ACCURACY], METRIC_FD: r[METRIC_FD], "num_samples": args.samples,
                    "per_class_accuracy": r["per_class_accuracy"], "sampling": " ".join(flags),
                    "seconds": round(time.perf_counter() - t0, 1)}
            with open(eval_log, "a") as f:
                f.write(json.dumps(line) + "\n")
            print(f"{run_dir.name} step {step} {setting}: {METRIC_ACCURACY} {line[METRIC_ACCURACY]:.3f}  "
                  f"{METRIC_FD} {line[METRIC_FD]:.3f}", flush=True)


def cmd_autoencoder(args: argparse.Namespace) -> dict[str, Any]:
    """Train the demo's texture autoencoder (LDM layout, sfd/demo/texture.py) for ``encode.py --texture-vae``."""
    from sfd.demo.texture import (
        demo_texture_config,
        evaluate_texture_vae,
        save_texture_vae,
        timed_train,
    )

    out, report_file = Path(args.out), Path(args.out).with_suffix(".json")
    if out.is_file() and report_file.is_file():
        print(f"texture autoencoder exists: {out}")
        return json.loads(report_file.read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = demo_texture_config(args.factor, args.size, args.z_channels, args.ch)
    x, _, _ = render_arrays(args.per_class, args.size, args.seed)
    xh, _, _ = render_arrays(args.heldout_per_class, args.size, args.heldout_seed)
    vae, train_s = timed_train(x, cfg=cfg, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                               kl_weight=args.kl_weight, rec_loss=args.rec_loss, seed=args.train_seed)
    heldout = evaluate_texture_vae(vae, xh, args.factor, seed=args.train_seed)
    grid = args.size // args.factor
    report = {
        "file": str(out), "factor": args.factor, "image_size": args.size, "latent_shape": [cfg.embed_dim, grid, grid],
        "ddconfig_ch": cfg.ch, "ch_mult": list(cfg.ch_mult), "parameters": sum(p.numel() for p in vae.parameters()),
        "objective": f"per-image sum of {args.rec_loss.upper()} error of the reconstruction of a posterior sample + kl_weight x "
                     "per-image sum of KL to N(0, I) (LDM's loss without LPIPS and GAN)",
        "rec_loss": args.rec_loss, "kl_weight": args.kl_weight, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "train_images": len(x), "train_seconds": round(train_s, 1), "torch_threads": torch.get_num_threads(),
        "heldout_images": len(xh), "heldout": heldout,
    }
    save_texture_vae(vae, out, record=report)
    _write(report_file, report)
    ae, base = heldout["autoencoder_posterior_mean"], heldout[f"bilinear_f{args.factor}_baseline"]
    print(f"texture autoencoder f{args.factor} ({cfg.embed_dim}x{grid}x{grid}): held-out PSNR {ae['psnr_db']} dB, MAE "
          f"{ae['mae_255']} (bilinear f{args.factor}: {base['psnr_db']} dB, {base['mae_255']}); latent std "
          f"{heldout['latent']['std_range']}; {train_s:.0f} s; {out}")
    return report


def cmd_judge_ckpts(args: argparse.Namespace) -> dict[str, Any]:
    """Judge a list of checkpoint files or folders (e.g. post-hoc EMA widths), resumable by name."""
    from sfd.demo.evaluate import judge_checkpoint

    out = Path(args.out)
    reports: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    judge = load_judge(args.judge)
    xr, _ = read_split(args.ref)
    _, ref_feats = judge_outputs(judge, xr)
    for ckpt in args.ckpt:
        name = Path(ckpt).name
        if name in reports:
            continue
        t0 = time.perf_counter()
        r = judge_checkpoint(judge, ref_feats, ckpt, args.cache, args.samples, args.num_classes, args.flags.split())
        reports[name] = {METRIC_ACCURACY: r[METRIC_ACCURACY], METRIC_FD: r[METRIC_FD], "num_samples": args.samples,
                         "ckpt": str(ckpt), "ref": str(args.ref), "sampling": args.flags,
                         "seconds": round(time.perf_counter() - t0, 1)}
        _write(out, reports)
        print(f"{name}: {METRIC_ACCURACY} {r[METRIC_ACCURACY]:.3f}  {METRIC_FD} {r[METRIC_FD]:.3f}", flush=True)
    return reports


def cmd_reconstruct(args: argparse.Namespace) -> None:
    """Real images through the texture autoencoder (posterior mean), as a class-folder split:
    what the judge says of them is the ceiling of anything decoded by that autoencoder."""
    from PIL import Image

    from sfd.demo.texture import reconstruct
    from sfd.models.autoencoder import load_texture_vae

    out = Path(args.out)
    if (out / ".done").is_file():
        print(f"reconstructions exist: {out}")
        return
    vae = load_texture_vae(args.vae)
    src = Path(args.split)
    for name in CLASSES:
        files = sorted((src / name).glob("*.png"))
        if not files:
            raise FileNotFoundError(f"no PNGs in {src / name}: is {src} a demo split?")
        x = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
        (out / name).mkdir(parents=True, exist_ok=True)
        for f, img in zip(files, reconstruct(vae, x)):
            Image.fromarray(img).save(out / name / f.name)
    (out / ".done").write_text("")
    print(f"reconstructed {src} through {args.vae}: {out}")


def main(argv: list[str] | None = None) -> None:
    ap = Parser(prog="pipeline/demo_models.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("semantic", help="train the semantic ViT (DINOv2 layout) and probe it")
    s.add_argument("--out", required=True)
    s.add_argument("--per-class", type=int, default=200)
    s.add_argument("--size", type=int, default=IMAGE_SIZE)
    s.add_argument("--seed", type=int, default=SPLITS["train"], help="training split seed")
    s.add_argument("--heldout-per-class", type=int, default=50)
    s.add_argument("--heldout-seed", type=int, default=SPLITS["val"], help="probe split seed (val: the probe picks settings)")
    s.add_argument("--steps", type=int, default=SSLConfig.steps)
    s.add_argument("--batch-size", type=int, default=SSLConfig.batch_size)
    s.add_argument("--lr", type=float, default=SSLConfig.lr)
    s.add_argument("--objective", default=SSLConfig.objective, choices=("simclr", "dino", "contrastive"),
                   help="label-free objective (the rest of its settings are SSLConfig's defaults)")
    s.add_argument("--train-seed", type=int, default=0)
    a = sub.add_parser("autoencoder", help="train the texture KL autoencoder (LDM layout) for encode.py --texture-vae")
    a.add_argument("--out", required=True, help="the .safetensors to write (its JSON report beside it)")
    a.add_argument("--per-class", type=int, default=200)
    a.add_argument("--size", type=int, default=24)
    a.add_argument("--factor", type=int, default=4, choices=(4, 8), help="downsampling factor: 24² → 6×6 (4), 32² → 4×4 (8)")
    a.add_argument("--z-channels", type=int, default=None, help="latent channels (default 8 at f4, 16 at f8)")
    a.add_argument("--ch", type=int, default=32, help="base width (a multiple of 32: GroupNorm)")
    a.add_argument("--seed", type=int, default=0, help="training split seed")
    a.add_argument("--heldout-per-class", type=int, default=50)
    a.add_argument("--heldout-seed", type=int, default=1)
    a.add_argument("--steps", type=int, default=400)
    a.add_argument("--batch-size", type=int, default=16)
    a.add_argument("--lr", type=float, default=3e-3)
    a.add_argument("--kl-weight", type=float, default=1e-4)
    a.add_argument("--rec-loss", choices=("l1", "l2"), default="l2", help="reconstruction error (LDM: l1, with LPIPS)")
    a.add_argument("--train-seed", type=int, default=0)
    j = sub.add_parser("judge", help="train the judge classifier on the training split")
    j.add_argument("--train", required=True, help="training split (class folders)")
    j.add_argument("--ref", required=True, help="held-out split for its accuracy")
    j.add_argument("--out", required=True)
    j.add_argument("--steps", type=int, default=400)
    j.add_argument("--train-seed", type=int, default=0)
    c = sub.add_parser("score", help="judge accuracy and FD_judge of sample folders or real splits")
    c.add_argument("--judge", required=True)
    c.add_argument("--ref", required=True, help="held-out real split (the FD_judge reference)")
    c.add_argument("targets", nargs="+", help="eval/fid.py gen folders or class-folder splits")
    c.add_argument("--out", default=None, help="JSON of all reports")
    e = sub.add_parser("evaluate", help="sample and judge every checkpoint of a run (resumable)")
    e.add_argument("--run", required=True, help="training run folder")
    e.add_argument("--cache", required=True, help="its latent cache (texture statistics and decoder)")
    e.add_argument("--judge", required=True)
    e.add_argument("--ref", required=True, help="held-out real split (the FD_judge reference)")
    e.add_argument("--samples", type=int, default=120, help="class-balanced samples per checkpoint")
    e.add_argument("--every", type=int, default=0, help="only checkpoints at multiples of this step")
    e.add_argument("--setting", action="append", help="name of a sampling setting in eval.jsonl (one line per "
                   "setting and step; repeat with one --flags each; default: one setting 'unguided')")
    e.add_argument("--flags", action="append", help="sampling flags of the matching --setting, as for eval/fid.py gen "
                   "(default '-o method=heun -o num_steps=16')")
    e.add_argument("--ref-name", default=None, help="name of the reference split in eval.jsonl (e.g. val, test)")
    e.add_argument("--last", action="store_true", help="only the run's last checkpoint")
    e.add_argument("--num-classes", type=int, default=len(CLASSES))
    k = sub.add_parser("judge-ckpts", help="judge a list of checkpoints (e.g. post-hoc EMA widths); resumable")
    k.add_argument("--ckpt", action="append", required=True, help="checkpoint file or folder (repeat)")
    k.add_argument("--cache", required=True, help="the latent cache (texture statistics)")
    k.add_argument("--judge", required=True)
    k.add_argument("--ref", required=True, help="real split the FD_judge is measured against")
    k.add_argument("--samples", type=int, default=120)
    k.add_argument("--flags", default="-o method=heun -o num_steps=16", help="sampling flags, as for eval/fid.py gen")
    k.add_argument("--num-classes", type=int, default=len(CLASSES))
    k.add_argument("--out", required=True, help="JSON report, one entry per checkpoint name")
    r = sub.add_parser("reconstruct", help="a real split through the texture autoencoder (the decoder's ceiling)")
    r.add_argument("--vae", required=True)
    r.add_argument("--split", required=True, help="class-folder split of real images")
    r.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    np.set_printoptions(precision=4)
    {"semantic": cmd_semantic, "autoencoder": cmd_autoencoder, "judge": cmd_judge, "score": cmd_score, "evaluate": cmd_evaluate,
     "judge-ckpts": cmd_judge_ckpts, "reconstruct": cmd_reconstruct}[args.cmd](args)


if __name__ == "__main__":
    run_cli(main)  # a missing or damaged input file: one `error:` line, exit status 2
