"""The compiled guided velocity function (sfd.guidance.compile_velocity_fn, SamplingConfig.compile):
one graph, no graph break, no recompile across steps and batches (the last, smaller batch included),
and the samples of eager execution to a stated tolerance, for Euler, Heun and dopri5 (both grids)
under CFG, interval CFG and AutoGuidance — a tiny model on CPU (compile time dominates)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from sfd.config import ConfigError, SamplingConfig, model_preset
from sfd.guidance import build_velocity_fn, compile_mode, compile_velocity_fn
from sfd.models.lightningdit import LightningDiT
from sfd.samplers import generate_latents


def tiny_model(seed: int) -> LightningDiT:
    torch.manual_seed(seed)
    model = LightningDiT(model_preset("tiny", "in_channels=12", "semantic_chans=4", "input_size=8"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def test_compile_setting() -> None:
    assert SamplingConfig().compile == "auto"
    assert compile_mode("auto", "cpu") is None and compile_mode("off", "cuda") is None
    assert compile_mode("auto", "cuda") == "reduce-overhead"  # static shapes: CUDA graphs
    assert compile_mode("on", "cpu") == "default"
    with pytest.raises(ConfigError, match="compile must be"):
        SamplingConfig(compile="yes")
    # How a sample is computed is not what it is: resuming a run may switch compiling on or off.
    assert "compile" not in SamplingConfig(compile="on").describe()
    assert compile_velocity_fn(fn := (lambda x, a, b, y: x), 4, None) is fn


# Tolerances (float32 state, values of order 1): Inductor fuses and reorders the network's float32
# arithmetic; measured differences are ~2e-7 (float32 rounding) after a whole solve. Fixed-step
# solvers: 1e-5. dopri5: 1e-4, room for an acceptance decision that float rounding could flip.
CASES = [
    ("euler", dict(num_steps=6, grid="exact"), dict(cfg_scale=2.0, cfg_interval_start=0.4), 1e-5),
    ("heun", dict(num_steps=3), dict(guide_ckpt="guide", ag_scale=1.5, cfg_scale_sem=2.0), 1e-5),
    ("dopri5", dict(), dict(cfg_scale=1.5), 1e-4),
    ("dopri5", dict(grid="authors"), dict(), 1e-4),
]


@pytest.mark.slow
@pytest.mark.parametrize(("method", "solver", "guidance", "tol"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_compiled_sampler_matches_eager_without_recompiles(method, solver, guidance, tol) -> None:
    model, guide = tiny_model(0), tiny_model(1)
    sampling = SamplingConfig(method=method, **solver, **guidance, compile="on")
    uses_guide = guide if sampling.guide_ckpt else None
    batches = [[0, 1, 2], [3, 4]]  # the last batch is smaller: padded inside, no recompile
    labels = [7, 3, 0, 9, 5]
    torch._dynamo.reset()
    counters.clear()
    fn = compile_velocity_fn(build_velocity_fn(model, sampling, uses_guide), 3, compile_mode(sampling.compile, "cpu"))
    with torch._dynamo.config.patch(error_on_recompile=True, recompile_limit=1):
        for indices in batches:
            y = [labels[i] for i in indices]
            eager, nfe_eager = generate_latents(model, y, indices, sampling, uses_guide)
            compiled, nfe = generate_latents(model, y, indices, sampling, uses_guide, fn=fn)
            torch.testing.assert_close(compiled, eager, rtol=0, atol=tol)
            if method != "dopri5":
                assert nfe == nfe_eager
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1  # one graph for every step and both batches
