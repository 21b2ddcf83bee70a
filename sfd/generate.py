"""From a checkpoint to pixels: what `sample/grid.py`, `eval/fid.py`, the trainer's sample grids
and the demo share (method.md §7, DESIGN.md §3).

- :class:`SamplingConfig` — every sampling setting in one frozen dataclass (solver, guidance,
  seed); :func:`build_velocity_fn` turns it into the guided velocity function.
- :func:`generate_latents` — composite latents for given global sample indices, each from its own
  seed (DESIGN.md §3: an image depends only on (seed, index, settings), not on batch or GPU count).
- :func:`latents_to_images` — drop the semantic channels, denormalise the texture channels
  (z = x·σ + μ, method.md §2.4, §7.1) and decode to uint8 pixels.
- :func:`make_grid` — a labelled PNG grid.
- :func:`resolve_checkpoint` / :func:`load_model` — run dir, checkpoint dir or weight file → model.
- :func:`rank_indices`, :func:`balanced_labels`, :func:`shuffled_order` — the class-balanced,
  distributed, shuffled 50K protocol of method.md §7.3.

Pure library code: no prints, no global flags (TF32 and friends are the scripts' decision).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from sfd.checkpoint import (
    WeightsError,
    file_sha256,
    list_checkpoints,
    load_tensors,
    read_safetensors_metadata,
    resolve_weights,
)
from sfd.config import ConfigError, ModelConfig, model_preset
from sfd.diffusion import (
    AsyncClock,
    VelocityFn,
    autoguidance,
    classifier_free_guidance,
    initial_noise,
    model_velocity,
    sample,
)
from sfd.models.autoencoder import to_uint8
from sfd.models.lightningdit import LightningDiT, load_lightningdit, model_config_from_json

__all__ = [
    "SamplingConfig", "build_velocity_fn", "clock_for", "generate_latents",
    "TextureStats", "load_texture_stats", "latents_to_images", "Decoder",
    "make_grid", "resolve_checkpoint", "load_model",
    "rank_indices", "balanced_labels", "shuffled_order", "AUTHORS_SHUFFLE_SEED",
    "pick_device", "add_model_args", "add_sampling_args", "sampling_config_from_args", "load_pipeline",
]

# The authors shuffle the 50K files with seed 42 before packing the npz (method.md §7.3).
AUTHORS_SHUFFLE_SEED = 42
METHODS = ("euler", "heun", "dopri5")


# ---------------------------------------------------------------------------------------------
# Sampling settings and the guided velocity


@dataclass(frozen=True)
class SamplingConfig:
    """Every setting that decides a sample besides the weights and the index (method.md §7).

    Defaults are the authors' inference configs: dopri5, atol 1e-6, rtol 1e-3, no guidance, no
    timestep shift, CFG interval start 0 (off). Guidance: ``guide_ckpt`` set → AutoGuidance with
    ``ag_scale`` (all reported guided numbers, w ≈ 1.5); otherwise ``cfg_scale`` > 1 → CFG on all
    48 channels. ``cfg_scale_tex``/``cfg_scale_sem`` override the scale of the active guidance
    per part (the authors' ``cfg_scale_tex``/``cfg_scale_sem`` flags act on both kinds).
    """

    method: str = "dopri5"  # euler | heun | dopri5
    num_steps: int | None = None  # fixed-step solvers; None = sampler default (euler 250 points, heun 50)
    atol: float = 1e-6  # dopri5
    rtol: float = 1e-3  # dopri5
    grid: str | None = None  # exact | authors; None = sampler default (euler: authors, else exact)
    shift: float | None = None  # timestep shift s (fixed-step solvers); None = off as the authors
    cfg_scale: float = 1.0  # classifier-free guidance w; 1 = off
    cfg_scale_tex: float | None = None  # per-part override of the active guidance scale
    cfg_scale_sem: float | None = None
    cfg_interval_start: float = 0.0  # guidance off while a part's time is below this; 0 = off
    interval_mode: str = "both"  # both | tex | sem: which parts the interval applies to
    ag_scale: float = 1.0  # AutoGuidance w (with guide_ckpt)
    guide_ckpt: str | None = None  # weaker guide model for AutoGuidance
    delta_t: float | None = None  # None = the Δt the model was trained with
    seed: int = 0  # per-index seeds derive from this
    bf16: bool = False  # bf16 autocast for the DiT (the authors sample in fp32/TF32, §7.1)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"sampler must be one of {METHODS}, got {self.method!r}")
        if self.grid not in (None, "exact", "authors"):
            raise ConfigError(f"grid must be exact or authors, got {self.grid!r}")
        if self.interval_mode not in ("both", "tex", "sem"):
            raise ConfigError(f"interval_mode must be both, tex or sem, got {self.interval_mode!r}")
        if self.num_steps is not None and self.num_steps < 1:
            raise ConfigError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.method == "dopri5" and (self.num_steps is not None or self.shift is not None):
            raise ConfigError("dopri5 is adaptive: num_steps and shift apply to euler/heun only")
        if self.guide_ckpt is not None and self.cfg_scale != 1.0:
            # The authors use CFG only without AutoGuidance (forward_with_cfg vs _autoguidance).
            raise ConfigError("use either CFG (cfg_scale) or AutoGuidance (guide_ckpt + ag_scale), not both")
        if self.guide_ckpt is None and self.ag_scale != 1.0:
            raise ConfigError("ag_scale needs a guide checkpoint (guide_ckpt)")

    @property
    def scales(self) -> tuple[float, float]:
        """(texture, semantic) scale of the active guidance."""
        base = self.ag_scale if self.guide_ckpt is not None else self.cfg_scale
        tex = base if self.cfg_scale_tex is None else self.cfg_scale_tex
        sem = base if self.cfg_scale_sem is None else self.cfg_scale_sem
        return tex, sem

    @property
    def guidance(self) -> str:
        """"autoguidance", "cfg" or "none" (every scale 1 is no guidance, whatever the flags)."""
        if all(s == 1.0 for s in self.scales):
            return "none"
        return "autoguidance" if self.guide_ckpt is not None else "cfg"

    def solver_options(self) -> dict[str, Any]:
        """Keyword options for :func:`sfd.diffusion.sample` (only those that are set)."""
        opts: dict[str, Any] = {}
        if self.grid is not None:
            opts["grid"] = self.grid
        if self.method == "dopri5":
            opts.update(atol=self.atol, rtol=self.rtol)
        else:
            if self.num_steps is not None:
                opts["num_steps"] = self.num_steps
            if self.shift is not None:
                opts["shift"] = self.shift
        return opts

    def describe(self) -> dict[str, Any]:
        """The settings as plain JSON values, with the derived guidance mode and scales."""
        d = asdict(self)
        d["guidance"] = self.guidance
        d["scale_tex"], d["scale_sem"] = self.scales
        return d


def clock_for(cfg: ModelConfig, sampling: SamplingConfig) -> AsyncClock:
    """The sampling clock: the model's own Δt unless overridden; Δt = 0 without semantic channels."""
    delta_t = cfg.semfirst_delta_t if sampling.delta_t is None else sampling.delta_t
    if cfg.semantic_chans == 0:
        delta_t = 0.0 if sampling.delta_t is None else delta_t
    return AsyncClock(delta_t=delta_t, semantic_chans=cfg.semantic_chans)


def _check_guide(main: ModelConfig, guide: ModelConfig) -> None:
    fields = ("in_channels", "semantic_chans", "input_size", "num_classes")
    diffs = {f: (getattr(main, f), getattr(guide, f)) for f in fields if getattr(main, f) != getattr(guide, f)}
    if diffs:
        raise ConfigError(f"guide model does not fit the main model (main, guide): {diffs}")


def build_velocity_fn(
    model: LightningDiT, sampling: SamplingConfig, guide: LightningDiT | None = None
) -> VelocityFn:
    """The (guided) velocity ``fn(x, t_tex, t_sem, y)`` for ``sampling`` (method.md §7.2)."""
    cfg = model.cfg
    fn = model_velocity(model)
    scale_tex, scale_sem = sampling.scales
    common = dict(
        semantic_chans=cfg.semantic_chans, scale_tex=scale_tex, scale_sem=scale_sem,
        interval_start=sampling.cfg_interval_start, interval_mode=sampling.interval_mode,
    )
    if sampling.guidance == "cfg":
        fn = classifier_free_guidance(fn, sampling.cfg_scale, null_class=cfg.num_classes, **common)
    elif sampling.guidance == "autoguidance":
        if guide is None:
            raise ValueError(f"AutoGuidance needs the guide model ({sampling.guide_ckpt}) to be loaded and passed")
        _check_guide(cfg, guide.cfg)
        fn = autoguidance(fn, model_velocity(guide), sampling.ag_scale, **common)
    if not sampling.bf16:
        return fn
    inner = fn

    def autocast_fn(x: Tensor, t_tex: Tensor, t_sem: Tensor, y: Tensor) -> Tensor:
        # Only the network runs in bf16; the solver state and its error control stay fp32.
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
            return inner(x, t_tex, t_sem, y).float()

    return autocast_fn


@torch.no_grad()
def generate_latents(
    model: LightningDiT,
    labels: Sequence[int] | Tensor,
    indices: Sequence[int] | Tensor,
    sampling: SamplingConfig,
    guide: LightningDiT | None = None,
) -> tuple[Tensor, int]:
    """Composite latents (B, C, H, W) float32 for global sample ``indices`` and their ``labels``.

    Noise row i comes from (sampling.seed, indices[i]) alone. With dopri5 on the exact grid the
    step size is controlled per sample, so a sample does not depend on its batch-mates; the
    authors' grid uses one batch-wide error norm and does. Returns (latents, NFE of the batch).
    """
    if model.training or (guide is not None and guide.training):
        raise ValueError("put the model (and guide) in eval mode: training mode drops labels at random")
    cfg = model.cfg
    device = next(model.parameters()).device
    y = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
    if len(y) != len(indices):
        raise ValueError(f"{len(y)} labels for {len(indices)} indices")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= cfg.num_classes):
        raise ValueError(f"labels must lie in [0, {cfg.num_classes}), got [{int(y.min())}, {int(y.max())}]")
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    x0 = initial_noise(indices, shape, sampling.seed, device=device)  # (B, C, H, W)
    fn = build_velocity_fn(model, sampling, guide)
    result = sample(
        fn, x0, y, clock_for(cfg, sampling), method=sampling.method, **sampling.solver_options()
    )
    return result.x.float(), result.nfe


# ---------------------------------------------------------------------------------------------
# Latents to pixels


@dataclass(frozen=True)
class TextureStats:
    """Per-channel statistics of the raw texture latent (method.md §2.4)."""

    mean: Tensor  # (C_tex,)
    std: Tensor  # (C_tex,)
    source: str

    @classmethod
    def identity(cls, channels: int) -> TextureStats:
        """No denormalisation: for models trained on raw latents (and untrained demos)."""
        return cls(torch.zeros(channels), torch.ones(channels), "identity")


def load_texture_stats(path: str | os.PathLike[str]) -> TextureStats:
    """Texture mean/std from a latent-cache directory or the authors' ``latents_stats.pt``.

    The authors' file is ``{'mean': [1, 32, 1, 1], 'std': [1, 32, 1, 1]}`` (method.md §2.4); a
    file with ``texture_mean``/``texture_std`` keys (as the cache stores them) works too.
    """
    p = Path(path)
    if p.is_dir():
        from sfd.data.cache import LatentCache  # zarr only when a cache is used

        stats = LatentCache.open(p).stats()
        mean, std = torch.as_tensor(stats["texture_mean"]), torch.as_tensor(stats["texture_std"])
    else:
        raw = load_tensors(p)
        if not isinstance(raw, dict):
            raise WeightsError(f"'{p}' holds a {type(raw).__name__}, not a dict of latent statistics")
        for m_key, s_key in (("mean", "std"), ("texture_mean", "texture_std")):
            if m_key in raw and s_key in raw:
                mean, std = torch.as_tensor(raw[m_key]), torch.as_tensor(raw[s_key])
                break
        else:
            raise WeightsError(
                f"'{p}' has keys {sorted(raw)}; expected 'mean'/'std' (the authors' latents_stats.pt) "
                "or 'texture_mean'/'texture_std'"
            )
    mean, std = mean.float().reshape(-1), std.float().reshape(-1)
    if mean.shape != std.shape or not bool((std > 0).all()):
        raise WeightsError(f"'{p}': bad texture statistics (mean {tuple(mean.shape)}, std {tuple(std.shape)}, std > 0 required)")
    return TextureStats(mean, std, str(p))


class Decoder(Protocol):
    def decode(self, z: Tensor) -> Tensor:  # (B, C_tex, h, w) → (B, 3, H, W) in [-1, 1]
        ...


@torch.no_grad()
def latents_to_images(
    latents: Tensor, stats: TextureStats, decoder: Decoder, texture_chans: int
) -> Tensor:
    """Composite latents (B, C, h, w) → uint8 images (B, H, W, 3) on the CPU.

    The semantic channels are discarded (method.md §7.1); the texture channels are mapped back to
    the VAE's scale, z = x·σ + μ (latent_multiplier 1), decoded and quantised as the authors do.
    """
    if stats.mean.numel() != texture_chans:
        raise ValueError(f"texture statistics have {stats.mean.numel()} channels, the model {texture_chans}")
    param = next(iter(decoder.parameters()), None) if isinstance(decoder, torch.nn.Module) else None
    device = param.device if param is not None else latents.device
    x = latents[:, :texture_chans].float().to(device)
    z = x * stats.std.to(device)[None, :, None, None] + stats.mean.to(device)[None, :, None, None]
    return to_uint8(decoder.decode(z)).cpu()


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap default font
        return ImageFont.load_default()


def make_grid(
    images: Tensor | np.ndarray,
    nrow: int,
    captions: Sequence[str] | None = None,
    *,
    pad: int = 2,
    caption_height: int = 12,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Tile uint8 images (N, H, W, 3), ``nrow`` per row, each with a caption strip below it.

    Size: width = nrow·(W + pad) + pad, height = rows·(H + caption_height + pad) + pad, where
    rows = ceil(N / nrow); ``caption_height`` 0 (or no captions) gives a plain grid. Captions
    use PIL's default font and are cut to the tile width.
    """
    imgs = images.cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
    if imgs.ndim != 4 or imgs.shape[-1] != 3 or imgs.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {imgs.dtype} {imgs.shape}")
    if captions is not None and len(captions) != len(imgs):
        raise ValueError(f"{len(captions)} captions for {len(imgs)} images")
    n, h, w, _ = imgs.shape
    cap = caption_height if captions is not None else 0
    rows = max(1, math.ceil(n / nrow))
    grid = Image.new("RGB", (nrow * (w + pad) + pad, rows * (h + cap + pad) + pad), background)
    draw = ImageDraw.Draw(grid)
    font = _font(max(cap - 2, 6))
    for i, tile in enumerate(imgs):
        x, y = pad + (i % nrow) * (w + pad), pad + (i // nrow) * (h + cap + pad)
        grid.paste(Image.fromarray(tile), (x, y))
        if cap and captions[i]:
            text = captions[i]
            while text and draw.textlength(text, font=font) > w:
                text = text[:-1]
            draw.text((x, y + h), text, fill=(0, 0, 0), font=font)
    return grid


# ---------------------------------------------------------------------------------------------
# Checkpoints


def resolve_checkpoint(path: str | os.PathLike[str], prefer_ema: bool = True) -> Path:
    """The weight file behind ``path``.

    - a run directory (has ``checkpoints/``) → its latest complete checkpoint by step number;
    - a checkpoint directory (``<run>/checkpoints/<step>``) → its ``ema.safetensors``
      (``model.safetensors`` with ``prefer_ema=False``);
    - a file → itself (for the authors' ``.pt``, :func:`load_model` prefers the ``ema`` key).
    """
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise WeightsError(f"no checkpoint at '{p}' (neither a file nor a directory)")
    if (p / "checkpoints").is_dir():
        ckpts = list_checkpoints(p)
        if not ckpts:
            raise WeightsError(f"run '{p}' has no complete checkpoint (a <step>/state.pt under checkpoints/)")
        p = ckpts[-1][1]
    name = "ema.safetensors" if prefer_ema else "model.safetensors"
    if not (p / name).is_file():
        other = "model.safetensors" if prefer_ema else "ema.safetensors"
        hint = f"; it has {other} — pass that file to use it" if (p / other).is_file() else ""
        raise WeightsError(f"checkpoint directory '{p}' has no {name}{hint}")
    return p / name


def _config_from_trainer_metadata(path: Path) -> ModelConfig | None:
    """Our training checkpoints may carry the whole run config; take its ``model`` part."""
    if path.suffix != ".safetensors":
        return None
    raw = read_safetensors_metadata(path).get("config")
    if raw is None:
        return None
    data = json.loads(raw)
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        return model_config_from_json(data["model"])
    return None


def load_model(
    path: str | os.PathLike[str],
    *,
    preset: str | None = None,
    prefer_ema: bool = True,
    device: torch.device | str = "cpu",
) -> tuple[LightningDiT, Path]:
    """(LightningDiT in eval mode on ``device``, the weight file it came from).

    ``preset`` (e.g. ``XL/1``) gives the architecture for files without a stored config (the
    authors' released ``.pt`` are bare EMA state dicts, method.md §12.2).
    """
    file = resolve_checkpoint(path, prefer_ema)
    cfg = model_preset(preset) if preset is not None else _config_from_trainer_metadata(file)
    model = load_lightningdit(file, cfg, prefer_ema=prefer_ema)
    return model.to(device).eval().requires_grad_(False), file


# ---------------------------------------------------------------------------------------------
# The evaluation protocol: which index, which label, which order (method.md §7.3)


def rank_indices(num_samples: int, rank: int, world_size: int) -> range:
    """Global sample indices of ``rank``: rank, rank + W, rank + 2W, ... (disjoint, covering).

    Strided rather than blocks so every rank gets a mix of classes and a similar workload; the
    partition only decides who computes an index, never what it becomes (per-index seeds).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    return range(rank, num_samples, world_size)


def balanced_labels(indices: Sequence[int] | range, num_samples: int, num_classes: int) -> np.ndarray:
    """Label ⌊i / (N/K)⌋ of each index: exactly N/K samples per class (the authors' balanced
    sampling, method.md §7.3; they pad to the batch with random labels, we require K | N)."""
    if num_samples % num_classes:
        raise ValueError(
            f"{num_samples} samples cannot be split evenly over {num_classes} classes; "
            f"use a multiple of {num_classes}"
        )
    per_class = num_samples // num_classes
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= num_samples):
        raise ValueError(f"indices must lie in [0, {num_samples})")
    return idx // per_class


def shuffled_order(num_samples: int, seed: int = AUTHORS_SHUFFLE_SEED) -> np.ndarray:
    """A fixed permutation of range(N): the order in which samples go into the npz.

    The ADM evaluator takes IS over consecutive 5,000-sample splits, so class-sorted samples
    would bias it; the authors shuffle with seed 42 (Python's ``random`` over a directory
    listing, which is not reproducible); we use NumPy's PCG64 on the sorted indices.
    """
    return np.random.default_rng(seed).permutation(num_samples)


# ---------------------------------------------------------------------------------------------
# Command-line glue shared by sample/grid.py and eval/fid.py (argument definitions only; the
# scripts parse and decide policies such as TF32 in their main()).


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` → cuda:local_rank, else mps, else cpu; anything else as given."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def add_model_args(parser: Any) -> None:
    """--ckpt/--model/--guide/--guide-model/--no-ema, --stats, --vae/--vae-preset."""
    g = parser.add_argument_group("model and decoder")
    g.add_argument("--ckpt", required=True, help="run dir (latest checkpoint), checkpoint dir, our .safetensors or the authors' .pt")
    g.add_argument("--model", default=None, help="architecture preset for files without a stored config, e.g. XL/1 for the authors' sfd_xl .pt")
    g.add_argument("--guide", default=None, help="AutoGuidance guide checkpoint (same forms as --ckpt)")
    g.add_argument("--guide-model", default=None, help="architecture preset of the guide, e.g. B/1 for the authors' guide .pt")
    g.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    g.add_argument("--stats", required=True, help="texture latent statistics: a latent-cache dir, the authors' latents_stats.pt, or 'identity' (no denormalisation)")
    g.add_argument("--vae", default=None, help="texture VAE weights (default weights/ldm-imagenet256-f16d32-50ep.ckpt)")
    g.add_argument("--vae-preset", default="f16d32", help="texture VAE architecture preset (f16d32 | f8c4 | tiny)")


def add_sampling_args(parser: Any, defaults: SamplingConfig = SamplingConfig()) -> None:
    """Flags for every :class:`SamplingConfig` field."""
    g = parser.add_argument_group("sampling (method.md §7)")
    g.add_argument("--sampler", default=defaults.method, choices=METHODS, help="ODE solver (default: %(default)s, the authors')")
    g.add_argument("--steps", type=int, default=None, help="euler/heun grid size (default: sampler's, euler 250 points, heun 50 steps)")
    g.add_argument("--atol", type=float, default=defaults.atol, help="dopri5 absolute tolerance (default: %(default)s)")
    g.add_argument("--rtol", type=float, default=defaults.rtol, help="dopri5 relative tolerance (default: %(default)s)")
    g.add_argument("--grid", default=None, choices=("exact", "authors"), help="phase boundaries exact, or the authors' single masked run (default: euler authors, others exact)")
    g.add_argument("--shift", type=float, default=None, help="timestep shift for euler/heun (default: off)")
    g.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale; 1 = off (default)")
    g.add_argument("--cfg-scale-tex", type=float, default=None, help="texture-channel scale of the active guidance (default: the main scale)")
    g.add_argument("--cfg-scale-sem", type=float, default=None, help="semantic-channel scale of the active guidance (default: the main scale)")
    g.add_argument("--cfg-interval-start", type=float, default=0.0, help="no guidance while a part's time is below this (default 0 = off)")
    g.add_argument("--interval-mode", default="both", choices=("both", "tex", "sem"), help="parts the interval applies to")
    g.add_argument("--ag-scale", type=float, default=1.0, help="AutoGuidance scale w with --guide (the paper: 1.5)")
    g.add_argument("--delta-t", type=float, default=None, help="semantic lead Δt (default: the model's own)")
    g.add_argument("--seed", type=int, default=0, help="base seed; sample i uses a seed derived from (seed, i)")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast for the DiT (default fp32, as the authors)")


def sampling_config_from_args(args: Any) -> SamplingConfig:
    return SamplingConfig(
        method=args.sampler, num_steps=args.steps, atol=args.atol, rtol=args.rtol, grid=args.grid,
        shift=args.shift, cfg_scale=args.cfg_scale, cfg_scale_tex=args.cfg_scale_tex,
        cfg_scale_sem=args.cfg_scale_sem, cfg_interval_start=args.cfg_interval_start,
        interval_mode=args.interval_mode, ag_scale=args.ag_scale, guide_ckpt=args.guide,
        delta_t=args.delta_t, seed=args.seed, bf16=args.bf16,
    )


def load_pipeline(args: Any, device: torch.device) -> tuple[LightningDiT, Path, LightningDiT | None, TextureStats, Any]:
    """(model, its file, guide or None, texture stats, decoder) from :func:`add_model_args` flags."""
    from sfd.models.autoencoder import load_texture_vae  # the decoder only when pixels are wanted

    model, file = load_model(args.ckpt, preset=args.model, prefer_ema=not args.no_ema, device=device)
    guide = None
    if args.guide is not None:
        guide, _ = load_model(args.guide, preset=args.guide_model, prefer_ema=not args.no_ema, device=device)
    texture_chans = model.cfg.texture_chans
    stats = TextureStats.identity(texture_chans) if args.stats == "identity" else load_texture_stats(args.stats)
    cache_attrs = _cache_attrs(args.stats)
    if cache_attrs is not None and "texture_encoder" in cache_attrs:
        # The cache knows its texture encoder: rebuild exactly that decoder (a stand-in needs no
        # file; a real VAE must match the SHA-256 recorded at encoding time).
        from sfd.models.standins import build_texture_decoder

        vae = build_texture_decoder(cache_attrs, args.vae).to(device)
        identity = {"from": "cache texture_encoder", **cache_attrs["texture_encoder"]}
    else:
        vae_file = resolve_weights("texture_vae", args.vae)
        vae = load_texture_vae(vae_file, preset=args.vae_preset).to(device)
        identity = {"file": vae_file.name, "sha256": file_sha256(vae_file, 16), "preset": args.vae_preset}
    # What decodes the images is part of the settings that decide them (compared on resume).
    vae.decoder_identity = identity
    have = vae.embed_dim if hasattr(vae, "embed_dim") else vae.cfg.embed_dim
    if have != texture_chans:
        raise ConfigError(
            f"the texture decoder takes {have} latent channels but the model's texture part has "
            f"{texture_chans} (in_channels {model.cfg.in_channels} − semantic_chans {model.cfg.semantic_chans})"
        )
    return model, file, guide, stats, vae


def _cache_attrs(path: str) -> dict[str, Any] | None:
    """The attributes of a latent cache at ``path``, or None when ``path`` is not one."""
    if path == "identity" or not Path(path).is_dir():
        return None
    from sfd.data.cache import LatentCache

    try:
        return dict(LatentCache.open(path).attrs)
    except Exception:  # not a cache (e.g. a folder holding latents_stats.pt): use the VAE flags
        return None
