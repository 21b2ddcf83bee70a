"""The command-line front-end shared by the entry points (definitions only; scripts parse).

- :func:`add_override_arg` / :func:`apply_overrides` — the one way to set any field of a typed
  config: a named preset, the frequently typed flags, then strict ``-o key=value`` (unknown keys
  and bad values are errors listing the valid keys). Every entry point prints and saves the
  resolved config (train: config.json; encode: <out>.encode.json; SemVAE: its run dir; grid and
  gen: their settings JSON).
- :func:`add_model_args` / :func:`add_sampling_args` — the model/decoder and sampling flags that
  ``sample/grid.py`` and ``eval/fid.py`` share (so they cannot drift apart), mapped to
  :class:`sfd.config.SamplingConfig` by :func:`sampling_config_from_args` and to
  :func:`sfd.loading.load_pipeline` by :func:`pipeline_kwargs`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from sfd.config import SAMPLING_PRESETS, SamplingConfig, override

__all__ = [
    "add_override_arg", "apply_overrides", "add_model_args", "add_sampling_args",
    "sampling_config_from_args", "pipeline_kwargs", "SAMPLING_FLAGS", "field_help", "fill_help", "run_cli",
    "check_inputs",
]

T = TypeVar("T")


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


# Sampling flag → SamplingConfig field. Flags left out keep the preset's value.
SAMPLING_FLAGS = {
    "sampler": "method", "steps": "num_steps", "atol": "atol", "rtol": "rtol", "grid": "grid",
    "shift": "shift", "cfg_scale": "cfg_scale", "cfg_scale_tex": "cfg_scale_tex",
    "cfg_scale_sem": "cfg_scale_sem", "cfg_interval_start": "cfg_interval_start",
    "interval_mode": "interval_mode", "ag_scale": "ag_scale", "delta_t": "delta_t", "seed": "seed",
    "bf16": "bf16",
}


def add_override_arg(parser: Any, what: str) -> None:
    """``-o/--override KEY=VALUE`` (repeatable) for any field of the entry point's config."""
    parser.add_argument(
        "-o", "--override", action="append", default=[], metavar="KEY=VALUE",
        help=f"set any {what} field, e.g. -o seed=3 (repeatable); unknown keys and bad values are "
        "errors listing the valid keys",
    )


def apply_overrides(cfg: T, assignments: list[str]) -> T:
    """``cfg`` with strict ``key=value`` overrides (:func:`sfd.config.override`)."""
    return override(cfg, list(assignments))


def add_sampling_args(parser: Any) -> None:
    """``--preset`` (a :data:`SAMPLING_PRESETS` name), a flag for every :class:`SamplingConfig`
    field that users type often, and ``-o`` for all of them."""
    # The choices are the registries' names when the parser is built: after load_plugins().
    from sfd.guidance import INTERVAL_MODES
    from sfd.samplers import GRIDS, SAMPLERS

    S = argparse.SUPPRESS  # an absent flag keeps the preset's value
    g = parser.add_argument_group("sampling (docs/method.md §7): --preset, then flags, then -o overrides")
    g.add_argument("--preset", default="authors", choices=sorted(SAMPLING_PRESETS), help="sampling preset (default: %(default)s = dopri5, atol 1e-6, rtol 1e-3, no guidance)")
    g.add_argument("--sampler", default=S, choices=SAMPLERS.names(), help="ODE solver (preset default: dopri5, the authors')")
    g.add_argument("--steps", type=int, default=S, help="euler/heun grid size (default: sampler's, euler 250 points, heun 50 steps)")
    g.add_argument("--atol", type=float, default=S, help="dopri5 absolute tolerance (default 1e-6)")
    g.add_argument("--rtol", type=float, default=S, help="dopri5 relative tolerance (default 1e-3)")
    g.add_argument("--grid", default=S, choices=GRIDS.names(), help="phase boundaries exact, or the authors' single masked run (default: euler authors, others exact)")
    g.add_argument("--shift", type=float, default=S, help="timestep shift for euler/heun (default: off)")
    g.add_argument("--cfg-scale", type=float, default=S, help="classifier-free guidance scale; 1 = off (default)")
    g.add_argument("--cfg-scale-tex", type=float, default=S, help="texture-channel scale of the active guidance (default: the main scale)")
    g.add_argument("--cfg-scale-sem", type=float, default=S, help="semantic-channel scale of the active guidance (default: the main scale)")
    g.add_argument("--cfg-interval-start", type=float, default=S, help="no guidance while a part's time is below this (default 0 = off)")
    g.add_argument("--interval-mode", default=S, choices=INTERVAL_MODES.names(), help="parts the interval applies to (default both)")
    g.add_argument("--ag-scale", type=float, default=S, help="AutoGuidance scale w with --guide (the paper: 1.5)")
    g.add_argument("--delta-t", type=float, default=S, help="semantic lead Δt (default: the model's own)")
    g.add_argument("--seed", type=int, default=S, help="base seed; sample i uses a seed derived from (seed, i) (default 0)")
    g.add_argument("--bf16", action="store_true", default=S, help="bf16 autocast for the DiT (default fp32, as the authors)")
    add_override_arg(g, "SamplingConfig")


def sampling_config_from_args(args: Any) -> SamplingConfig:
    """The preset, then the flags given, then ``-o`` overrides; ``--guide`` sets ``guide_ckpt``."""
    given = {field: getattr(args, flag) for flag, field in SAMPLING_FLAGS.items() if hasattr(args, flag)}
    if getattr(args, "guide", None) is not None:
        given["guide_ckpt"] = args.guide
    base = SAMPLING_PRESETS[getattr(args, "preset", "authors")]
    cfg = dataclasses.replace(base, **given)
    return apply_overrides(cfg, getattr(args, "override", []))


def pipeline_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of :func:`sfd.loading.load_pipeline` from :func:`add_model_args` flags."""
    return dict(
        model=args.model, guide=args.guide, guide_model=args.guide_model, ema=not args.no_ema,
        stats=args.stats, vae=args.vae, vae_preset=args.vae_preset,
    )


@functools.cache
def field_help(cls: type) -> dict[str, str]:
    """``{field: text}`` from the comment after each field of a config dataclass, so a flag made
    from a field says what the field's comment says (one text, kept where the field is defined)."""
    out: dict[str, str] = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+)\s*:[^=#]*=\s*[^#]*#\s*(.+)$", line)
        if m and m.group(1) not in out:
            out[m.group(1)] = m.group(2).strip()
    return out


def fill_help(parser: argparse.ArgumentParser, cls: type) -> argparse.ArgumentParser:
    """Give every flag of ``parser`` without a help text the comment of ``cls``'s field of that name,
    plus its default; flags with neither keep none (a test asserts that none is left)."""
    docs = field_help(cls)
    for action in parser._actions:
        if action.help or not action.option_strings or action.dest not in docs:
            continue
        default = "" if action.default in (None, argparse.SUPPRESS) or isinstance(action.default, bool) else " (default: %(default)s)"
        action.help = docs[action.dest] + default
    return parser


def run_cli(main: Callable[[], Any], user_errors: tuple[type[BaseException], ...]) -> NoReturn:
    """Run an entry point's ``main`` so that a user error — one of ``user_errors``, or a
    ``SystemExit`` carrying a message — prints one ``error: …`` line and exits with status 2,
    never a traceback. argparse's own exits (status 0 for --help, 2 for bad flags) pass through;
    an int returned by ``main`` is the exit status."""
    try:
        code = main()
    except user_errors as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            raise
        print(f"error: {e.code}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


def check_inputs(inputs: dict[str, Any], error: type[Exception] | None = None) -> None:
    """Raise one error (``error``, default :class:`ConfigError`) listing every given input path
    that does not exist (``{flag: path}``; None, "" and the word ``identity`` mean "not a file"
    and are skipped), so a user fixes them all at once."""
    from pathlib import Path

    from sfd.config import ConfigError

    gone = [f"{flag} {path}" for flag, path in inputs.items()
            if path not in (None, "", "identity") and not Path(path).exists()]
    if gone:
        hint = " (`just weights` says where each released file is published)" if any("weights/" in g for g in gone) else ""
        raise (error or ConfigError)(f"{len(gone)} input(s) not found: " + "; ".join(gone) + hint)
