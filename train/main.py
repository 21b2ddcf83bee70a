"""Train SFD (Semantic-First Diffusion) on a latent cache: the single-file DDP trainer.

main() tells the run in the order it happens: config → distributed init → checks → seeds and
precision policy → data → model → EMA → optimizer → compile → DDP → resume → cache verification →
loop (periodic jobs first, then the step) → cleanup. The step is TrainStep, below main(); the
trainer's own checks and bookkeeping follow it. Everything imported from sfd/ is a general building
block (sfd/runtime.py: process policy; sfd/data: the cache and its reader; sfd/checkpoint.py and
sfd/manifest.py: weight files; sfd/runlog.py: the metrics log). The hyperparameters are the
presets of sfd/config.py (`--dry-run` prints them resolved); the defaults are the authors' released
recipe (docs/method.md §6). What we do differently fixes their bugs (docs/method.md §12.3): the run
is seeded (9), the model is wrapped in DDP once (10), resume restores everything including AdamW's
moments and picks the latest checkpoint by step number (11), gradient checkpointing is a working
switch (12), and REPA counts whether or not the cosine loss is on (1, in sfd.diffusion.sfd_loss).

Determinism across GPU counts: the times, the noise and the class-dropout decisions of a step are
drawn for the whole global batch from a generator seeded by (seed, step), and rank r takes the
rows at offsets r, r+W, r+2W, ... — the same items the cache reader hands it (in every mode). So a
run on W processes matches a run on one process up to the order of float reductions, and a
resumed run continues exactly where the interrupted one stopped.

Before step 1 (`verify=full`, the default) the ranks read every cache file the run will read and
check its CRC32C checksums, so a damaged file stops the run before it trains (docs/reliability.md).

Run directory: config.json (the resolved config), metrics.jsonl (one line per log interval),
checkpoints/<step:07d>/{model,ema}.safetensors + state.pt + manifest.json, samples/ (EMA grids, if
a texture decoder is known); with `-o eval_every=N` "eval" lines (metric + seconds, sfd/evaluators.py)
in metrics.jsonl; with `-o posthoc_ema_sigma_rel=0.05,0.1` also ema_snapshots/<step:07d>.safetensors
+ manifest.json and checkpoints/<step>/posthoc_ema.safetensors (sfd/posthoc_ema.py; rebuild any EMA width
with eval/posthoc_ema.py). Resume = run the same command again.

Examples:
    # the tiny preset on the demo's cache (`just demo` builds it); the model's shape comes from the cache
    python train/main.py --preset tiny --cache runs/demo/cache --out-dir runs/tiny
    # one node, 8 GPUs, the authors' XL/1 recipe (re-run the same command to resume)
    torchrun --standalone --nproc_per_node=8 train/main.py --preset sfd-xl --cache data/cache/imagenet256
    # two nodes (run on each; HEAD = the first node's address)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500 \\
        train/main.py --preset sfd-xxl --cache data/cache/imagenet256 --out-dir runs/sfd-xxl
    # (data/ and runs/ on storage both nodes see, e.g. symlinks to a shared filesystem)
    # fine-tune from the authors' released weights, later recipe
    torchrun --standalone --nproc_per_node=8 train/main.py --preset sfd-xl-lr2e-4 \\
        --cache data/cache/imagenet256 --init-from weights/model_weights/sfd_xl/checkpoints/4000000.pt
    # print the resolved config and derived numbers, then exit
    python train/main.py --preset sfd-xl -o global_batch=512 -o micro_batch=32 --dry-run
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from sfd import optim, runtime, weight_copies
from sfd.checkpoint import (
    Checkpoint,
    WeightsError,
    list_checkpoints,
    load_training_state,
    read_checkpoint,
    read_safetensors_metadata,
    save_training_checkpoint,
)
from sfd.cli import Parser, cli_status
from sfd.config import (
    SAMPLING_PRESETS,
    TRAIN_PRESETS,
    ConfigError,
    ModelConfig,
    TrainConfig,
    to_dict,
    to_json,
    train_preset,
)
from sfd.data.cache import DATA_SHAPED, CacheError, LatentCache
from sfd.data.reader import LatentBatch, LatentCacheReader
from sfd.diffusion import AsyncClock, LossTerms, noise_composite, sample_training_times, sfd_loss
from sfd.evaluators import EVALUATORS, Evaluator, evaluate
from sfd.kernels import resolve as resolve_kernels
from sfd.loading import texture_decoder_for
from sfd.manifest import CheckpointError, usable_checkpoints, write_manifest
from sfd.models.lightningdit import LightningDiT, count_params, load_weights
from sfd.pixels import load_texture_stats, preview_grid
from sfd.posthoc_ema import STATE_FILE as POSTHOC_STATE_FILE
from sfd.posthoc_ema import PowerEMA, drop_snapshots_after, parse_sigma_rels, write_snapshot
from sfd.repa_targets import REPA_TARGET_SOURCES, RepaTargetSource
from sfd.runlock import LockError, die_with_parent, hold_for_ranks, release_held_locks
from sfd.runlog import MetricsLog, StepProfiler
from sfd.schedule_learning import LearnSettings, ScheduleLearner, schedule_summary

LOSS_KEYS = ("total", "mse", "cos", "repa")
VERIFY_MODES = ("full", "lazy")  # cache checksums: all before step 1 | each file on first read


class TrainError(RuntimeError):
    """The run cannot start (or go on) as configured; the message says what to change."""


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(  # the shared shape: description, options, then the examples (sfd.cli)
        prog="train/main.py", description=__doc__[: __doc__.index("Examples:")], epilog=__doc__[__doc__.index("Examples:"):],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--preset", default="sfd-xl", choices=sorted(TRAIN_PRESETS), help="run preset (sfd/config.py)")
    ap.add_argument("--cache", help="latent cache directory (overrides the preset's `cache`)")
    ap.add_argument("--out-dir", help="run directory (overrides the preset's `out_dir`)")
    ap.add_argument(
        "-o", "--override", action="append", default=[], metavar="KEY=VALUE",
        help="override any TrainConfig field, e.g. -o lr=2e-4 -o model.depth=4 (repeatable)",
    )
    ap.add_argument("--init-from", help="start from these weights: the authors' .pt or our .safetensors")
    ap.add_argument("--dry-run", action="store_true", help="print the resolved config and derived numbers, then exit")
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    cfg = train_preset(args.preset, *args.override)
    for field, value in (("cache", args.cache), ("out_dir", args.out_dir), ("init_from", args.init_from)):
        if value is not None:
            cfg = dataclasses.replace(cfg, **{field: value})
    return cfg


# ---------------------------------------------------------------------------------------------
# The trainer


def main(argv: list[str] | None = None) -> None:
    # -- config ---------------------------------------------------------------------------------
    args = parse_args(argv)
    try:
        cfg = resolve_config(args)
    except ConfigError as e:
        raise TrainError(str(e)) from e
    check_run_config(cfg)
    run_dir = Path(cfg.out_dir)

    # -- distributed init -----------------------------------------------------------------------
    if "TORCHELASTIC_RUN_ID" in os.environ and not args.dry_run:
        die_with_parent()  # torchrun workers run in their own sessions: stop (and save) if it dies
    d = runtime.init_distributed(connect=not args.dry_run)
    say = d.say

    # -- checks: the batch, the cache against the model, one writer, the checkpoints -------------
    per_rank, micro, accum = batch_split(cfg, d.world_size)
    use_repa = uses_repa(cfg)
    # bf16 autocast when asked (CPU too); fp32 master weights, EMA, optimizer state, loss in fp32.
    autocast_dtype = runtime.autocast_dtype(cfg.precision, d.device)
    cache = None if args.dry_run and not Path(cfg.cache).exists() else open_cache(cfg)
    if cache is not None:
        given = [o.split("=", 1)[0].strip() for o in args.override]
        model_cfg, notes = cache.fit_model(cfg.model, cfg.use_semantic, given)  # latent shape, classes, REPA width
        cfg = dataclasses.replace(cfg, model=model_cfg)
        for note in notes:
            say(note)
        # Stored tokens, decoded by the SemVAE on the device, or none (its decoder loads once, here).
        repa_targets = REPA_TARGET_SOURCES[cfg.repa_targets if use_repa else "none"](cache, d.device, autocast_dtype)
        check_cache(cfg, cache, d.world_size, per_rank, repa_targets)
    m = cfg.model
    # One writer per run directory (rank 0 holds <out_dir>/run.lock), then only intact checkpoints.
    if not args.dry_run:
        hold_for_ranks(run_dir / "run.lock", "trainer", d.is_main)
    ckpts = usable_checkpoints(run_dir, list_checkpoints, say, move_aside=d.is_main and not args.dry_run)
    check_same_checkpoint(d, ckpts, run_dir)

    num_valid = int(cache.valid().sum()) if cache is not None else None
    steps_per_epoch = (num_valid // d.world_size) // per_rank if num_valid is not None else None
    derived = {
        "world_size": d.world_size, "device": str(d.device), "global_batch": cfg.global_batch,
        "per_rank_batch": per_rank, "micro_batch": micro, "grad_accumulation": accum,
        "images_per_step": cfg.global_batch, "cache_rows": num_valid, "steps_per_epoch": steps_per_epoch,
        "epochs": round(cfg.max_steps / steps_per_epoch, 2) if steps_per_epoch else None,
        "total_images": cfg.max_steps * cfg.global_batch, "params": count_params(m),
        "params_with_repa_projector": count_params(m, include_repa=m.use_repa),
        "resume_from": str(ckpts[-1][1]) if ckpts else None,
        "posthoc_ema": (
            f"sigma_rel {cfg.posthoc_ema_sigma_rel}, snapshot every {cfg.snapshot_interval} steps"
            if cfg.posthoc_ema_sigma_rel else "off"
        ),
    }
    if args.dry_run:
        if ckpts:  # the resume check on the header alone (a run reads the whole file once, below)
            check_resume(cfg, read_checkpoint(ckpts[-1][1], prefer_ema=False, weights=False))
        say(to_json(cfg))
        say("derived:\n" + "\n".join(f"  {k}: {v}" for k, v in derived.items()))
        if cache is None:
            say(f"  (no cache at {cfg.cache}: steps per epoch unknown, cache not validated)")
        return
    assert cache is not None

    # -- seeds and precision policy ---------------------------------------------------------------
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (the authors never seed, §12.3 bug 9)
    on_cuda = d.device.type == "cuda"
    tf32 = runtime.set_precision(d.device, cfg.tf32)
    kernel_policy = resolve_kernels(cfg.kernels, d.device)  # compile? fused ops? decided here once
    policy = {
        "autocast": runtime.describe_autocast(autocast_dtype, d.device),
        "tf32": tf32,
        "kernels": kernel_policy.describe(),
        "optimizer": (
            f"AdamW + EMA every step, one pass ({'compiled' if kernel_policy.compile else 'eager foreach reference'})"
            if cfg.optimizer == "fused" else f"AdamW ({'fused' if on_cuda else 'foreach'}) + EMA foreach lerp every step"
        ),
        "weight_cast": (
            "bf16 weight copies written by the optimizer pass, fp32 weight-gradient GEMMs" if cfg.weight_cast == "optimizer"
            else "autocast casts the weights in each forward" if cfg.precision == "bf16" else "none (fp32)"
        ),
        "grad_checkpointing": cfg.grad_checkpointing,
        "ddp": f"{'nccl' if on_cuda else 'gloo'}, {d.world_size} ranks" if d.world_size > 1 else "off (1 process)",
    }

    # -- data -------------------------------------------------------------------------------------
    latent_stats = cache.checkpoint_stats()  # stored with every checkpoint for the samplers
    reader = LatentCacheReader(
        cache, seed=cfg.seed, rank=d.rank, world_size=d.world_size, mode=cfg.data_mode,
        load_dino=repa_targets.needs_dino_in_reader,
        reuse_buffers=True,  # a step is done with its batch (copied to the device, or trained on) before the next is drawn
    )

    # -- model ------------------------------------------------------------------------------------
    model = LightningDiT(m)
    init = None
    if cfg.init_from and not ckpts:
        # One read of the file. The authors' full checkpoints hold {model, ema, opt, config}: the raw
        # weights train on and their EMA continues; a bare state dict (their EMA-only files) starts both.
        init = read_checkpoint(cfg.init_from, prefer_ema=False, model_config=m)
        load_weights(model, init.state_dict, source=f"'{init.path}'")
    model.grad_checkpointing = cfg.grad_checkpointing
    model.use_kernels(kernel_policy.fused)
    if not use_repa and m.use_repa:
        # Kept for checkpoint compatibility but untrained: DDP needs a gradient for every trainable
        # parameter, and the projector gets none without the REPA loss.
        model.repa_projector.requires_grad_(False)
    model.to(d.device).train()

    # -- EMA --------------------------------------------------------------------------------------
    # A copy of the step-0 weights, which are the same on every rank (same seed or same file).
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    if init is not None:
        load_weights(ema, init.ema_state_dict or init.state_dict, source=f"'{init.path}' (EMA)")
        init = None  # the file's tensors are in the modules now: free them

    # -- post-hoc EMA (EDM2, docs/method.md §15; off unless posthoc_ema_sigma_rel is set) ----------
    # Power-function profiles on rank 0 only: the parameters are replicated, and rank 0 writes the
    # snapshots and checkpoints. Their starting copy is irrelevant: β_1 = 0 sets them to θ_1.
    sigma_rels = parse_sigma_rels(cfg.posthoc_ema_sigma_rel)
    posthoc = PowerEMA(model, sigma_rels) if sigma_rels and d.is_main else None

    # -- optimizer --------------------------------------------------------------------------------
    # fused: clip + AdamW + EMA as one pass (compiled with the model); torch: AdamW, then the EMA lerp.
    # weight_cast=optimizer: bf16 weight copies the update writes and the forward reads (after the
    # EMA's deep copy, which must not carry them; refreshed below once the weights are final).
    copies = None
    if cfg.weight_cast == "optimizer":
        if autocast_dtype is None:
            raise TrainError("weight_cast=optimizer needs bf16 autocast (precision=bf16)")
        copies = weight_copies.attach(model, autocast_dtype)
    trainable = [(p, e) for p, e in zip(model.parameters(), ema.parameters()) if p.requires_grad]
    optimizer = optim.build_optimizer(
        cfg.optimizer, [p for p, _ in trainable], [e for _, e in trainable], lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay, ema_decay=cfg.ema_decay,
        grad_clip=cfg.grad_clip, compiled=kernel_policy.compile, device=d.device,
    )

    # -- compile ----------------------------------------------------------------------------------
    loss_fn = functools.partial(
        sfd_loss, semantic_chans=m.semantic_chans, semantic_weight=cfg.semantic_weight,
        use_cosine_loss=cfg.use_cosine_loss, repa_weight=cfg.repa_weight, repa_mode=cfg.repa_mode,
        mask_clamped=cfg.mask_clamped,
    )
    net: nn.Module = model  # `model` stays the unwrapped handle: checkpoints never see prefixes
    if kernel_policy.compile:
        net = torch.compile(model)
        loss_fn = torch.compile(loss_fn)

    # -- DDP --------------------------------------------------------------------------------------
    if d.world_size > 1:
        # Buffers are constant tables (position codes, RoPE): nothing to broadcast per step.
        net = DDP(net, device_ids=[d.local_rank] if on_cuda else None, broadcast_buffers=False)
    train_step = TrainStep(cfg, net, model, ema, optimizer, loss_fn, d, micro, autocast_dtype, repa_targets, copies)

    # -- resume -----------------------------------------------------------------------------------
    step, nan_total, nan_run, resume_notes = 0, 0, 0, []
    if ckpts:
        start_dir = ckpts[-1][1]
        saved = read_checkpoint(start_dir, prefer_ema=False)  # each file read once: configs and weights
        resume_notes = check_resume(cfg, saved)
        load_weights(model, saved.state_dict, source=f"'{saved.path}'")
        saved = read_checkpoint(start_dir, prefer_ema=True, model_config=m)
        load_weights(ema, saved.state_dict, source=f"'{saved.path}'")
        del saved
        state = load_training_state(start_dir)
        try:
            optimizer.load_state_dict(state["optimizer"])
        except ValueError as e:
            raise TrainError(f"{start_dir}: optimizer state does not fit (was repa_weight switched on/off?): {e}") from e
        try:  # the reader's order is world-size independent: a position carries over when it divides
            reader.load_state_dict(LatentCacheReader.state_for_world_size(state["reader"], d.world_size))
        except ValueError as e:
            raise TrainError(str(e)) from e
        runtime.set_rng_state(state["rng"], d.device)
        train_step.load_state_dict(state)  # the learned schedule's knots and error histogram
        step, nan_total, nan_run = state["step"], state["nan_skips_total"], state["nan_skips_consecutive"]
        if sigma_rels:  # every rank checks (same files), so a refusal stops them all
            resume_posthoc(posthoc, start_dir, step, sigma_rels)
        if cfg.init_from:
            resume_notes.append(f"init_from {cfg.init_from} ignored: resuming from the checkpoint")
    if copies is not None:
        copies.refresh()  # the weights are final now (resumed, or DDP's broadcast from rank 0)

    # -- cache verification: damage stops every rank here, before anything is written -----------
    if cfg.verify == "full":
        parts = "texture + semantic latents" + (" + stored DINO targets" if reader.load_dino else "")
        seconds = reader.verify(reduce=lambda flags: d.sum(flags.to(d.device)).cpu(), progress=d.is_main)
        say(f"cache checksums verified ({parts}, {d.world_size} rank(s)) in {seconds:.1f} s")
    else:
        say("cache checksums: lazy (each chunk file checked when first read; `just verify-cache` checks all)")
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(to_json(cfg) + "\n")
    start_step = step
    if posthoc is not None:
        # Snapshots past the resumed step came from a stretch this run replays: it writes them again.
        dropped = drop_snapshots_after(run_dir, step)
        if dropped:
            say(f"post-hoc EMA: dropped snapshots of steps {dropped} past the resumed step {step} (they are rewritten)")

    say(f"SFD training: preset {args.preset} ({cfg.model_name}), run dir {run_dir}")
    say("derived: " + ", ".join(f"{k}={v}" for k, v in derived.items()))
    say("performance policy: " + ", ".join(f"{k}={v}" for k, v in policy.items()))
    say(f"REPA targets: {repa_targets.how}" if use_repa else "REPA off")
    say(f"resuming from step {step} ({ckpts[-1][1]})" if ckpts else "starting from step 0")
    for note in resume_notes:
        say(f"  changed since the checkpoint: {note}")
    decoder = texture_stats = None
    if cfg.sample_every > 0 and d.is_main:
        decoder, why = texture_decoder_for(cache.attrs, cfg.texture_vae)
        texture_stats = load_texture_stats(cfg.cache) if decoder is not None else None
        say(f"sample grids every {cfg.sample_every} steps: {why}")
    evaluator, eval_setup = None, None
    if cfg.eval_every > 0:  # every rank samples its share, so every rank builds the decoder
        # Building modules (judge, Inception, decoder) initialises weights from the global RNG
        # before loading theirs: fork it, so the run's RNG state is the same with or without.
        with torch.random.fork_rng(devices=[d.device] if on_cuda else []):
            evaluator, eval_setup = build_evaluation(cfg, cache, d)
        say(f"evaluation every {cfg.eval_every} steps: {cfg.eval_samples} samples, {cfg.eval_metric}, "
            f"{eval_setup[0].method} ({eval_setup[0].solver_options()}) from the EMA")

    def save(step: int, reader_state: dict[str, Any]) -> Path:
        if copies is not None and (stale := copies.stale()):
            # A copy the forward read but the optimizer did not write: the run trained on old weights.
            raise TrainError(f"step {step}: {len(stale)} bf16 weight copies differ from their fp32 weights "
                             "(weight_cast=optimizer); run again with weight_cast=autocast and report this")
        state = {
            "step": step, "images_seen": step * cfg.global_batch, "optimizer": optimizer.state_dict(),
            "reader": reader_state, "rng": runtime.rng_state(d.device), "world_size": d.world_size,
            "nan_skips_total": nan_total, "nan_skips_consecutive": nan_run, **train_step.state_dict(),
        }
        extra = {} if posthoc is None else {POSTHOC_STATE_FILE: lambda path: posthoc.save_state(path, step)}
        path = save_training_checkpoint(  # the model config carries the learned schedule's current knots
            run_dir, step, model=model, ema=ema, state=state, kind="lightningdit", model_config=train_step.model_config,
            run_config=run_config_dict(cfg), latent_stats=latent_stats, keep_last=cfg.keep_last,
            extra_files=extra,
        )
        write_manifest(path)  # last: sizes and SHA-256 of the files above
        return path

    # -- loop -------------------------------------------------------------------------------------
    signals = runtime.StopSignals(say)
    signals.install()
    profiler = StepProfiler(cfg.profile_steps, run_dir, d.rank, d.device) if cfg.profile_steps else None
    metrics = MetricsLog(run_dir, cfg.tensorboard, resume_step=step) if d.is_main else None
    pbar = tqdm(total=cfg.max_steps, initial=step, disable=not d.is_main, dynamic_ncols=True, mininterval=1.0)
    batches: Iterator[LatentBatch] = reader.batches(per_rank)
    reader_state = reader.state_dict()  # position after the last batch that was trained on
    window: list[StepResult] = []
    window_start, stop = time.perf_counter(), False
    try:
        while True:
            last = step >= cfg.max_steps
            # Periodic jobs first, so the final step needs no special case.
            if window and (step % cfg.log_every == 0 or last or stop):
                record = log_record(window, step, cfg.global_batch, time.perf_counter() - window_start)
                record |= {"lr": optimizer.param_groups[0]["lr"], "skipped_total": nan_total}
                if metrics is not None:
                    metrics.write(record)
                pbar.set_postfix(progress_postfix(record), refresh=False)
                window, window_start = [], time.perf_counter()
            if cfg.sample_every and d.is_main and step > start_step and (step % cfg.sample_every == 0 or last):
                png = run_dir / "samples" / f"{step:07d}.png"
                metrics.write({"event": "sample", "step": step, **preview_grid(ema, 16, texture_stats, decoder, png)})
            # Evaluations and snapshots come before the checkpoint of their step: a resumed run
            # redoes exactly those past its checkpoint (their log lines were cut back with it).
            if evaluator is not None and step > start_step and (step % cfg.eval_every == 0 or last):
                record = evaluate(ema, evaluator, cfg.eval_samples, *eval_setup, d)
                window_start += record["seconds"]  # the throughput of the next log line is training only
                if metrics is not None:
                    metrics.write({"event": "eval", "step": step, "metric": cfg.eval_metric, **record})
                    pbar.write(f"step {step}: eval " + ", ".join(f"{k} {v:.4g}" for k, v in record.items()
                                                                 if isinstance(v, float)))
            if posthoc is not None and step > start_step and (step % cfg.snapshot_interval == 0 or last):
                t0 = time.perf_counter()
                snap = write_snapshot(run_dir, step, posthoc, model_config=m, run_config=run_config_dict(cfg),
                                      latent_stats=latent_stats)
                metrics.write({"event": "ema_snapshot", "step": step, "seconds": round(time.perf_counter() - t0, 4)})
                window_start += time.perf_counter() - t0
                pbar.write(f"step {step}: post-hoc EMA snapshot {snap}")
            if step > start_step and ((cfg.ckpt_every and step % cfg.ckpt_every == 0) or last or stop):
                if d.is_main:
                    pbar.write(f"step {step}: checkpoint {save(step, reader_state)}")
                d.barrier()
            if last or stop:
                break

            # The optimisation step.
            batch = next(batches)
            reader_state = reader.state_dict()
            for group in optimizer.param_groups:  # a float, so compiled code never sees it change
                group["lr"] = lr_at(cfg, step)
            if profiler is not None:
                profiler.before_step(step)
            result = train_step(batch, step, stop_requested=signals.received is not None)
            step += 1
            if posthoc is not None and not result.skipped:
                posthoc.update(step)  # after the optimiser step, like the classic EMA
            if profiler is not None:
                profiler.after_step(step)
            pbar.update(1)
            window.append(result)
            stop = result.stop
            if step == 1 and cfg.use_cosine_loss and result.grad_norm > 1e4:
                pbar.write(f"step 1: grad norm {result.grad_norm:.3g} is expected (faithful): the cosine loss on the "
                           "zero-initialised output layer has a 1/eps gradient there; see docs/decisions.md")
            if result.skipped:
                nan_total, nan_run = nan_total + 1, nan_run + 1
                pbar.write(f"step {step}: non-finite loss or gradient, step skipped ({nan_run} in a row)")
                if nan_run >= cfg.max_nan_skips:
                    raise TrainError(
                        f"{nan_run} consecutive steps had a non-finite loss or gradient (up to step {step}); "
                        "stopping. Lower lr, set grad_clip, or check the cache; the last checkpoint is intact"
                    )
            else:
                nan_run = 0
        if stop:
            outcome = f"stopped at step {step} on request; run the same command again to resume"
        elif step == start_step:
            outcome = f"nothing to do: step {step} >= max_steps {cfg.max_steps}"
        else:
            outcome = f"done: step {step}, {step * cfg.global_batch} images"

    # -- cleanup ----------------------------------------------------------------------------------
    finally:
        if profiler is not None:
            profiler.close()  # a run that stops inside the window still writes its trace
            for path in profiler.written:
                pbar.write(f"profile: {path}")
        pbar.close()
        signals.restore()
        reader.close()
        if metrics is not None:
            metrics.close()
    say(outcome)


# ---------------------------------------------------------------------------------------------
# The optimisation step


@dataclass
class StepResult:
    losses: dict[str, float]  # global batch means
    grad_norm: float
    skipped: bool  # non-finite loss or gradient on some rank: no optimizer step, no EMA update
    stop: bool  # some rank got SIGTERM/SIGINT


class TrainStep:
    """One optimisation step over the global batch, identical on every rank count.

    Forward/backward of each micro-batch (gradients synchronised by DDP on the last one), one
    all-reduce carrying the losses, a stop request and a non-finite flag so all ranks take the
    same decision, then :meth:`_update` (AdamW and the EMA) — or nothing, if any rank saw a NaN/inf.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        net: nn.Module,
        model: LightningDiT,
        ema: LightningDiT,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[..., LossTerms],
        d: runtime.Dist,
        micro_batch: int,
        autocast_dtype: torch.dtype | None,
        repa_targets: RepaTargetSource | None = None,
        copies: weight_copies.WeightCopies | None = None,
    ) -> None:
        self.cfg, self.net, self.optimizer, self.loss_fn, self.d = cfg, net, optimizer, loss_fn, d
        self.weight_copies = copies
        self.micro_batch = micro_batch
        self.autocast_dtype = autocast_dtype
        self.use_repa = uses_repa(cfg)
        self.repa_targets = repa_targets
        trainable = [(p, e) for p, e in zip(model.parameters(), ema.parameters()) if p.requires_grad]
        self.params = [p for p, _ in trainable]
        self.ema_params = [e for _, e in trainable]
        # The learned schedule's knots and error histogram (sfd/schedule_learning.py); None for
        # the fixed schedules. The EMA model's config follows the knots, so its sample grids do.
        self.ema, self.learner = ema, None
        m = cfg.model
        if m.semfirst_schedule == "learned":
            knots = ScheduleLearner.initial_knots(m.semfirst_schedule_knots, cfg.delta_t, cfg.schedule_grid)
            self.learner = ScheduleLearner(LearnSettings.of(cfg), knots, m.semantic_chans)
            ema.cfg = self.model_config

    @property
    def model_config(self) -> ModelConfig:
        """The model config to store: the run's, with the learned schedule's current knots."""
        if self.learner is None:
            return self.cfg.model
        return dataclasses.replace(self.cfg.model, semfirst_schedule_knots=self.learner.knot_tuple)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.learner is None else {"schedule": self.learner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.learner is not None and "schedule" in state:
            self.learner.load_state_dict(state["schedule"])
            self.ema.cfg = self.model_config

    def draws(self, step: int) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """(t_tex, t_sem, x0, drop) for the whole global batch of ``step`` (docs/method.md §4.2)."""
        cfg, m, device = self.cfg, self.cfg.model, self.d.device
        gen = torch.Generator(device=device).manual_seed(runtime.derive_seed("train", cfg.seed, step))
        B = cfg.global_batch
        if self.learner is not None:  # along the learned path, plus exploring rows while it is learned
            t_tex, t_sem = self.learner.draw_times(B, step, generator=gen, device=device, mean=cfg.time_mean, std=cfg.time_std)
        else:
            t_tex, t_sem = sample_training_times(
                B, cfg.delta_t, generator=gen, device=device, mean=cfg.time_mean, std=cfg.time_std,
                schedule=m.semfirst_schedule,
            )
        x0 = torch.randn((B, m.in_channels, m.input_size, m.input_size), generator=gen, device=device)
        # Label dropout decided here, not inside the model, so it is seeded and rank-independent.
        drop = None
        if m.class_dropout_prob > 0:
            drop = (torch.rand(B, generator=gen, device=device) < m.class_dropout_prob).long()
        return t_tex, t_sem, x0, drop

    def __call__(self, batch: LatentBatch, step: int, stop_requested: bool = False) -> StepResult:
        cfg, d, m = self.cfg, self.d, self.cfg.model
        t_tex, t_sem, x0, drop = self.draws(step)
        # Rank r's k-th item is global item r + kW (the reader's memory-mode order).
        mine = torch.arange(d.rank, cfg.global_batch, d.world_size, device=d.device)
        # (b, C, H, W); without semantic channels only the leading texture channels are trained on.
        x1 = (batch.x if cfg.use_semantic else batch.x[:, : m.in_channels]).to(d.device, non_blocking=True)
        y = batch.y.to(d.device, non_blocking=True)
        # Stored tokens (fp16 from the reader, cast on the device) or decoded by the SemVAE, no grad.
        repa_target = None
        if self.use_repa:
            repa_target = (
                self.repa_targets(batch) if self.repa_targets is not None
                else batch.repa.to(d.device, non_blocking=True).float()
            )
        accum = len(mine) // self.micro_batch
        sums = torch.zeros(len(LOSS_KEYS), device=d.device)
        learning = self.learner is not None and self.learner.settings.learning(step)
        errors = torch.zeros(self.learner.increment_size if learning else 0, device=d.device)
        for a in range(accum):
            sel = slice(a * self.micro_batch, (a + 1) * self.micro_batch)
            g = mine[sel]
            x_t, target, _ = noise_composite(x1[sel], t_tex[g], t_sem[g], m.semantic_chans, x0=x0[g])
            # DDP all-reduces the gradients on the last micro-batch only.
            sync = a == accum - 1 or not isinstance(self.net, DDP)
            with contextlib.nullcontext() if sync else self.net.no_sync():
                with runtime.autocast(d.device, self.autocast_dtype):
                    out = self.net(
                        x_t, (t_tex[g], t_sem[g]), y[sel], return_repa=self.use_repa,
                        force_drop_ids=None if drop is None else drop[g],
                    )
                pred, projection = out if self.use_repa else (out, None)
                terms = self.loss_fn(
                    pred, target, repa_projection=projection,
                    repa_target=None if repa_target is None else repa_target[sel],
                    t_tex=t_tex[g], t_sem=t_sem[g],
                )
                (terms.total / accum).backward()
            sums += torch.stack([terms.total, terms.mse, terms.cos, terms.repa]).detach() / accum
            if learning:  # each part's velocity error, binned over (t_tex, t_sem)
                errors += self.learner.observe(t_tex[g], t_sem[g], pred, target)

        # The error histogram rides on the step's one all-reduce, after the loss sums.
        grad_norm, shared = self._update(torch.cat([sums, errors]), stop_requested)
        losses = {k: v / d.world_size for k, v in zip(LOSS_KEYS, shared)}
        if learning:
            if not shared[-1] > 0:
                self.learner.accumulate(shared[len(LOSS_KEYS):-2])
            if self.learner.maybe_update(step + 1):
                self.ema.cfg = self.model_config
                d.say(f"step {step + 1}: learned schedule update {self.learner.updates}: {schedule_summary(self.learner.knot_tuple)}")
        return StepResult(losses, float(grad_norm), shared[-1] > 0, shared[-2] > 0)

    def _update(self, sums: Tensor, stop_requested: bool) -> tuple[Tensor, list[float]]:
        """Gradient norm (and clip), the one all-reduce, then AdamW and the EMA (one pass with
        ``optimizer=fused``, sfd/optim.py) unless some rank saw a NaN/inf; gradients zeroed.
        Returns the gradient norm and the all-reduced [loss sums..., stop, non-finite]."""
        cfg, d = self.cfg, self.d
        # The optimizer block (sfd/optim.py): the norm (and, for `torch`, clipping) now, the update below.
        grad_norm = optim.grad_norm(self.optimizer, self.params, cfg.grad_clip)
        bad = ~(torch.isfinite(sums).all() & torch.isfinite(grad_norm))
        flags = torch.stack([torch.tensor(float(stop_requested), device=d.device), bad.float()])
        # One collective per step: the mean losses, and every rank's stop request and NaN flag.
        shared = d.sum(torch.cat([sums, flags])).tolist()
        if not shared[-1] > 0:
            # AdamW and the EMA every step (docs/method.md §6), as one pass for optimizer=fused.
            optim.update(self.optimizer, self.params, self.ema_params, cfg.ema_decay, grad_norm, self.weight_copies)
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, shared


# ---------------------------------------------------------------------------------------------
# The trainer's checks (every mismatch found before the first step) and bookkeeping


def uses_repa(cfg: TrainConfig) -> bool:
    """REPA is on when it has a weight and a target source (``repa_targets=none`` turns it off)."""
    return cfg.repa_weight > 0 and REPA_TARGET_SOURCES[cfg.repa_targets].gives_targets


def check_run_config(cfg: TrainConfig) -> None:
    m = cfg.model
    problems = []
    try:
        AsyncClock(cfg.delta_t, m.semantic_chans, m.semfirst_schedule, m.semfirst_schedule_knots)
        if m.semfirst_schedule == "learned":
            knots = ScheduleLearner.initial_knots(m.semfirst_schedule_knots, cfg.delta_t, cfg.schedule_grid)
            ScheduleLearner(LearnSettings.of(cfg), knots, m.semantic_chans)
            if m.semantic_chans == 0:
                problems.append("model.semfirst_schedule=learned needs semantic channels (model.semantic_chans > 0)")
    except ValueError as e:
        problems.append(str(e))
    if not cfg.use_semantic and (m.semantic_chans != 0 or cfg.delta_t != 0):
        problems.append(
            f"use_semantic=false trains on the texture channels only: set model.semantic_chans=0 (now "
            f"{m.semantic_chans}) and delta_t=0 (now {cfg.delta_t})"
        )
    if uses_repa(cfg) and not m.use_repa:
        problems.append(f"repa_weight={cfg.repa_weight} but model.use_repa=false: set repa_weight=0 or model.use_repa=true")
    if cfg.max_steps < 0 or cfg.log_every <= 0 or cfg.ckpt_every < 0 or cfg.sample_every < 0:
        problems.append("max_steps, ckpt_every and sample_every must be >= 0 and log_every > 0")
    if cfg.eval_every > 0:
        if cfg.eval_sampling not in SAMPLING_PRESETS:
            problems.append(f"eval_sampling must be one of {sorted(SAMPLING_PRESETS)}, got {cfg.eval_sampling!r}")
        problems += EVALUATORS[cfg.eval_metric].problems(cfg)
    if cfg.verify not in VERIFY_MODES:
        problems.append(f"verify must be one of {', '.join(VERIFY_MODES)}, got {cfg.verify!r}")
    if cfg.init_from and not Path(cfg.init_from).is_file():
        problems.append(f"init_from: no weight file at '{cfg.init_from}'")
    if problems:
        raise TrainError("invalid run config:\n  " + "\n  ".join(problems))


def resume_posthoc(posthoc: PowerEMA | None, start_dir: Path, step: int, sigma_rels: tuple[float, ...]) -> None:
    """Continue the post-hoc EMA profiles from the checkpoint (``posthoc`` None: check only).

    A profile averages every step since step 1, so it cannot start in the middle of a run: a
    checkpoint without them, or with other widths, stops the run with the fix."""
    path = start_dir / POSTHOC_STATE_FILE
    if not path.is_file():
        raise TrainError(
            f"{start_dir} has no post-hoc EMA profiles ({POSTHOC_STATE_FILE}): they average every step from the first, "
            "so they cannot start mid-run. Resume with -o posthoc_ema_sigma_rel= (off), or start a new run (--out-dir)"
        )
    probe = posthoc
    try:
        if probe is None:  # the other ranks: the header only
            saved = tuple(json.loads(read_safetensors_metadata(path).get("sigma_rels", "[]")))
            if saved != sigma_rels:
                raise ValueError(f"{path} holds profiles of sigma_rel {list(saved)}, the run asks for {list(sigma_rels)}")
        else:
            probe.load_state(path, step)
    except (ValueError, WeightsError) as e:
        raise TrainError(f"{e}; keep posthoc_ema_sigma_rel as the run started, or start a new run (--out-dir)") from e


def build_evaluation(cfg: TrainConfig, cache: LatentCache, d: runtime.Dist) -> tuple[Evaluator, tuple[Any, Any, nn.Module]]:
    """The evaluator and (sampling config, texture stats, decoder) of ``-o eval_every``."""
    k = cfg.model.num_classes
    if cfg.eval_samples < 2 or cfg.eval_samples % k:
        raise TrainError(f"eval_samples={cfg.eval_samples} must be a multiple of the {k} classes (and >= 2): "
                         f"e.g. -o eval_samples={max(2, k) * 10}")
    decoder, why = texture_decoder_for(cache.attrs, cfg.texture_vae)
    if decoder is None:
        raise TrainError(f"eval_every needs images, hence a texture decoder: {why}; set texture_vae=FILE or eval_every=0")
    sampling = SAMPLING_PRESETS[cfg.eval_sampling]
    if cfg.eval_num_steps:
        sampling = dataclasses.replace(sampling, num_steps=cfg.eval_num_steps)
    evaluator = EVALUATORS[cfg.eval_metric](cfg, d.device)
    return evaluator, (sampling, load_texture_stats(cfg.cache), decoder.to(d.device).eval())


def batch_split(cfg: TrainConfig, world_size: int) -> tuple[int, int, int]:
    """(per-rank batch, micro-batch, gradient-accumulation steps) of the global batch."""
    if cfg.global_batch % world_size:
        raise TrainError(
            f"global_batch={cfg.global_batch} is not divisible by the world size {world_size}; "
            f"pick a multiple of {world_size}"
        )
    per_rank = cfg.global_batch // world_size
    micro = cfg.micro_batch or per_rank
    if per_rank % micro:
        raise TrainError(
            f"the per-rank batch {per_rank} (global_batch {cfg.global_batch} / {world_size} ranks) is not "
            f"divisible by micro_batch={micro}; choose micro_batch dividing {per_rank} (0 = no accumulation)"
        )
    return per_rank, micro, per_rank // micro


def open_cache(cfg: TrainConfig) -> LatentCache:
    try:
        cache = LatentCache.open(cfg.cache)
    except CacheError as e:
        raise TrainError(f"{e}. Build the cache first (`just encode ...`) or pass --cache PATH") from e
    if not cache.is_complete():
        raise TrainError(f"cache {cache.path} is incomplete (pending shards {cache.pending_shards()[:10]}); resume the encode job")
    try:
        cache.stats()
    except CacheError as e:
        raise TrainError(str(e)) from e
    return cache


def check_cache(cfg: TrainConfig, cache: LatentCache, world_size: int, per_rank: int, targets: RepaTargetSource) -> None:
    """The cache must fit the model (channels, latent size, classes, REPA targets) and the batch."""
    m = cfg.model
    problems = cache.model_problems(m, cfg.use_semantic)
    if uses_repa(cfg) and m.use_repa:  # the source checks what it gives (sfd/repa_targets.py)
        problems += targets.problems(cache, (m.input_size // m.patch_size) ** 2, m.repa_target_dim)
    items_per_rank = int(cache.valid().sum()) // world_size
    if per_rank > items_per_rank:
        problems.append(f"per-rank batch {per_rank} exceeds the {items_per_rank} valid rows each of {world_size} ranks gets per epoch")
    if problems:
        raise TrainError(
            f"cache {cache.path} does not fit the run config:\n  " + "\n  ".join(problems)
            + "\nFix: leave the model's data-shaped fields (" + ", ".join(f"model.{k}" for k in DATA_SHAPED)
            + ") unset so they come from the cache, change the other settings named above, or use a matching cache"
        )


def check_same_checkpoint(d: runtime.Dist, ckpts: Sequence[tuple[int, Path]], run_dir: Path) -> None:
    """Every rank must resume from the same step: the run dir has to be on a shared filesystem."""
    if not (d.initialized and d.world_size > 1):
        return
    found = torch.tensor([ckpts[-1][0] if ckpts else -1] * 2, device=d.device)
    found[1].neg_()
    torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MAX)
    if int(found[0]) != -int(found[1]):
        raise TrainError(
            f"ranks see different checkpoints in {run_dir} (latest steps from {-int(found[1])} to "
            f"{int(found[0])}); put --out-dir on a filesystem shared by all nodes"
        )


def check_resume(cfg: TrainConfig, ckpt: Checkpoint) -> list[str]:
    """Refuse a checkpoint of another model; return notes on other fields that changed."""
    saved_model, now_model = to_dict(ckpt.model_config), to_dict(cfg.model)
    notes = []
    if cfg.model.semfirst_schedule == "learned":  # the knots are trained state: the checkpoint's are kept
        saved_knots, now_knots = saved_model.pop("semfirst_schedule_knots", None), now_model.pop("semfirst_schedule_knots")
        if now_knots and list(now_knots) != list(saved_knots or []):
            notes.append("model.semfirst_schedule_knots: the checkpoint's learned knots are kept, not the given ones")
    if saved_model != now_model:
        diffs = [f"model.{k}: checkpoint {saved_model.get(k)!r}, now {v!r}" for k, v in now_model.items() if saved_model.get(k) != v]
        raise TrainError(
            f"{ckpt.path.parent} was trained with another model config:\n  " + "\n  ".join(diffs)
            + "\nUse the same model settings to resume, or another --out-dir to start a new run"
        )
    saved, now = ckpt.run_config or {}, run_config_dict(cfg)
    return notes + [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in now.items() if saved.get(k) != v]


def run_config_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The run config as stored in checkpoints: everything but the model (stored beside it)."""
    return {k: v for k, v in to_dict(cfg).items() if k != "model"}


def lr_at(cfg: TrainConfig, step: int) -> float:
    """The learning rate of optimisation step ``step`` (0-based): ``cfg.lr``, falling linearly to 0 at
    ``max_steps`` from ``lr_decay_start · max_steps`` on (``lr_decay_start = 1``: constant, the authors')."""
    start = cfg.lr_decay_start * cfg.max_steps
    if cfg.lr_decay_start >= 1.0 or step < start:
        return cfg.lr
    return cfg.lr * max(cfg.max_steps - step, 0) / max(cfg.max_steps - start, 1e-9)


def log_record(window: Sequence[StepResult], step: int, global_batch: int, seconds: float) -> dict[str, Any]:
    """A log line: mean losses and gradient norm over the window's non-skipped steps, throughput."""
    good = [r for r in window if not r.skipped]
    record: dict[str, Any] = {"event": "train", "step": step, "images": step * global_batch}
    for k in LOSS_KEYS:
        record[k] = sum(r.losses[k] for r in good) / len(good) if good else None
    record["grad_norm"] = sum(r.grad_norm for r in good) / len(good) if good else None
    return record | {"images_per_s": len(window) * global_batch / seconds, "skipped": len(window) - len(good)}


def progress_postfix(record: dict[str, Any]) -> dict[str, str]:
    shown = {k: f"{record[k]:.4f}" for k in (*LOSS_KEYS, "grad_norm") if record[k] is not None}
    return shown | {"img/s": f"{record['images_per_s']:.1f}", "lr": f"{record['lr']:.1e}"}


def cli() -> None:
    """Entry point: the shared runner (a user error is one ``error:`` line on rank 0, exit status 2;
    a bug keeps its traceback, 1), then a clean shutdown."""
    try:
        code = cli_status(main, (TrainError, CacheError, WeightsError, LockError, CheckpointError))
    except BaseException:  # an interrupt outside the loop's own handling
        traceback.print_exc()
        code = 1
    release_held_locks()  # before os._exit below, which skips atexit
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        runtime.shutdown()
        # gloo can abort in its destructors at interpreter exit; the run is over, so leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    cli()
