"""The trainer's checks and bookkeeping, so that ``train/main.py`` reads as the training itself.

- validation before the first step: :func:`check_run_config`, :func:`open_cache`,
  :func:`check_cache`, :func:`batch_split`, :func:`check_resume` — every mismatch in one
  :class:`TrainError` that says what to change;
- what a checkpoint stores besides weights: :func:`run_config_dict`,
  :func:`checkpoint_latent_stats`, :func:`rng_state`, :func:`reader_state_for`;
- the loop's helpers: :class:`StopSignals` (SIGTERM/SIGINT → save and exit),
  :func:`truncate_metrics`, :func:`window_means`, :func:`find_decoder` and :func:`sample_grid`
  (periodic EMA grids).
"""

from __future__ import annotations

import dataclasses
import json
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sfd.checkpoint import KNOWN_WEIGHTS, WEIGHTS_DIR, latent_stats_metadata, read_checkpoint
from sfd.config import SamplingConfig, TrainConfig, to_dict
from sfd.data.cache import CacheError, LatentCache
from sfd.diffusion import AsyncClock
from sfd.models.lightningdit import LightningDiT
from sfd.pixels import latents_to_images, load_texture_stats, make_grid
from sfd.repa_targets import REPA_TARGET_SOURCES
from sfd.samplers import generate_latents

LOSS_KEYS = ("total", "mse", "cos", "repa")
SAMPLE_GRID_SIZE = 16  # images per periodic EMA grid (labels 0, 1, 2, ... cycling over classes)


class TrainError(RuntimeError):
    """The run cannot start (or go on) as configured; the message says what to change."""


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


def lr_at(cfg: TrainConfig, step: int) -> float:
    """The learning rate of optimisation step ``step`` (0-based): ``cfg.lr``, falling linearly to 0 at
    ``max_steps`` from ``lr_decay_start · max_steps`` on (``lr_decay_start = 1``: constant, the authors')."""
    start = cfg.lr_decay_start * cfg.max_steps
    if cfg.lr_decay_start >= 1.0 or step < start:
        return cfg.lr
    return cfg.lr * max(cfg.max_steps - step, 0) / max(cfg.max_steps - start, 1e-9)


def check_run_config(cfg: TrainConfig) -> None:
    m = cfg.model
    problems = []
    try:
        AsyncClock(cfg.delta_t, m.semantic_chans, m.semfirst_schedule)
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
    if uses_repa(cfg) and m.use_repa:  # the source checks its own needs (sfd/repa_targets.py)
        tokens = (m.input_size // m.patch_size) ** 2
        problems += REPA_TARGET_SOURCES[cfg.repa_targets].check(cache, tokens, m.repa_target_dim)
    items_per_rank = int(valid.sum()) // world_size
    if per_rank > items_per_rank:
        problems.append(
            f"per-rank batch {per_rank} exceeds the {items_per_rank} valid rows each of {world_size} ranks gets per epoch"
        )
    if problems:
        raise TrainError(
            f"cache {cache.path} does not fit the run config:\n  " + "\n  ".join(problems)
            + "\nFix: leave the model's data-shaped fields (" + ", ".join(f"model.{k}" for k in DATA_SHAPED)
            + ") unset so they come from the cache, change the other settings named above, or use a matching cache"
        )


# Model fields fixed by the data, not by the architecture: taken from the cache unless given.
DATA_SHAPED = ("in_channels", "semantic_chans", "input_size", "num_classes", "repa_target_dim")


def fit_to_cache(cfg: TrainConfig, cache: LatentCache, given: Sequence[str] = ()) -> tuple[TrainConfig, list[str]]:
    """``cfg`` with the model's data-shaped fields (latent channels and size, classes, REPA target
    width) read from the cache, except those set explicitly (``given``: the ``-o`` keys, e.g.
    ``model.num_classes``); also returns a note per changed field. The architecture (depth,
    width, patch size) stays the preset's, so one preset trains on any cache of the same kind."""
    m, layout = cfg.model, cache.layout
    (ct, h, _), (cs, _, _) = layout.texture_shape, layout.semantic_shape
    want: dict[str, int] = {"in_channels": ct + cs if cfg.use_semantic else ct, "input_size": h}
    if cfg.use_semantic:
        want["semantic_chans"] = cs
    if "class_names" in cache.attrs:
        want["num_classes"] = len(cache.attrs["class_names"])
    elif "num_classes" in cache.attrs:
        want["num_classes"] = int(cache.attrs["num_classes"])
    if cache.has_dino:
        want["repa_target_dim"] = int(layout.dino_shape[1])
    changes = {k: v for k, v in want.items() if f"model.{k}" not in given and getattr(m, k) != v}
    if not changes:
        return cfg, []
    notes = [f"model.{k}: {getattr(m, k)} -> {v} (from the cache)" for k, v in changes.items()]
    return dataclasses.replace(cfg, model=dataclasses.replace(m, **changes)), notes


def check_resume(cfg: TrainConfig, ckpt_dir: Path) -> list[str]:
    """Refuse a checkpoint of another model; return notes on other fields that changed."""
    ckpt = read_checkpoint(ckpt_dir, prefer_ema=False, weights=False)
    saved_model, now_model = to_dict(ckpt.model_config), to_dict(cfg.model)
    if saved_model != now_model:
        diffs = [f"model.{k}: checkpoint {saved_model.get(k)!r}, now {v!r}" for k, v in now_model.items() if saved_model.get(k) != v]
        raise TrainError(
            f"{ckpt_dir} was trained with another model config:\n  " + "\n  ".join(diffs)
            + "\nUse the same model settings to resume, or another --out-dir to start a new run"
        )
    saved, now = ckpt.run_config or {}, run_config_dict(cfg)
    return [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in now.items() if saved.get(k) != v]


def run_config_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The run config as stored in checkpoints: everything but the model (stored beside it)."""
    return {k: v for k, v in to_dict(cfg).items() if k != "model"}


def checkpoint_latent_stats(cache: LatentCache) -> dict[str, Any]:
    """What a sampler needs from the cache, stored with every checkpoint (sfd/checkpoint.py)."""
    encoder = cache.attrs.get("texture_encoder")
    return latent_stats_metadata(
        cache.stats(), source=f"cache {cache.layout.index_sha256[:16]}",
        texture_encoder=encoder if isinstance(encoder, dict) else None,
    )


# ---------------------------------------------------------------------------------------------
# The loop's helpers


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


def truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines past ``step``: a killed run may have logged steps its checkpoint lacks."""
    if not path.exists():
        return
    def before(line: str) -> bool:
        try:
            return json.loads(line).get("step", 0) <= step
        except ValueError:  # a line cut short by a kill
            return False

    keep = [line for line in path.read_text().splitlines() if line and before(line)]
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
    vae = cfg.texture_vae
    if info.get("kind") == "weights" and not vae:
        default = WEIGHTS_DIR / KNOWN_WEIGHTS["texture_vae"].filename  # the README's place for it
        if not default.is_file():
            return None, (f"no texture VAE at {default} (or -o texture_vae=PATH); EMA sample grids are "
                          "logged as latent statistics")
        vae = str(default)
    decoder = build_texture_decoder(cache.attrs, vae or None)
    return decoder, f"decoder {info.get('name', info.get('kind'))}"


@torch.no_grad()
def sample_grid(ema: LightningDiT, cfg: TrainConfig, step: int, run_dir: Path, decoder: nn.Module | None) -> dict[str, Any]:
    """Sample the EMA model on fixed seeds; write a PNG grid if a decoder exists. Rank 0 only."""
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


def window_means(window: Sequence[Any]) -> dict[str, float | None]:
    """Mean losses and gradient norm over the non-skipped steps of a log window."""
    good = [r for r in window if not r.skipped]
    out: dict[str, float | None] = {k: None for k in (*LOSS_KEYS, "grad_norm")}
    if good:
        for k in LOSS_KEYS:
            out[k] = sum(r.losses[k] for r in good) / len(good)
        out["grad_norm"] = sum(r.grad_norm for r in good) / len(good)
    return out


class MetricsLog:
    """The run's log: one JSON line per record in ``metrics.jsonl`` (the source of truth, plotted
    by eval/plot.py) and, with ``tensorboard=True``, the same numbers as TensorBoard scalars under
    ``<run_dir>/tb`` (and sample grids as images). Rank 0 only."""

    def __init__(self, run_dir: Path, tensorboard: bool = False) -> None:
        self.file = open(run_dir / "metrics.jsonl", "a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is None:
            return
        step, group = record["step"], record.get("event", "train")
        for key, value in record.items():
            if key not in ("step", "event") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tb.add_scalar(f"{group}/{key}", value, step)
        if record.get("png"):
            import numpy as np
            from PIL import Image

            with Image.open(record["png"]) as im:
                self.tb.add_image("samples/ema_grid", np.asarray(im.convert("RGB")), step, dataformats="HWC")
        self.tb.flush()

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def uses_repa(cfg: TrainConfig) -> bool:
    """REPA is on when it has a weight and a target source (``repa_targets=none`` turns it off)."""
    return cfg.repa_weight > 0 and REPA_TARGET_SOURCES[cfg.repa_targets].gives_targets
