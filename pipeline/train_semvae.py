"""Train the Semantic VAE on the DINOv2 features stored in a latent cache (docs/method.md §3.3).

The authors pre-extract one 0.5 TB safetensors file and load all of it into RAM (docs/method.md
§12.3 item 4). Here the features stream from the cache's ``dino`` array: each epoch visits the
zarr chunks in a (seed, epoch)-random order, split between DDP ranks chunk by chunk; a window of
``--window-chunks`` chunks is read at a time (the next one prefetched in a thread) and its
(row, flip) samples are shuffled together. Memory: about two windows. Both flips and only valid
rows are used. Rows of a cache encoded in permuted order (the encode job's default) are already
class-mixed, so a window is a fair sample of the dataset.

Features: we train on the cache's own features — the ADM crop resized to 224² — i.e. the ones the
SemVAE will actually encode. The authors train on Resize256 → CenterCrop224 features instead and
then encode ADM-crop features (docs/method.md §12.3 item 3); training on what is encoded removes that
train/encode mismatch.

Recipe (the authors' ``ch16.yaml``, docs/method.md §3.3):
- loss ``MSE + (1 − cos) + 1e-7·KL`` (``sfd.models.semvae.semvae_loss``). The cosine axis defaults
  to ``token``: the authors' training code takes the cosine across the 256 tokens of each feature
  channel (``F.cosine_similarity`` default dim=1 on [B, 256, 768]; docs/method.md §12.3 item 2). It is
  probably unintended, but it is what produced the released SemVAE, so it is the faithful
  default; ``--cos-axis feature`` gives the evidently intended per-token cosine. The per-token
  cosine is logged either way (what their evaluation reports).
- AdamW, lr 5e-5, betas (0.9, 0.999), weight decay 0.01, eps 1e-8, no clipping, no EMA.
- lr schedule scaled to the run: linear warm-up from 0.01× over ``--warmup-steps`` (500, at most
  a tenth of the run), constant until ``--decay-start`` (0.8 of the run; authors 800k of 1M),
  then cosine to 0.1× at the last step.
- batch 64 per process; bf16 autocast on GPU as their accelerate run (fp32 on CPU).

Checkpoints: ``<run-dir>/checkpoints/<step>/`` (model safetensors with the config, then the
trainer state — optimizer, step, data position, RNG — written last and atomically). Re-running
the same command resumes from the latest one and continues bit-for-bit. The final weights go to
``<run-dir>/semvae.safetensors`` (config in the metadata), loadable with
``sfd.models.semvae.load_semvae(path, cfg=...)`` / ``sfd.encoding.semvae_spec``.

One trainer per run directory: ``<run-dir>/run.lock`` (a stale lock of a dead process on this
host is taken over). Any field of TrainSemVAEConfig can be set with ``-o key=value``.

Examples:
  python pipeline/train_semvae.py --cache data/cache/imagenet256 --run-dir data/cache/imagenet256.semvae
  # the evidently intended per-token cosine, a shorter warm-up
  python pipeline/train_semvae.py --cache data/cache/imagenet256 --run-dir data/cache/imagenet256.semvae-feature \\
      -o cos_axis=feature -o warmup_steps=100
  # 8 GPUs of this node (what `just semvae data/cache/imagenet256 8` runs), a shorter schedule:
  torchrun --nproc_per_node 8 pipeline/train_semvae.py --cache data/cache/imagenet256 \\
      --run-dir data/cache/imagenet256.semvae --steps 125000
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from sfd import runtime
from sfd.checkpoint import (
    list_checkpoints,
    load_training_state,
    read_checkpoint,
    save_checkpoint,
    save_training_checkpoint,
)
from sfd.cli import Arg, config_parser, parse_config, print_config, run_cli
from sfd.config import SEMVAE_PRESETS, ConfigError, TrainSemVAEConfig, to_json
from sfd.data.cache import LatentCache
from sfd.data.reader import DinoTokenReader
from sfd.models.semvae import SemVAE, semvae_loss
from sfd.runlock import hold_for_ranks
from sfd.runlog import MetricsLog

FINAL_NAME = "semvae.safetensors"


def lr_factor(step: int, cfg: TrainSemVAEConfig) -> float:
    """Warm-up / constant / cosine factor of the base lr at ``step`` (0-based), scaled to the run."""
    warmup = min(cfg.warmup_steps, cfg.steps // 10)
    decay_start = max(warmup, int(cfg.decay_start * cfg.steps))
    if step < warmup:
        return cfg.warmup_start + (1.0 - cfg.warmup_start) * step / warmup
    if step < decay_start:
        return 1.0
    progress = (step - decay_start) / max(1, cfg.steps - 1 - decay_start)
    return cfg.final_lr + (1.0 - cfg.final_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train(cfg: TrainSemVAEConfig) -> Path:
    """Train (or resume, or find finished) and return the path of the final weights."""
    run_dir = Path(cfg.run_dir)
    final = run_dir / FINAL_NAME
    if final.is_file():
        print(f"[semvae] {final} exists: nothing to do", flush=True)
        return final
    if cfg.cos_axis not in ("token", "feature"):
        raise ConfigError(f"cos_axis must be 'token' or 'feature', got {cfg.cos_axis!r}")
    if cfg.preset not in SEMVAE_PRESETS:
        raise ConfigError(f"unknown SemVAE preset {cfg.preset!r}; choose one of {' | '.join(SEMVAE_PRESETS)}")

    # ---- distributed, device, precision; one writer per run directory (rank 0 holds the lock)
    d = runtime.init_distributed(cfg.device)
    lock = hold_for_ranks(run_dir / "run.lock", "SemVAE training", d.rank == 0)
    try:
        return _train(cfg, d, run_dir, final)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: TrainSemVAEConfig, d: Any, run_dir: Path, final: Path) -> Path:
    rank, world, device = d.rank, d.world_size, d.device
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    master = rank == 0

    # ---- data
    cache = LatentCache.open(cfg.cache)
    sem_cfg = SEMVAE_PRESETS[cfg.preset]
    if cache.layout.dino_shape is None:
        raise ConfigError(f"{cfg.cache} stores no DINO features (encoded with repa_targets=none): the SemVAE trains on them")
    if cache.layout.dino_shape[1] != sem_cfg.input_dim:
        raise ConfigError(f"cache DINO width {cache.layout.dino_shape[1]} != SemVAE preset {cfg.preset} input_dim "
                          f"{sem_cfg.input_dim}; pick the matching --preset")
    if cache.layout.semantic_shape[0] != sem_cfg.bottleneck_dim:
        raise ConfigError(f"cache semantic channels {cache.layout.semantic_shape[0]} != SemVAE bottleneck "
                          f"{sem_cfg.bottleneck_dim}; pick the matching --preset")
    stream = DinoTokenReader(cache, cfg.batch_size, cfg.seed, rank, world, cfg.window_chunks)

    # ---- model, optimizer (init seeded: the same command gives the same run)
    torch.manual_seed(cfg.seed)
    model = SemVAE(sem_cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    ddp_model: torch.nn.Module = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank)  # posterior noise

    # ---- resume
    step, epoch, batch_in_epoch = 0, 0, 0
    ckpts = list_checkpoints(run_dir)
    if ckpts:
        ckpt_step, ckpt_dir = ckpts[-1]
        state = load_training_state(ckpt_dir)
        model.load_state_dict(read_checkpoint(ckpt_dir, kind="semvae", prefer_ema=False).state_dict)
        opt.load_state_dict(state["optimizer"])
        step, epoch, batch_in_epoch = int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"])
        gen.set_state(state["generators"][rank])
        if int(state["world_size"]) != world:
            raise ConfigError(f"checkpoint {ckpt_dir} was written by {state['world_size']} processes, this run has "
                              f"{world}: resume with as many")
        if master:
            print(f"[semvae] resumed from {ckpt_dir} (step {ckpt_step})", flush=True)

    run_config = {**asdict(cfg), "cache_index_sha256": cache.layout.index_sha256}
    config_json = json.dumps({"semvae": json.loads(to_json(sem_cfg)), "train": asdict(cfg)})
    if master:
        print(f"[semvae] config {config_json}", flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(config_json + "\n")  # the resolved config
        print(
            f"[semvae] {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {world} process(es) × "
            f"batch {cfg.batch_size}, {stream.batches_per_epoch(epoch)} steps/epoch, device {device}, "
            f"{'bf16 autocast' if use_bf16 else 'fp32'}, cosine over the {cfg.cos_axis} axis",
            flush=True,
        )
    # metrics.jsonl beside the checkpoints (eval/plot.py draws it), cut back to the resumed step.
    metrics = MetricsLog(run_dir, resume_step=step) if master else None

    def save(at_step: int) -> None:
        gens = [gen.get_state().cpu()]
        if world > 1:
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, gens[0])
            gens = gathered
        if master:
            state = {
                "optimizer": opt.state_dict(), "step": at_step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                "generators": gens, "world_size": world,
            }
            save_training_checkpoint(
                run_dir, at_step, model=model, ema=None, state=state, kind="semvae", model_config=sem_cfg,
                run_config=run_config, keep_last=cfg.keep_last,
            )
        if world > 1:
            dist.barrier()

    # ---- loop
    autocast = runtime.autocast(device, torch.bfloat16 if use_bf16 else None)
    run_steps = 0
    t_last, n_last = time.perf_counter(), 0
    model.train()
    while step < cfg.steps:
        for tokens in stream.batches(epoch, batch_in_epoch):
            if step >= cfg.steps or (cfg.stop_after is not None and run_steps >= cfg.stop_after):
                break
            for group in opt.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, cfg)
            tokens = tokens.to(device, non_blocking=True)
            with autocast:
                recon, mean, logvar = ddp_model(tokens, generator=gen)
            losses = semvae_loss(recon.float(), tokens, mean.float(), logvar.float(), kl_weight=cfg.kl_weight, cos_axis=cfg.cos_axis)
            opt.zero_grad(set_to_none=True)
            losses["total"].backward()
            opt.step()
            step, run_steps, batch_in_epoch = step + 1, run_steps + 1, batch_in_epoch + 1
            n_last += tokens.shape[0] * world

            if master and (step % cfg.log_every == 0 or step == cfg.steps):
                with torch.no_grad():
                    token_cos = F.cosine_similarity(recon.float(), tokens, dim=-1).mean().item()
                dt = time.perf_counter() - t_last
                assert metrics is not None
                metrics.write({
                    "event": "train", "step": step, "lr": opt.param_groups[0]["lr"],
                    **{k: losses[k].item() for k in ("total", "mse", "cos", "kl")},
                    "token_cos": token_cos, "samples_per_s": n_last / dt,
                })
                print(
                    f"[semvae] step {step}/{cfg.steps} lr {opt.param_groups[0]['lr']:.3g} loss {losses['total'].item():.4f} "
                    f"mse {losses['mse'].item():.4f} cos {losses['cos'].item():.4f} kl {losses['kl'].item():.1f} "
                    f"per-token cos {token_cos:.4f} | {n_last / dt:.0f} samples/s",
                    flush=True,
                )
                t_last, n_last = time.perf_counter(), 0
            if step % cfg.ckpt_every == 0 and step < cfg.steps:
                save(step)
        else:  # the epoch ran out
            epoch, batch_in_epoch = epoch + 1, 0
            continue
        break  # stopped inside the epoch (end of run or stop_after)

    if metrics is not None:
        metrics.close()
    if step < cfg.steps:  # stop_after: keep the position for the next run
        save(step)
        if master:
            print(f"[semvae] stopped at step {step} (--stop-after); re-run the same command to continue", flush=True)
        return final
    if master:
        save_checkpoint(final, model.state_dict(), "semvae", sem_cfg, run_config, step=step)
        print(f"[semvae] wrote {final}", flush=True)
    d.barrier()
    runtime.shutdown()
    return final


def build_parser() -> argparse.ArgumentParser:
    return config_parser(
        TrainSemVAEConfig, prog="pipeline/train_semvae.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__[__doc__.index("Examples:"):], base=TrainSemVAEConfig(cache="", run_dir=""),
        args=(
            Arg("--cache", required=True, help="latent cache holding the DINO features (encoded with REPA targets stored)"),
            Arg("--run-dir", required=True, help="run directory: checkpoints and the final semvae.safetensors (same command resumes)"),
            Arg("--preset", metavar="|".join(SEMVAE_PRESETS)), Arg("--steps"), Arg("--batch-size"),
        ),
        deprecated={f"--{f.replace('_', '-')}": f for f in (
            "lr", "weight_decay", "warmup_steps", "warmup_start", "decay_start", "final_lr", "kl_weight", "cos_axis",
            "window_chunks", "seed", "ckpt_every", "keep_last", "log_every", "precision", "device", "stop_after")},
    )


def parse_args(argv: Sequence[str] | None = None) -> TrainSemVAEConfig:
    return parse_config(build_parser(), argv)[0]


def main(argv: Sequence[str] | None = None) -> Path | int:
    cfg, args = parse_config(build_parser(), argv)
    if args.dry_run:
        return print_config(cfg)
    return train(cfg)


if __name__ == "__main__":
    # User errors (a bad flag, a damaged cache or checkpoint, a held run lock): one `error:` line, exit 2.
    run_cli(main)
