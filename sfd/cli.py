"""The command-line front-end shared by the entry points (definitions only; scripts parse).

- :func:`config_parser` / :func:`parse_config` — the one flag style: an entry point's typed config
  (a named ``--preset`` or the defaults), a few frequently typed flags generated from its fields
  (help = the field's comment, :func:`field_help`), strict ``-o key=value`` for every field
  (unknown keys and bad values are errors listing the valid keys), ``--dry-run`` (the resolved
  config as JSON, :func:`print_config`), and old spellings that still work for one release with a
  one-line note. :data:`SOURCE_ARGS` / :data:`SOURCE_DEPRECATED` are the flags ``sample/grid.py``
  and ``eval/fid.py gen`` share (so they cannot drift apart).
- :func:`cli_status` / :func:`run_cli` — the one error voice: a user error (the project's error
  classes, a missing user-given file, a ``SystemExit`` with a message) is one ``error: …`` line
  and exit status 2; a bug keeps its traceback (1). :class:`Parser` is argparse in that voice.
- :func:`add_model_args` / :func:`add_sampling_args` / :func:`sampling_config_from_args` — the
  former grid/gen flags, kept for library callers and their tests (the entry points no longer
  use them).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import os
import re
import sys
import traceback
import typing
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

from sfd.config import (
    SAMPLING_PRESETS,
    ConfigError,
    SamplingConfig,
    override,
    to_json,
)

__all__ = [
    "add_override_arg", "apply_overrides", "add_model_args", "add_sampling_args",
    "sampling_config_from_args", "pipeline_kwargs", "SAMPLING_FLAGS", "field_help", "fill_help", "run_cli",
    "check_inputs", "Parser", "Arg", "config_parser", "parse_config", "resolve_config", "print_config",
    "valid_keys", "cli_status", "user_error_message", "SOURCE_ARGS", "SOURCE_DEPRECATED", "source_kwargs",
    "source_inputs",
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
    """``{field: text}`` from the comment after each field of a config dataclass (and of the
    dataclasses it derives from), so a flag made from a field says what the field's comment says
    (one text, kept where the field is defined)."""
    out: dict[str, str] = {}
    for klass in cls.__mro__:
        if not dataclasses.is_dataclass(klass):
            continue
        for line in inspect.getsource(klass).splitlines():
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


# ---------------------------------------------------------------------------------------------
# One flag style: a typed config (a named preset or the defaults) + -o key=value + a few flags


class Parser(argparse.ArgumentParser):
    """argparse in the project's error voice: a bad flag is one ``error:`` line, exit status 2
    (argparse's own form is a usage block and ``prog: error:``). Every entry point builds one, so
    this is where the ``SFD_PLUGINS`` modules are imported (sfd/registry.py): before any
    ``choices=`` list is read from a registry and before a config is checked."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from sfd.registry import load_plugins

        load_plugins()
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


@dataclasses.dataclass(frozen=True)
class Arg:
    """One flag generated from a config field: ``flag`` "--images" (or a positional name),
    ``key`` the config key it sets (default: the flag's name with underscores; dotted keys and
    aliases work as in ``-o``), ``required``, ``help`` (default: the field's comment)."""

    flag: str
    key: str | None = None
    required: bool = False
    help: str | None = None
    metavar: str | None = None

    @property
    def field(self) -> str:
        return self.key or self.flag.lstrip("-").replace("-", "_")


ASSIGN = "_assignments"  # namespace list of "key=value" from generated and deprecated flags, in order


def _owner(cls: type, key: str) -> tuple[type, str]:
    key = getattr(cls, "ALIASES", {}).get(key, key)
    *parents, name = key.split(".")
    for part in parents:
        cls = typing.get_type_hints(cls)[part]
    return cls, name


def _value_of(cfg: Any, key: str) -> Any:
    key = getattr(type(cfg), "ALIASES", {}).get(key, key)
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def valid_keys(cls: type) -> list[str]:
    """Every key ``-o`` accepts for ``cls``: its fields (nested ones dotted) and its aliases."""
    keys: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += [f"{f.name}.{k}" for k in valid_keys(tp)]
        else:
            keys.append(f.name)
    return sorted(set(keys) | set(getattr(cls, "ALIASES", {})))


def _note_once(parser: argparse.ArgumentParser, text: str) -> None:
    seen = parser.__dict__.setdefault("_notes_given", set())
    if text not in seen and os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 speaks
        print(f"note: {text}", file=sys.stderr, flush=True)
    seen.add(text)


def _record(ns: argparse.Namespace, assignment: str) -> None:
    # A fresh list each time: a sub-command parses into its own namespace, then copies it over.
    setattr(ns, ASSIGN, [*(getattr(ns, ASSIGN, None) or []), assignment])


class _Assign(argparse.Action):
    """A generated flag: records ``key=value`` (value as typed; the config coerces it strictly)."""

    def __init__(self, *args: Any, key: str, const_value: str | None = None, **kw: Any) -> None:
        self.key, self.const_value = key, const_value
        super().__init__(*args, **kw)

    def __call__(self, parser: Any, ns: argparse.Namespace, values: Any, option: str | None = None) -> None:
        value = self.const_value if self.const_value is not None else values
        _record(ns, f"{self.key}={value}")


class _Deprecated(argparse.Action):
    """An old spelling: still works for one release, with a one-line note naming the new one."""

    def __init__(self, *args: Any, new: str, **kw: Any) -> None:
        self.new = new  # "key" (takes a value), "key=value" (a switch) or "--preset NAME"
        super().__init__(*args, **kw)

    def __call__(self, parser: Any, ns: argparse.Namespace, values: Any, option: str | None = None) -> None:
        if self.new.startswith("--preset "):
            ns.preset = self.new.split()[1]
            instead = self.new
        else:
            assignment = self.new if "=" in self.new else f"{self.new}={values}"
            _record(ns, assignment)
            instead = f"-o {assignment}"
        _note_once(parser, f"{option} is deprecated; use {instead}")


def config_parser(
    cls: type,
    *,
    prog: str | None = None,
    description: str | None = None,
    epilog: str | None = None,
    presets: dict[str, Any] | None = None,
    default_preset: str | None = None,
    base: Any = None,
    args: Sequence[Arg] = (),
    deprecated: dict[str, str] | None = None,
    parser: argparse.ArgumentParser | None = None,
) -> argparse.ArgumentParser:
    """The one command-line shape of every entry point, built from its config dataclass ``cls``:

    positional paths, then ``--preset`` (if ``presets``), the frequently typed flags ``args``
    (each sets one config key; help from the field's comment), ``-o/--override KEY=VALUE`` for
    every key, ``--dry-run`` (print the resolved config as JSON, exit 0); old spellings
    (``deprecated``: ``{"--sampler": "method"}``; ``"ema=false"`` for a switch, ``"--preset
    quick"`` for a preset) work for one release with a note. :func:`resolve_config` turns the
    parsed namespace into the config. ``parser`` fills an existing (sub)parser.
    """
    if description and epilog is None and (m := re.search(r"^Examples?:", description, flags=re.M)):
        description, epilog = description[: m.start()].rstrip() + "\n", description[m.start():]  # examples last
    p = parser if parser is not None else Parser(
        prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    start = base if base is not None else (presets[default_preset] if presets else cls())
    docs = {key: _doc(cls, key) for key in [a.field for a in args]}
    p.set_defaults(_config=(cls, presets, start))
    for a in args:
        if not a.flag.startswith("-"):
            p.add_argument(a.flag, action=_Assign, key=a.field, metavar=a.metavar or a.flag.upper(),
                           help=a.help or docs[a.field])
    if presets:
        p.add_argument("--preset", default=default_preset, choices=sorted(presets),
                       help=f"named {cls.__name__} (default: %(default)s); -o changes any field of it")
    for a in args:
        if not a.flag.startswith("-"):
            continue
        owner, name = _owner(cls, a.field)
        is_bool = typing.get_type_hints(owner)[name] is bool
        default = _value_of(start, a.field)
        text = a.help or docs[a.field]
        if not a.required and not is_bool and default not in (None, ""):
            text += f" (default: {str(default).replace('%', '%%')})"
        p.add_argument(a.flag, action=_Assign, key=a.field, required=a.required, default=argparse.SUPPRESS,
                       nargs=0 if is_bool else None, const_value="true" if is_bool else None,
                       metavar=a.metavar or ("PATH" if a.required else None), help=text)
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help=f"set any {cls.__name__} field, e.g. -o {_example(cls, start)} (repeatable); unknown keys "
                   "and bad values are errors listing the valid keys")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config as JSON and exit")
    if deprecated:
        pairs = [f"{old} → {new if new.startswith('--') else '-o ' + (new if '=' in new else new + '=…')}"
                 for old, new in deprecated.items()]
        lines = [""]
        for pair in pairs:  # whole pairs per line
            if lines[-1] and len(lines[-1]) + len(pair) > 92:
                lines.append("")
            lines[-1] += ("; " if lines[-1] else "  ") + pair
        g = p.add_argument_group("old spellings (work for one release, with a note)", "\n".join(lines))
        for old, new in deprecated.items():
            switch = "=" in new or new.startswith("--preset ")
            g.add_argument(old, action=_Deprecated, new=new, nargs=0 if switch else None,
                           default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def _doc(cls: type, key: str) -> str:
    owner, name = _owner(cls, key)
    return field_help(owner).get(name, name.replace("_", " "))


def _example(cls: type, start: Any) -> str:
    keys = valid_keys(cls)
    key = next((k for k in ("seed", "steps", "batch_size", "lr") if k in keys), keys[0])
    return f"{key}={_value_of(start, key)}"


def parse_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> tuple[Any, argparse.Namespace]:
    """Parse ``argv`` and resolve the config: the preset (or the defaults), then the flags in the
    order given, then ``-o`` overrides, all through :func:`sfd.config.override` (strict)."""
    ns = parser.parse_args(argv)
    return resolve_config(ns), ns


def resolve_config(ns: argparse.Namespace) -> Any:
    cls, presets, start = ns._config
    cfg = presets[ns.preset] if presets and getattr(ns, "preset", None) else start
    assignments = [*(getattr(ns, ASSIGN, None) or []), *ns.override]
    keys = valid_keys(cls)
    for a in assignments:
        key = a.split("=", 1)[0].strip()
        if "=" in a and key not in keys:
            # Listed without the dotted twins of aliased keys (method, not also sampling.method).
            aliased = set(getattr(cls, "ALIASES", {}).values())
            shown = [k for k in keys if k not in aliased]
            raise ConfigError(f"unknown key {key!r} for {cls.__name__}; valid keys are {', '.join(shown)}")
    return override(cfg, assignments)


def print_config(cfg: Any) -> int:
    """``--dry-run``: the resolved config as JSON on stdout; exit status 0."""
    print(to_json(cfg))
    return 0


# ---------------------------------------------------------------------------------------------
# One error voice


# The project's user-error classes, by qualified name (no import needed: a class that was never
# imported cannot have been raised). Each message already names what to fix.
USER_ERRORS = frozenset({
    "sfd.config.ConfigError", "sfd.data.cache.CacheError", "sfd.checkpoint.WeightsError",
    "sfd.runlock.LockError", "sfd.manifest.CheckpointError", "sfd.registry.UnknownChoice",
    "sfd.data.images.DatasetError", "sfd.training.TrainError",
})
# Files a user named that are not there (or not the right kind): the message names the path.
USER_OS_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def user_error_message(e: BaseException, extra: tuple[type[BaseException], ...] = ()) -> str | None:
    """The one-line message of a user error, or None for anything else (a bug)."""
    if isinstance(e, USER_OS_ERRORS) and e.filename is not None:
        return f"{e.filename}: {e.strerror or type(e).__name__}; check the path"
    names = {f"{c.__module__}.{c.__qualname__}" for c in type(e).__mro__}
    if names & USER_ERRORS or isinstance(e, extra):
        return str(e)
    return None


def cli_status(main: Callable[[], Any], user_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run an entry point's ``main`` and return its exit status: a user error (the project's error
    classes, a missing user-given file, ``user_errors``, or a ``SystemExit`` carrying a message)
    prints one ``error: …`` line (rank 0 only under torchrun) and gives 2; argparse's own exits
    pass through; an int returned by ``main`` is the status. A bug keeps its traceback (status 1)."""
    try:
        code = main()
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        _say_error(str(e.code))
        return 2
    except Exception as e:  # noqa: BLE001 - sorted into user errors and bugs below
        msg = user_error_message(e, user_errors)
        if msg is None:
            traceback.print_exc()
            return 1
        _say_error(msg)
        return 2
    return code if isinstance(code, int) else 0


def _say_error(msg: str) -> None:
    # One line, whatever the message: a multi-line one (a list of differences) is joined.
    line = "; ".join(part.strip() for part in msg.strip().splitlines() if part.strip())
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {line}", file=sys.stderr, flush=True)


def run_cli(main: Callable[[], Any], user_errors: tuple[type[BaseException], ...] = ()) -> NoReturn:
    """:func:`cli_status`, then exit with it (the ``if __name__ == "__main__"`` of every script)."""
    sys.exit(cli_status(main, user_errors))


# The flags grid and gen share (paths and architecture names); every sampling setting is a key.
SOURCE_ARGS = (
    Arg("--ckpt", required=True), Arg("--model", metavar="PRESET"), Arg("--guide", metavar="PATH"),
    Arg("--guide-model", metavar="PRESET"), Arg("--stats", metavar="PATH"), Arg("--vae", metavar="PATH"),
)
# Their old spellings (until the release after next): the sampling flags and the switches.
SOURCE_DEPRECATED = {
    **{f"--{flag.replace('_', '-')}": field for flag, field in SAMPLING_FLAGS.items() if flag != "bf16"},
    "--bf16": "bf16=true", "--no-ema": "ema=false", "--vae-preset": "vae_preset", "--device": "device",
    "--no-tf32": "tf32=false", "--batch-size": "batch_size",
}


def source_kwargs(cfg: Any) -> dict[str, Any]:
    """Keyword arguments of :func:`sfd.loading.load_pipeline` from a :class:`sfd.config.SampleSourceConfig`."""
    return dict(
        model=cfg.model, guide=cfg.sampling.guide_ckpt, guide_model=cfg.guide_model, ema=cfg.ema,
        stats=cfg.stats, vae=cfg.vae, vae_preset=cfg.vae_preset,
    )


def source_inputs(cfg: Any) -> dict[str, Any]:
    """The files a sampling command reads, for :func:`check_inputs`."""
    return {"--ckpt": cfg.ckpt, "--guide": cfg.sampling.guide_ckpt, "--stats": cfg.stats, "--vae": cfg.vae}


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
