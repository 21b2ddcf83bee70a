"""The command-line front-end shared by the entry points (definitions only; scripts parse).

- :func:`add_override_args` / :func:`resolve_overrides` — the one way to set any field of a typed
  config: ``--preset NAME`` plus strict ``-o key=value`` (unknown keys and bad values are errors
  listing the valid keys); :func:`print_config` shows the resolved config.
- :func:`add_model_args` / :func:`add_sampling_args` — the model/decoder and sampling flags that
  ``sample/grid.py`` and ``eval/fid.py`` share (so they cannot drift apart), mapped to
  :class:`sfd.config.SamplingConfig` by :func:`sampling_config_from_args` and to
  :func:`sfd.loading.load_pipeline` by :func:`pipeline_kwargs`.
"""

from __future__ import annotations

import argparse
from typing import Any

from sfd.config import SAMPLER_METHODS, SamplingConfig

__all__ = ["add_model_args", "add_sampling_args", "sampling_config_from_args", "pipeline_kwargs"]

METHODS = SAMPLER_METHODS


def add_model_args(parser: Any) -> None:
    """--ckpt/--model/--guide/--guide-model/--no-ema, --stats, --vae/--vae-preset."""
    g = parser.add_argument_group("model and decoder")
    g.add_argument("--ckpt", required=True, help="run dir (latest checkpoint), checkpoint dir, our .safetensors or the authors' .pt")
    g.add_argument("--model", default=None, help="architecture preset for files without a stored config, e.g. XL/1 for the authors' sfd_xl .pt")
    g.add_argument("--guide", default=None, help="AutoGuidance guide checkpoint (same forms as --ckpt)")
    g.add_argument("--guide-model", default=None, help="architecture preset of the guide, e.g. B/1 for the authors' guide .pt")
    g.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    g.add_argument("--stats", default=None, help="texture latent statistics: a latent-cache dir, the authors' latents_stats.pt, or 'identity' (no denormalisation); default: those stored with the checkpoint")
    g.add_argument("--vae", default=None, help="texture VAE weights (default weights/ldm-imagenet256-f16d32-50ep.ckpt)")
    g.add_argument("--vae-preset", default="f16d32", help="texture VAE architecture preset (f16d32 | f8c4 | tiny)")


def add_sampling_args(parser: Any, defaults: SamplingConfig | None = None) -> None:
    """Flags for every :class:`SamplingConfig` field."""
    defaults = defaults or SamplingConfig()
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


def pipeline_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of :func:`sfd.loading.load_pipeline` from :func:`add_model_args` flags."""
    return dict(
        model=args.model, guide=args.guide, guide_model=args.guide_model, ema=not args.no_ema,
        stats=args.stats, vae=args.vae, vae_preset=args.vae_preset,
    )
