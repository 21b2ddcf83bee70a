"""Train SFD (Semantic-First Diffusion) on a latent cache: the single-file DDP trainer.

Reads top to bottom in fixed sections (../shared/STYLE.md): config → distributed init → seeds and
precision policy → data → model → EMA → optimizer → compile → DDP → resume → loop → cleanup. The
defaults are the authors' released recipe (method.md §6, the presets in sfd/config.py); what we
do differently fixes their bugs (method.md §12.3): the run is seeded (9), the model is wrapped
in DDP once (10), resume restores everything including AdamW's moments and picks the latest
checkpoint by step number (11), gradient checkpointing is a working switch (12), and REPA counts
whether or not the cosine loss is on (1, in sfd.diffusion.sfd_loss).

Determinism across GPU counts: the times, the noise and the class-dropout decisions of a step are
drawn for the whole global batch from a generator seeded by (seed, step), and rank r takes the
rows at offsets r, r+W, r+2W, ... — the same items the cache reader hands it (in every mode). So a
run on W processes matches a run on one process up to the order of float reductions, and a
resumed run continues exactly where the interrupted one stopped.

Run directory: config.json (the resolved config), metrics.jsonl (one line per log interval),
checkpoints/<step:07d>/{model,ema}.safetensors + state.pt, samples/ (EMA grids, if a texture VAE
is given). Resume = run the same command again.

Examples:
    # the CPU demo on a tiny cache
    python train/main.py --preset tiny --cache data/demo-cache --out-dir runs/tiny
    # one node, 8 GPUs, the authors' XL/1 recipe (re-run the same command to resume)
    torchrun --standalone --nproc_per_node=8 train/main.py --preset sfd-xl --cache data/imagenet256-sfd
    # two nodes (run on each; HEAD = the first node's address)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500 \\
        train/main.py --preset sfd-xxl --cache /shared/imagenet256-sfd --out-dir /shared/runs/sfd-xxl
    # fine-tune from the authors' released weights, later recipe
    torchrun --standalone --nproc_per_node=8 train/main.py --preset sfd-xl-lr2e-4 \\
        --cache data/imagenet256-sfd --init-from weights/sfd_xl_4m.pt
    # print the resolved config and derived numbers, then exit
    python train/main.py --preset sfd-xl -o global_batch=512 -o micro_batch=32 --dry-run
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from sfd.checkpoint import (
    WeightsError,
    list_checkpoints,
    load_state_dict_strict,
    load_tensors,
    load_training_state,
    read_safetensors_metadata,
    save_training_checkpoint,
)
from sfd.config import TRAIN_PRESETS, ConfigError, TrainConfig, to_dict, to_json, train_preset
from sfd.data.cache import CacheError, LatentCache
from sfd.data.reader import LatentBatch, LatentCacheReader
from sfd.diffusion import AsyncClock, LossTerms, noise_composite, sample_training_times, sfd_loss
from sfd.models.lightningdit import ROPE_BUFFERS, LightningDiT, count_params, load_lightningdit
from sfd.repa_targets import RepaTargets, check_repa_targets

LOSS_KEYS = ("total", "mse", "cos", "repa")
SAMPLE_GRID_SIZE = 16  # images per periodic EMA grid (labels 0, 1, 2, ... cycling over classes)


class TrainError(RuntimeError):
    """The run cannot start (or go on) as configured; the message says what to change."""


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="train/main.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
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
    return ap.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    cfg = train_preset(args.preset, *args.override)
    for field, value in (("cache", args.cache), ("out_dir", args.out_dir), ("init_from", args.init_from)):
        if value is not None:
            cfg = dataclasses.replace(cfg, **{field: value})
    return cfg


# ---------------------------------------------------------------------------------------------
# Distributed


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized: bool  # a process group exists (launched by torchrun)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(connect: bool = True) -> Dist:
    """Rank, world size and device from torchrun's environment; NCCL on GPUs, gloo on CPU."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if launched and connect:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return Dist(rank, world_size, local_rank, device, launched and connect)


def all_ranks_sum(x: Tensor, d: Dist) -> Tensor:
    if d.initialized and d.world_size > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def barrier(d: Dist) -> None:
    if d.initialized and d.world_size > 1:
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# Validation: every mismatch is found before the first step


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


def check_model_config(cfg: TrainConfig) -> None:
    m = cfg.model
    problems = []
    try:
        AsyncClock(cfg.delta_t, m.semantic_chans)
    except ValueError as e:
        problems.append(str(e))
    if cfg.delta_t != m.semfirst_delta_t:
        # The model stores the Δt it was trained with; samplers read it back (sfd.generate.clock_for).
        problems.append(
            f"delta_t={cfg.delta_t} but model.semfirst_delta_t={m.semfirst_delta_t} (stored with the weights "
            f"for sampling); set both: -o delta_t={cfg.delta_t} -o model.semfirst_delta_t={cfg.delta_t}"
        )
    if not cfg.use_semantic and (m.semantic_chans != 0 or cfg.delta_t != 0):
        problems.append(
            f"use_semantic=false trains on the texture channels only: set model.semantic_chans=0 (now "
            f"{m.semantic_chans}), delta_t=0 and model.semfirst_delta_t=0 (now {cfg.delta_t}, {m.semfirst_delta_t})"
        )
    if uses_repa(cfg) and not m.use_repa:
        problems.append(f"repa_weight={cfg.repa_weight} but model.use_repa=false: set repa_weight=0 or model.use_repa=true")
    if cfg.max_steps < 0 or cfg.log_every <= 0 or cfg.ckpt_every < 0 or cfg.sample_every < 0:
        problems.append("max_steps, ckpt_every and sample_every must be >= 0 and log_every > 0")
    if cfg.init_from and not Path(cfg.init_from).is_file():
        problems.append(f"init_from: no weight file at '{cfg.init_from}'")
    if problems:
        raise TrainError("invalid run config:\n  " + "\n  ".join(problems))


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


def check_cache(cfg: TrainConfig, cache: LatentCache, world_size: int, per_rank: int) -> None:
    """The cache must fit the model: channels, latent size, classes, REPA targets, batch."""
    m, layout = cfg.model, cache.layout
    (ct, h, w), (cs, hs, ws) = layout.texture_shape, layout.semantic_shape
    problems = []
    if not cfg.use_semantic:
        # The texture channels come first in every cache row; the semantic ones are left unread.
        if ct != m.in_channels:
            problems.append(
                f"use_semantic=false: cache latents have {ct} texture channels, model.in_channels={m.in_channels}"
            )
    elif ct + cs != m.in_channels:
        problems.append(
            f"cache latents have {ct} texture + {cs} semantic = {ct + cs} channels, model.in_channels={m.in_channels}"
        )
    if cfg.use_semantic and cs != m.semantic_chans:
        problems.append(f"cache has {cs} semantic channels, model.semantic_chans={m.semantic_chans}")
    if (h, w) != (hs, ws) or (h, w) != (m.input_size, m.input_size):
        problems.append(
            f"cache latents are {h}x{w} (texture) / {hs}x{ws} (semantic), model.input_size={m.input_size}"
        )
    labels, valid = cache.labels(), cache.valid()
    top = int(labels[valid].max()) if valid.any() else -1
    if top >= m.num_classes:
        problems.append(f"cache labels reach {top}, but model.num_classes={m.num_classes}")
    for key in ("class_names", "num_classes"):
        if key in cache.attrs:
            n = len(cache.attrs[key]) if key == "class_names" else int(cache.attrs[key])
            if n != m.num_classes:
                problems.append(f"cache has {n} classes ({key}), model.num_classes={m.num_classes}")
    if uses_repa(cfg) and m.use_repa and cfg.repa_targets == "semvae":  # [reader #13: REPA target source]
        problems += check_repa_targets(cfg.repa_targets, cache, (m.input_size // m.patch_size) ** 2, m.repa_target_dim)
    elif uses_repa(cfg) and m.use_repa:
        tokens = (m.input_size // m.patch_size) ** 2
        if not cache.has_dino:
            problems.append(
                f"repa_weight={cfg.repa_weight} needs REPA targets, but the cache at {cache.path} has none "
                "(encoded without DINO targets): set repa_weight=0 (-o repa_weight=0), decode them from the "
                "semantic latents (-o repa_targets=semvae) or re-encode with targets"
            )
        elif tuple(layout.dino_shape) != (tokens, m.repa_target_dim):
            problems.append(
                f"cache REPA targets are {tuple(layout.dino_shape)} (tokens, dim), the model needs "
                f"({tokens}, {m.repa_target_dim}) (tokens = (input_size/patch_size)², model.repa_target_dim)"
            )
    items_per_rank = int(valid.sum()) // world_size
    if per_rank > items_per_rank:
        problems.append(
            f"per-rank batch {per_rank} exceeds the {items_per_rank} valid rows each of {world_size} ranks gets per epoch"
        )
    if problems:
        raise TrainError(f"cache {cache.path} does not fit the run config:\n  " + "\n  ".join(problems))


def check_resume(cfg: TrainConfig, ckpt_dir: Path) -> list[str]:
    """Refuse a checkpoint of another model; return notes on other fields that changed."""
    meta = read_safetensors_metadata(ckpt_dir / "model.safetensors")
    saved = json.loads(meta["config"])
    now = to_dict(cfg)
    if saved.get("model") != now["model"]:
        diffs = [
            f"model.{k}: checkpoint {saved['model'].get(k)!r}, now {v!r}"
            for k, v in now["model"].items()
            if saved.get("model", {}).get(k) != v
        ]
        raise TrainError(
            f"{ckpt_dir} was trained with another model config:\n  " + "\n  ".join(diffs)
            + "\nUse the same model settings to resume, or another --out-dir to start a new run"
        )
    return [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in now.items() if k != "model" and saved.get(k) != v]


# ---------------------------------------------------------------------------------------------
# The optimisation step


def step_seed(seed: int, step: int) -> int:
    """Seed of the step's draws: a hash of (seed, step), so any step can be redrawn on resume."""
    digest = hashlib.blake2b(f"sfd-train:{int(seed)}:{int(step)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


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
    same decision, then AdamW and the EMA update — or neither, if any rank saw a NaN/inf.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        net: nn.Module,
        model: LightningDiT,
        ema: LightningDiT,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[..., LossTerms],
        d: Dist,
        micro_batch: int,
        autocast_dtype: torch.dtype | None,
        repa_targets: RepaTargets | None = None,
    ) -> None:
        self.cfg, self.net, self.optimizer, self.loss_fn, self.d = cfg, net, optimizer, loss_fn, d
        self.micro_batch = micro_batch
        self.autocast_dtype = autocast_dtype
        self.use_repa = uses_repa(cfg)
        self.repa_targets = repa_targets
        trainable = [(p, e) for p, e in zip(model.parameters(), ema.parameters()) if p.requires_grad]
        self.params = [p for p, _ in trainable]
        self.ema_params = [e for _, e in trainable]

    def draws(self, step: int) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """(t_tex, t_sem, x0, drop) for the whole global batch of ``step`` (method.md §4.2)."""
        cfg, m, device = self.cfg, self.cfg.model, self.d.device
        gen = torch.Generator(device=device).manual_seed(step_seed(cfg.seed, step))
        B = cfg.global_batch
        t_tex, t_sem = sample_training_times(
            B, cfg.delta_t, generator=gen, device=device, mean=cfg.time_mean, std=cfg.time_std
        )
        x0 = torch.randn((B, m.in_channels, m.input_size, m.input_size), generator=gen, device=device)
        # Label dropout decided here, not inside the model, so it is seeded and rank-independent.
        drop = None
        if m.class_dropout_prob > 0:
            drop = (torch.rand(B, generator=gen, device=device) < m.class_dropout_prob).long()
        return t_tex, t_sem, x0, drop

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.d.device.type, dtype=self.autocast_dtype)

    def __call__(self, batch: LatentBatch, step: int, stop_requested: bool = False) -> StepResult:
        cfg, d, m = self.cfg, self.d, self.cfg.model
        t_tex, t_sem, x0, drop = self.draws(step)
        # Rank r's k-th item is global item r + kW (the reader's order, in every mode).
        mine = torch.arange(d.rank, cfg.global_batch, d.world_size, device=d.device)
        # (b, C, H, W); without semantic channels only the leading texture channels are trained on.
        x1 = (batch.x if cfg.use_semantic else batch.x[:, : m.in_channels]).to(d.device, non_blocking=True)
        y = batch.y.to(d.device, non_blocking=True)
        # [reader #13] stored tokens (cast to fp32 on the device) or decoded by the SemVAE, no grad.
        repa_target = None
        if self.use_repa:
            repa_target = (
                self.repa_targets(batch) if self.repa_targets is not None
                else batch.repa.to(d.device, non_blocking=True).float()  # stored, when no source is given
            )
        accum = len(mine) // self.micro_batch
        sums = torch.zeros(len(LOSS_KEYS), device=d.device)
        for a in range(accum):
            sel = slice(a * self.micro_batch, (a + 1) * self.micro_batch)
            g = mine[sel]
            x_t, target, _ = noise_composite(x1[sel], t_tex[g], t_sem[g], m.semantic_chans, x0=x0[g])
            # DDP all-reduces the gradients on the last micro-batch only.
            sync = a == accum - 1 or not isinstance(self.net, DDP)
            with contextlib.nullcontext() if sync else self.net.no_sync():
                with self.autocast():
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

        if cfg.grad_clip > 0:
            grad_norm = nn.utils.clip_grad_norm_(self.params, cfg.grad_clip, foreach=True)
        else:
            grad_norm = nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None], foreach=True)
        bad = ~(torch.isfinite(sums).all() & torch.isfinite(grad_norm))
        flags = torch.stack([torch.tensor(float(stop_requested), device=d.device), bad.float()])
        # One collective per step: the mean losses, and every rank's stop request and NaN flag.
        shared = all_ranks_sum(torch.cat([sums, flags]), d).tolist()
        losses = {k: v / d.world_size for k, v in zip(LOSS_KEYS, shared)}
        skipped = shared[-1] > 0
        if not skipped:
            self.optimizer.step()
            # EMA every step (method.md §6): ema ← ema + (1 − decay)·(θ − ema), one foreach kernel.
            torch._foreach_lerp_(self.ema_params, self.params, 1.0 - cfg.ema_decay)
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(losses, float(grad_norm), skipped, shared[-2] > 0)


# ---------------------------------------------------------------------------------------------
# Small helpers of the loop


class StopSignals:
    """SIGTERM/SIGINT set a flag: the current step finishes, a checkpoint is saved, the run exits.

    A second signal of the same kind gets the previous handler (Ctrl-C twice aborts at once).
    """

    def __init__(self, say: Callable[[str], None]) -> None:
        self.received: str | None = None
        self.say = say
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self.handle)

    def handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name
        signal.signal(signum, self.previous[signum])
        self.say(f"{self.received}: finishing this step, saving a checkpoint, then exiting (again to abort)")

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()


def rng_state(device: torch.device) -> dict[str, Any]:
    # The step draws are stateless (seeded by (seed, step)); the global generators are saved so
    # any other use of them (an added dropout, say) also resumes exactly.
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def reader_state_for(saved: dict[str, Any], world_size: int) -> dict[str, Any]:
    """The reader position under ``world_size`` ranks (the reader's order is world-size independent)."""
    if saved["world_size"] == world_size:
        return saved
    consumed = saved["index"] * saved["world_size"]  # global positions of this epoch already used
    if "order" not in saved or consumed % world_size:
        raise TrainError(
            f"the checkpoint's data position was saved with {saved['world_size']} ranks; resuming on {world_size} "
            f"ranks needs a position divisible by {world_size} (and a checkpoint of the world-size-independent reader)"
        )
    return {**saved, "world_size": world_size, "index": consumed // world_size}


def uses_repa(cfg: TrainConfig) -> bool:
    """REPA is on when it has a weight and a target source ([reader #13] repa_targets=none turns it off)."""
    return cfg.repa_weight > 0 and cfg.repa_targets != "none"


def truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines past ``step``: a killed run may have logged steps its checkpoint lacks."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))


def find_decoder(cfg: TrainConfig, cache: LatentCache) -> tuple[nn.Module | None, str]:
    """The texture decoder for sample grids, or None and the reason why there are no PNGs.

    The cache records its texture encoder: stand-in and random-init encoders are rebuilt without
    files; a real VAE is loaded from ``texture_vae`` (or its default path) and must carry the
    SHA-256 recorded at encoding time.
    """
    from sfd.models.standins import build_texture_decoder

    info = cache.attrs.get("texture_encoder")
    if not isinstance(info, dict):
        return None, "the cache records no texture encoder; EMA sample grids are logged as latent statistics"
    if info.get("kind") == "weights" and not cfg.texture_vae:
        return None, "no texture_vae given (-o texture_vae=PATH); EMA sample grids are logged as latent statistics"
    decoder = build_texture_decoder(cache.attrs, cfg.texture_vae or None)
    return decoder, f"decoder {info.get('name', info.get('kind'))}"


@torch.no_grad()
def sample_grid(ema: LightningDiT, cfg: TrainConfig, step: int, run_dir: Path, decoder: nn.Module | None) -> dict[str, Any]:
    """Sample the EMA model on fixed seeds; write a PNG grid if a decoder exists. Rank 0 only."""
    from sfd.generate import (
        SamplingConfig,
        generate_latents,
        latents_to_images,
        load_texture_stats,
        make_grid,
    )

    n, m = SAMPLE_GRID_SIZE, cfg.model
    labels = [i % m.num_classes for i in range(n)]
    # Heun on the exact three-phase grid: 50 NFE, plenty for a progress picture.
    latents, nfe = generate_latents(ema, labels, range(n), SamplingConfig(method="heun", num_steps=25))
    tex, sem = latents[:, : m.texture_chans], latents[:, m.texture_chans :]
    record: dict[str, Any] = {
        "event": "sample", "step": step, "nfe": nfe,
        "texture_mean": tex.mean().item(), "texture_std": tex.std().item(),
    }
    if m.semantic_chans > 0:
        record |= {"semantic_mean": sem.mean().item(), "semantic_std": sem.std().item()}
    if decoder is not None:
        stats = load_texture_stats(cfg.cache)
        images = latents_to_images(latents, stats, decoder.to(latents.device), m.texture_chans)
        path = run_dir / "samples" / f"{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        make_grid(images, nrow=8, captions=[str(c) for c in labels]).save(path)
        record["png"] = str(path)
    return record


def window_means(window: list[StepResult]) -> dict[str, float | None]:
    good = [r for r in window if not r.skipped]
    out: dict[str, float | None] = {k: None for k in (*LOSS_KEYS, "grad_norm")}
    if good:
        for k in LOSS_KEYS:
            out[k] = sum(r.losses[k] for r in good) / len(good)
        out["grad_norm"] = sum(r.grad_norm for r in good) / len(good)
    return out


# ---------------------------------------------------------------------------------------------
# The trainer


def main(argv: list[str] | None = None) -> None:
    # -- config ---------------------------------------------------------------------------------
    args = parse_args(argv)
    try:
        cfg = resolve_config(args)
    except ConfigError as e:
        raise TrainError(str(e)) from e
    check_model_config(cfg)
    m = cfg.model
    run_dir = Path(cfg.out_dir)

    # -- distributed init -----------------------------------------------------------------------
    d = init_distributed(connect=not args.dry_run)
    say = (lambda msg: print(msg, flush=True)) if d.is_main else (lambda msg: None)
    per_rank, micro, accum = batch_split(cfg, d.world_size)
    cache = None if args.dry_run and not Path(cfg.cache).exists() else open_cache(cfg)
    if cache is not None:
        check_cache(cfg, cache, d.world_size, per_rank)
    ckpts = list_checkpoints(run_dir)
    if d.initialized and d.world_size > 1:
        # Every rank must resume from the same step: the run dir has to be on a shared filesystem.
        found = torch.tensor([ckpts[-1][0] if ckpts else -1] * 2, device=d.device)
        found[1].neg_()
        dist.all_reduce(found, op=dist.ReduceOp.MAX)
        if int(found[0]) != -int(found[1]):
            raise TrainError(
                f"ranks see different checkpoints in {run_dir} (latest steps from {-int(found[1])} to "
                f"{int(found[0])}); put --out-dir on a filesystem shared by all nodes"
            )
    resume_notes = check_resume(cfg, ckpts[-1][1]) if ckpts else []

    num_valid = int(cache.valid().sum()) if cache is not None else None
    steps_per_epoch = (num_valid // d.world_size) // per_rank if num_valid is not None else None
    derived = {
        "world_size": d.world_size,
        "device": str(d.device),
        "global_batch": cfg.global_batch,
        "per_rank_batch": per_rank,
        "micro_batch": micro,
        "grad_accumulation": accum,
        "images_per_step": cfg.global_batch,
        "cache_rows": num_valid,
        "steps_per_epoch": steps_per_epoch,
        "epochs": round(cfg.max_steps / steps_per_epoch, 2) if steps_per_epoch else None,
        "total_images": cfg.max_steps * cfg.global_batch,
        "params": count_params(m),
        "params_with_repa_projector": count_params(m, include_repa=m.use_repa),
        "resume_from": str(ckpts[-1][1]) if ckpts else None,
    }
    if args.dry_run:
        say(to_json(cfg))
        say("derived:\n" + "\n".join(f"  {k}: {v}" for k, v in derived.items()))
        if cache is None:
            say(f"  (no cache at {cfg.cache}: steps per epoch unknown, cache not validated)")
        return
    assert cache is not None

    # -- seeds and precision policy ---------------------------------------------------------------
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (the authors never seed, §12.3 bug 9)
    on_cuda = d.device.type == "cuda"
    if on_cuda:
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
    # bf16 autocast on GPUs only; fp32 master weights and optimizer state, loss in fp32.
    autocast_dtype = torch.bfloat16 if cfg.precision == "bf16" and on_cuda else None
    policy = {
        "autocast": "bf16" if autocast_dtype else f"off (fp32{', CPU' if not on_cuda else ''})",
        "tf32": cfg.tf32 and on_cuda,
        "compile": "model + loss, before DDP" if cfg.compile else "off",
        "optimizer": f"AdamW ({'fused' if on_cuda else 'foreach'})",
        "ema": "foreach lerp every step",
        "fused_kernels": "requested, but sfd/kernels has none yet: eager ops" if cfg.fused_kernels else "off",
        "grad_checkpointing": cfg.grad_checkpointing,
        "ddp": f"{'nccl' if on_cuda else 'gloo'}, {d.world_size} ranks" if d.world_size > 1 else "off (1 process)",
    }

    # -- data -------------------------------------------------------------------------------------
    use_repa = uses_repa(cfg)
    reader = LatentCacheReader(
        cache, seed=cfg.seed, rank=d.rank, world_size=d.world_size, mode=cfg.data_mode,
        load_dino=use_repa and cfg.repa_targets == "stored",
    )
    repa_targets = RepaTargets(cfg.repa_targets if use_repa else "none", cache, d.device, autocast_dtype)

    # -- model ------------------------------------------------------------------------------------
    model = LightningDiT(m)
    ema_start = None
    if cfg.init_from:
        # The authors' full checkpoints hold {model, ema, opt, config}: the raw weights train on and
        # their EMA continues. A bare state dict (their released EMA-only files) starts both.
        model.load_state_dict(load_lightningdit(cfg.init_from, m, prefer_ema=False).state_dict())
        ema_start = load_lightningdit(cfg.init_from, m, prefer_ema=True).state_dict()
    model.grad_checkpointing = cfg.grad_checkpointing
    if not use_repa and m.use_repa:
        # Kept for checkpoint compatibility but untrained: DDP needs a gradient for every trainable
        # parameter, and the projector gets none without the REPA loss.
        model.repa_projector.requires_grad_(False)
    model.to(d.device).train()

    # -- EMA --------------------------------------------------------------------------------------
    # A copy of the step-0 weights, which are the same on every rank (same seed or same file).
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    if ema_start is not None:
        ema.load_state_dict(ema_start)

    # -- optimizer --------------------------------------------------------------------------------
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
        weight_decay=cfg.weight_decay, fused=True if on_cuda else None,
    )

    # -- compile ----------------------------------------------------------------------------------
    loss_fn = functools.partial(
        sfd_loss, semantic_chans=m.semantic_chans, semantic_weight=cfg.semantic_weight,
        use_cosine_loss=cfg.use_cosine_loss, repa_weight=cfg.repa_weight, repa_mode=cfg.repa_mode,
        mask_clamped=cfg.mask_clamped,
    )
    net: nn.Module = model  # `model` stays the unwrapped handle: checkpoints never see prefixes
    if cfg.compile:
        net = torch.compile(model)
        loss_fn = torch.compile(loss_fn)

    # -- DDP --------------------------------------------------------------------------------------
    if d.world_size > 1:
        # Buffers are constant tables (position codes, RoPE): nothing to broadcast per step.
        net = DDP(net, device_ids=[d.local_rank] if on_cuda else None, broadcast_buffers=False)
    train_step = TrainStep(cfg, net, model, ema, optimizer, loss_fn, d, micro, autocast_dtype, repa_targets)

    # -- resume -----------------------------------------------------------------------------------
    step, nan_total, nan_run = 0, 0, 0
    metrics_path = run_dir / "metrics.jsonl"
    if ckpts:
        start_dir = ckpts[-1][1]
        for module, name in ((model, "model"), (ema, "ema")):
            load_state_dict_strict(
                module, load_tensors(start_dir / f"{name}.safetensors"), optional=ROPE_BUFFERS,
                source=f"'{start_dir / name}.safetensors'",
            )
        state = load_training_state(start_dir)
        try:
            optimizer.load_state_dict(state["optimizer"])
        except ValueError as e:
            raise TrainError(f"{start_dir}: optimizer state does not fit (was repa_weight switched on/off?): {e}") from e
        reader.load_state_dict(reader_state_for(state["reader"], d.world_size))
        set_rng_state(state["rng"], d.device)
        step, nan_total, nan_run = state["step"], state["nan_skips_total"], state["nan_skips_consecutive"]
        if cfg.init_from:
            resume_notes.append(f"init_from {cfg.init_from} ignored: resuming from the checkpoint")
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(to_json(cfg) + "\n")
        truncate_metrics(metrics_path, step)
    start_step = step

    say(f"SFD training: preset {args.preset} ({cfg.model_name}), run dir {run_dir}")
    say("derived: " + ", ".join(f"{k}={v}" for k, v in derived.items()))
    say("performance policy: " + ", ".join(f"{k}={v}" for k, v in policy.items()))
    say(f"REPA targets: {repa_targets.how}" if use_repa else "REPA off")
    say(f"resuming from step {step} ({ckpts[-1][1]})" if ckpts else "starting from step 0")
    for note in resume_notes:
        say(f"  changed since the checkpoint: {note}")
    decoder = None
    if cfg.sample_every > 0 and d.is_main:
        decoder, why = find_decoder(cfg, cache)
        say(f"sample grids every {cfg.sample_every} steps: {why}")

    # -- loop -------------------------------------------------------------------------------------
    signals = StopSignals(say)
    signals.install()
    metrics = open(metrics_path, "a") if d.is_main else None
    pbar = tqdm(total=cfg.max_steps, initial=step, disable=not d.is_main, dynamic_ncols=True, mininterval=1.0)
    batches: Iterator[LatentBatch] = reader.batches(per_rank)
    reader_state = reader.state_dict()  # position after the last batch that was trained on
    window: list[StepResult] = []
    window_start = time.perf_counter()
    stop = False
    try:
        while True:
            last = step >= cfg.max_steps
            # Periodic jobs first, so the final step needs no special case.
            if window and (step % cfg.log_every == 0 or last or stop):
                seconds = time.perf_counter() - window_start
                record = {
                    "event": "train", "step": step, "images": step * cfg.global_batch,
                    **window_means(window),
                    "lr": optimizer.param_groups[0]["lr"],
                    "images_per_s": len(window) * cfg.global_batch / seconds,
                    "skipped": sum(r.skipped for r in window), "skipped_total": nan_total,
                }
                if metrics is not None:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                pbar.set_postfix(
                    {k: f"{record[k]:.4f}" for k in (*LOSS_KEYS, "grad_norm") if record[k] is not None}
                    | {"img/s": f"{record['images_per_s']:.1f}", "lr": f"{record['lr']:.1e}"}, refresh=False,
                )
                window, window_start = [], time.perf_counter()
            if cfg.sample_every and d.is_main and step > start_step and (step % cfg.sample_every == 0 or last):
                record = sample_grid(ema, cfg, step, run_dir, decoder)
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            if step > start_step and ((cfg.ckpt_every and step % cfg.ckpt_every == 0) or last or stop):
                if d.is_main:
                    state = {
                        "step": step, "images_seen": step * cfg.global_batch,
                        "optimizer": optimizer.state_dict(), "reader": reader_state,
                        "rng": rng_state(d.device), "world_size": d.world_size,
                        "nan_skips_total": nan_total, "nan_skips_consecutive": nan_run,
                    }
                    path = save_training_checkpoint(
                        run_dir, step, model=model, ema=ema, state=state, config_json=to_json(cfg, indent=None),
                        keep_last=cfg.keep_last,
                    )
                    pbar.write(f"step {step}: checkpoint {path}")
                barrier(d)
            if last or stop:
                break

            # The optimisation step.
            batch = next(batches)
            reader_state = reader.state_dict()
            result = train_step(batch, step, stop_requested=signals.received is not None)
            step += 1
            pbar.update(1)
            window.append(result)
            stop = result.stop
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
        pbar.close()
        signals.restore()
        reader.close()
        if metrics is not None:
            metrics.close()
    say(outcome)


def cli() -> None:
    """Entry point: run, report a configuration error in one message, exit cleanly."""
    try:
        main()
        code = 0
    except (TrainError, CacheError, WeightsError) as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        code = 2
    except SystemExit as e:  # --help, argparse errors
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        # gloo can abort in its destructors at interpreter exit; the run is over, so leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    cli()
