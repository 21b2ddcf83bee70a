"""Velocity functions and guidance (docs/method.md §7.2): wrappers that take and return
``fn(x, t_tex, t_sem, y) -> v`` (the convention of sfd/diffusion.py).

- :func:`model_velocity` adapts a LightningDiT; :func:`classifier_free_guidance` and
  :func:`autoguidance` wrap velocity functions with per-part scales and the guidance interval;
- :func:`build_velocity_fn` turns a :class:`sfd.config.SamplingConfig` into the guided function;
- :func:`compile_velocity_fn` compiles it once for a fixed batch size (``SamplingConfig.compile``):
  only the network and the guidance arithmetic are compiled, the solvers' control flow stays Python.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from sfd.config import ConfigError, ModelConfig, SamplingConfig
from sfd.diffusion import VelocityFn, per_channel
from sfd.registry import Registry
from sfd.runtime import autocast

__all__ = [
    "INTERVAL_MODES",
    "model_velocity",
    "guide",
    "classifier_free_guidance",
    "autoguidance",
    "build_velocity_fn",
    "compile_mode",
    "compile_velocity_fn",
]

IntervalMode = Literal["both", "tex", "sem"]
# ``SamplingConfig.interval_mode``: name → (the interval applies to the texture part, to the semantic part).
INTERVAL_MODES: Registry[tuple[bool, bool]] = Registry("interval mode")
INTERVAL_MODES.register("both", (True, True))
INTERVAL_MODES.register("tex", (True, False))
INTERVAL_MODES.register("sem", (False, True))


def model_velocity(model: nn.Module) -> VelocityFn:
    """Adapt ``model(x, (t_tex, t_sem), y)`` (the LightningDiT contract) to ``fn(x, t_tex, t_sem, y)``."""

    def fn(x: Tensor, t_tex: Tensor, t_sem: Tensor, y: Tensor) -> Tensor:
        return model(x, (t_tex, t_sem), y)

    return fn


def guide(
    v_main: Tensor,
    v_ref: Tensor,
    t_tex: Tensor,
    t_sem: Tensor,
    *,
    semantic_chans: int,
    scale_tex: float,
    scale_sem: float,
    interval_start: float = 0.0,
    interval_mode: IntervalMode = "both",
) -> Tensor:
    """v_ref + w·(v_main − v_ref) per part, or v_main for a part outside the guidance interval.

    The interval follows the authors' ``forward_with_cfg`` (lightningdit.py:544-574): guidance is
    off for a part while its own time is below ``interval_start``; ``interval_mode`` ("both",
    "tex", "sem", their ``semfirst_infer_interval_mode``) says which parts the interval applies
    to. They test the first sample's time only; we test each sample's with ``torch.where`` (the
    same result for a shared clock, and no branch for the compiler).
    """
    tex_in, sem_in = INTERVAL_MODES[interval_mode]
    C, C_tex = v_main.shape[1], v_main.shape[1] - semantic_chans
    always = torch.ones_like(t_tex, dtype=torch.bool)
    tex_on = t_tex >= interval_start if tex_in else always
    sem_on = t_sem >= interval_start if sem_in else always
    on = per_channel(tex_on, sem_on, C, semantic_chans, v_main.ndim)
    # Same arithmetic as the authors: uncond + scale·(cond − uncond), per part.
    guided = torch.cat(
        [
            v_ref[:, :C_tex] + scale_tex * (v_main[:, :C_tex] - v_ref[:, :C_tex]),
            v_ref[:, C_tex:] + scale_sem * (v_main[:, C_tex:] - v_ref[:, C_tex:]),
        ],
        dim=1,
    )
    return torch.where(on, guided, v_main)


def classifier_free_guidance(
    fn: VelocityFn,
    scale: float,
    *,
    null_class: int,
    semantic_chans: int,
    scale_tex: float | None = None,
    scale_sem: float | None = None,
    interval_start: float = 0.0,
    interval_mode: IntervalMode = "both",
    doubled_batch: bool = False,
) -> VelocityFn:
    """CFG on all channels (docs/method.md §7.2): v_u + w·(v_c − v_u), one batch-doubled call.

    The conditional and null-label (``null_class``) halves run in one call of ``fn`` on
    [x; x]. ``scale_tex``/``scale_sem`` default to ``scale``. With ``doubled_batch`` the wrapper
    takes the authors' ``forward_with_cfg`` convention instead: x, t and y already hold
    [cond; uncond] halves (y = [labels; null]), the model sees [x_cond; x_cond], and the guided
    velocity is returned for both halves.
    """
    s_tex = scale if scale_tex is None else scale_tex
    s_sem = scale if scale_sem is None else scale_sem

    def guided(x: Tensor, t_tex: Tensor, t_sem: Tensor, y: Tensor) -> Tensor:
        if doubled_batch:
            half = x.shape[0] // 2
            x_in = torch.cat([x[:half], x[:half]])
            t_tex_in, t_sem_in, y_in = t_tex, t_sem, y
        else:
            half = x.shape[0]
            x_in = torch.cat([x, x])
            t_tex_in, t_sem_in = torch.cat([t_tex, t_tex]), torch.cat([t_sem, t_sem])
            y_in = torch.cat([y, torch.full_like(y, null_class)])
        v_cond, v_uncond = fn(x_in, t_tex_in, t_sem_in, y_in).chunk(2)
        out = guide(
            v_cond,
            v_uncond,
            t_tex_in[:half],
            t_sem_in[:half],
            semantic_chans=semantic_chans,
            scale_tex=s_tex,
            scale_sem=s_sem,
            interval_start=interval_start,
            interval_mode=interval_mode,
        )
        return torch.cat([out, out]) if doubled_batch else out

    return guided


def autoguidance(
    fn_main: VelocityFn,
    fn_guide: VelocityFn,
    scale: float,
    *,
    semantic_chans: int,
    scale_tex: float | None = None,
    scale_sem: float | None = None,
    interval_start: float = 0.0,
    interval_mode: IntervalMode = "both",
) -> VelocityFn:
    """AutoGuidance (Karras et al. 2024; docs/method.md §7.2): v_guide + w·(v_main − v_guide).

    Both models are conditioned on the true class (no null label); the guide is a weaker SFD
    model (an early B/1 checkpoint for every reported result). Separate texture/semantic scales
    and the interval work as in :func:`guide` (the authors' ``forward_with_autoguidance``).
    """
    s_tex = scale if scale_tex is None else scale_tex
    s_sem = scale if scale_sem is None else scale_sem

    def guided(x: Tensor, t_tex: Tensor, t_sem: Tensor, y: Tensor) -> Tensor:
        return guide(
            fn_main(x, t_tex, t_sem, y),
            fn_guide(x, t_tex, t_sem, y),
            t_tex,
            t_sem,
            semantic_chans=semantic_chans,
            scale_tex=s_tex,
            scale_sem=s_sem,
            interval_start=interval_start,
            interval_mode=interval_mode,
        )

    return guided


def _check_guide(main: ModelConfig, guide: ModelConfig) -> None:
    fields = ("in_channels", "semantic_chans", "input_size", "num_classes")
    diffs = {f: (getattr(main, f), getattr(guide, f)) for f in fields if getattr(main, f) != getattr(guide, f)}
    if diffs:
        raise ConfigError(f"guide model does not fit the main model (main, guide): {diffs}")


def build_velocity_fn(
    model: nn.Module, sampling: SamplingConfig, guide: nn.Module | None = None
) -> VelocityFn:
    """The (guided) velocity ``fn(x, t_tex, t_sem, y)`` for ``sampling`` (docs/method.md §7.2)."""
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
        with autocast(x.device, torch.bfloat16):
            return inner(x, t_tex, t_sem, y).float()

    return autocast_fn


def compile_mode(setting: str, device: torch.device | str) -> str | None:
    """The ``torch.compile`` mode for ``SamplingConfig.compile`` on ``device``, or None for eager.

    "auto" compiles on CUDA only, where 50K-sample runs amortise the compile time; "on" compiles
    anywhere. CUDA uses CUDA graphs ("reduce-overhead": the shapes are static, see
    :func:`compile_velocity_fn`), elsewhere the default mode.
    """
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"compile must be auto, on or off, got {setting!r}")
    device_type = torch.device(device).type
    if setting == "off" or (setting == "auto" and device_type != "cuda"):
        return None
    return "reduce-overhead" if device_type == "cuda" else "default"


def compile_velocity_fn(fn: VelocityFn, batch_size: int, mode: str | None) -> VelocityFn:
    """``fn`` compiled once for batches of at most ``batch_size`` samples (``mode`` None: ``fn``).

    Shapes are made static so that no step and no batch recompiles: a smaller batch (the last one
    of a run) is padded to ``batch_size`` with zero rows inside this wrapper, and their velocities
    are dropped. The network treats samples independently and the solver never sees the padding,
    so the real samples are those of an unpadded call (to float rounding), whatever the grid.
    Inputs are made contiguous (the solvers pass clock values broadcast with stride 0). With CUDA
    graphs each output is copied out of the graph's memory pool, which the next call reuses while
    the solver still holds earlier stages. ``fullgraph=True``: a graph break is an error.
    """
    if mode is None:
        return fn
    compiled = torch.compile(fn, mode=mode, fullgraph=True, dynamic=False)
    cudagraphs = mode == "reduce-overhead"

    def static_fn(x: Tensor, t_tex: Tensor, t_sem: Tensor, y: Tensor) -> Tensor:
        n = x.shape[0]
        if n > batch_size:
            raise ValueError(f"batch of {n} samples for a velocity function compiled for {batch_size}")
        args = [x, t_tex, t_sem, y]
        if n < batch_size:
            args = [torch.cat([a, a.new_zeros((batch_size - n, *a.shape[1:]))]) for a in args]
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        v = compiled(*(a.contiguous() for a in args))
        return v[:n].clone() if cudagraphs else v[:n]

    return static_fn
