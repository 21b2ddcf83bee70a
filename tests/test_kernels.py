"""sfd.kernels: Triton kernels vs their references (interpreter), the custom ops' registration,
the kernels switch, and a compiled graph without breaks or recompiles."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sfd.config import ConfigError, SamplingConfig, model_preset, train_preset
from sfd.diffusion import sfd_loss
from sfd.guidance import build_velocity_fn
from sfd.kernels import resolve
from sfd.kernels.adaln_norm import _adaln_norm_fwd, adaln_norm, reference
from sfd.models.lightningdit import LightningDiT, RMSNorm, modulate

REPO = Path(__file__).resolve().parents[1]


def test_triton_kernels_in_the_interpreter() -> None:
    """tests/kernels_cases.py under TRITON_INTERPRET=1 (set before triton decorates a kernel,
    hence a subprocess): every kernel's forward and backward against its eager reference, and
    the whole model with kernels on against the golden vectors. ~20 s on 2 CPU cores."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "kernels_cases.py")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


# ---------------------------------------------------------------------------------------------
# The references are the model's maths; the ops are well-formed custom ops


def _adaln_inputs(dtype=torch.float32, res=True, shift=True, B=2, N=5, D=24, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(dtype).requires_grad_()

    x = r(B, N, D).float().detach().requires_grad_()
    return (
        x, r(B, N, D) if res else None, r(B, D) if res else None,
        (1 + 0.1 * torch.randn(D, generator=g)).requires_grad_(), r(B, D, scale=0.3) if shift else None,
        r(B, D, scale=0.3),
    )


def test_reference_is_the_models_eager_maths() -> None:
    x, y, gate, w, shift, scale = _adaln_inputs()
    norm = RMSNorm(24)
    with torch.no_grad():
        norm.weight.copy_(w)
    res = x + gate.unsqueeze(1) * y
    h_model = modulate(norm(res), shift, scale)
    h, res_ref = reference(x, y, gate, w, shift, scale)
    assert torch.equal(res_ref, res) and torch.equal(h, h_model)


@pytest.mark.parametrize("res,shift", [(True, True), (False, False)])
def test_custom_op_registration(res: bool, shift: bool) -> None:
    """opcheck: schema, fake (meta) kernel, autograd registration, and dispatch consistency."""
    x, y, gate, w, sh, sc = _adaln_inputs(res=res, shift=shift)
    torch.library.opcheck(_adaln_norm_fwd, (x, y, gate, w, sh, sc, 1e-6, torch.float32))


def test_cpu_op_matches_reference_forward_and_backward() -> None:
    # Off CUDA the op runs the reference forward and an analytic eager backward (the formulas
    # the Triton backward implements): that backward must equal autograd's.
    inputs = _adaln_inputs()
    h, res = adaln_norm(*inputs)
    h_ref, res_ref = reference(*inputs)
    assert torch.equal(h, h_ref) and torch.equal(res, res_ref)
    g = torch.Generator().manual_seed(1)
    dh, dres = torch.randn(h.shape, generator=g), torch.randn(res.shape, generator=g)
    for a, b in zip(torch.autograd.grad((h, res), inputs, (dh, dres)), torch.autograd.grad((h_ref, res_ref), inputs, (dh, dres))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_model_with_fused_ops_matches_golden_on_cpu(golden_dir) -> None:
    """The fused path off CUDA (the ops' eager references) against the authors' velocity."""
    from sfd.checkpoint import load_tensors
    from sfd.loading import load_model

    model = load_model(golden_dir / "lightningdit-tiny-weights.safetensors")[0]
    io = load_tensors(golden_dir / "lightningdit-tiny-io.safetensors")
    assert model.use_kernels(True) == len(model.blocks) + 1
    with torch.no_grad():
        v = model(io["x"], (io["t_tex"], io["t_sem"]), io["y"])
    torch.testing.assert_close(v, io["velocity"], rtol=0, atol=1e-5)


def test_adaln_norm_rejects_bad_arguments() -> None:
    x, y, gate, w, shift, scale = _adaln_inputs()
    with pytest.raises(ValueError, match="y and gate"):
        adaln_norm(x, y, None, w, shift, scale)
    with pytest.raises(ValueError, match=r"x \(B, N, D\)"):
        adaln_norm(x, y, gate, w, shift, scale[:1])


# ---------------------------------------------------------------------------------------------
# The switch


def test_kernels_switch() -> None:
    cpu = torch.device("cpu")
    assert (resolve("eager", cpu).compile, resolve("eager", cpu).fused) == (False, False)
    assert (resolve("compile", cpu).compile, resolve("compile", cpu).fused) == (True, False)
    on_cpu = resolve("triton", cpu)
    assert on_cpu.compile and not on_cpu.fused and "no CUDA device" in on_cpu.note
    with pytest.raises(ValueError, match="eager | compile | triton"):
        resolve("cuda", cpu)
    assert train_preset("sfd-xl").kernels == "compile" and train_preset("tiny").kernels == "eager"
    with pytest.raises(ConfigError, match="kernels must be"):
        train_preset("tiny", "kernels=fast")


def test_use_kernels_only_where_there_is_a_fused_path() -> None:
    model = LightningDiT(model_preset("tiny"))
    assert model.use_kernels(True) == len(model.blocks) + 1
    assert model.use_kernels(False) == 0 and not any(b.fused for b in model.blocks)
    dit = LightningDiT(dataclasses.replace(model_preset("tiny"), use_rmsnorm=False))
    assert dit.use_kernels(True) == 0  # LayerNorm blocks keep their eager forward


def test_fused_path_without_shift_matches_eager() -> None:
    """The 4-way adaLN layout (wo_shift) through the fused path equals the eager blocks."""
    torch.manual_seed(0)
    model = LightningDiT(dataclasses.replace(model_preset("tiny"), wo_shift=True)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, t, y = torch.randn(2, model.cfg.in_channels, 8, 8), torch.rand(2), torch.tensor([0, 1])
    with torch.no_grad():
        eager = model(x, (t, t), y)
        model.use_kernels(True)
        fused = model(x, (t, t), y)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("repa_depth,checkpointing", [(1, False), (1, True), (3, False)], ids=["repa1", "repa1-ckpt", "repa-last"])
def test_fused_across_blocks_matches_eager_with_gradients(repa_depth: int, checkpointing: bool) -> None:
    """The model's fused forward adds each MLP residual inside the next norm's pass and takes
    REPA's tokens from there; velocity, REPA projection and every parameter's gradient equal the
    eager model's (with activation checkpointing too, and REPA at the last block)."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(model_preset("tiny"), depth=3, repa_depth=repa_depth)
    model = LightningDiT(cfg).train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.grad_checkpointing = checkpointing
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(3, cfg.in_channels, 8, 8, generator=g), torch.rand(3, generator=g)
    y, drop = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 0])
    dv, dr = torch.randn(3, cfg.in_channels, 8, 8, generator=g), torch.randn(3, 64, cfg.repa_target_dim, generator=g)
    outs = {}
    for fused in (False, True):
        model.use_kernels(fused)
        v, r = model(x, (t, t), y, return_repa=True, force_drop_ids=drop)
        model.zero_grad(set_to_none=True)
        ((v * dv).sum() + (r * dr).sum()).backward()
        outs[fused] = (v.detach(), r.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(outs[True][0], outs[False][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[True][1], outs[False][1], rtol=1e-5, atol=1e-6)
    for name, grad in outs[False][2].items():  # float32 summation order: ≤ 1e-5 of the largest entry
        err = (outs[True][2][name] - grad).abs().max()
        assert err <= 1e-5 * grad.abs().max(), (name, float(err))


# ---------------------------------------------------------------------------------------------
# One graph, compiled once


def _tiny_model(fused: bool) -> LightningDiT:
    torch.manual_seed(0)
    model = LightningDiT(model_preset("tiny"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # off adaLN-Zero, so every path carries gradient
    model.use_kernels(fused)
    return model


def _training_batch(model: LightningDiT, step: int):
    cfg = model.cfg
    g = torch.Generator().manual_seed(step)
    x = torch.randn(4, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t_sem = torch.rand(4, generator=g)
    t_tex = (t_sem - 0.3).clamp_min(0)
    y = torch.randint(0, cfg.num_classes, (4,), generator=g)
    drop = (torch.rand(4, generator=g) < 0.1).long()
    target = torch.randn(x.shape, generator=g)
    repa_target = torch.randn(4, cfg.input_size**2, cfg.repa_target_dim, generator=g)
    return x, (t_tex, t_sem), y, drop, target, repa_target


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True], ids=["compile", "triton-ops"])
def test_training_step_compiles_to_one_graph_without_recompiles(fused: bool) -> None:
    """The trainer's compiled calls (model with REPA and forced label drops, then the loss) and
    their backward: no graph break (fullgraph=True raises on one; the counters are checked too)
    and no recompilation over three steps with new times, labels and drops. aot_eager runs dynamo and AOTAutograd (what inductor receives)
    without inductor's code generation, so the test takes seconds."""
    torch._dynamo.reset()
    model = _tiny_model(fused).train()
    cfg = model.cfg
    net = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss_fn = torch.compile(
        lambda pred, target, **kw: sfd_loss(pred, target, semantic_chans=cfg.semantic_chans, **kw),
        fullgraph=True, backend="aot_eager",
    )
    torch._dynamo.utils.counters.clear()
    for step in range(3):
        x, t, y, drop, target, repa_target = _training_batch(model, step)
        # After the first step, any recompilation is an error rather than a silent slowdown.
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            pred, proj = net(x, t, y, return_repa=True, force_drop_ids=drop)
            terms = loss_fn(pred, target, repa_projection=proj, repa_target=repa_target, t_tex=t[0], t_sem=t[1])
        terms.total.backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        model.zero_grad(set_to_none=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # model and loss, once each
    assert not torch._dynamo.utils.counters["graph_break"]


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True], ids=["compile", "triton-ops"])
def test_sampler_velocity_compiles_without_recompiles(fused: bool) -> None:
    """The guided (CFG, bf16 autocast) velocity function the samplers call: one graph, and no
    recompilation as the solver walks through times."""
    torch._dynamo.reset()
    model = _tiny_model(fused).eval()
    sampling = SamplingConfig(method="euler", cfg_scale=2.0, cfg_interval_start=0.2, bf16=True)
    fn = torch.compile(build_velocity_fn(model, sampling), fullgraph=True, backend="aot_eager")
    cfg = model.cfg
    x = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size)
    y = torch.tensor([1, 2])
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        for i, t in enumerate((0.0, 0.25, 0.8)):
            t_sem = torch.full((2,), min(1.0, t + 0.3))
            with torch._dynamo.config.patch(error_on_recompile=i > 0):
                v = fn(x, torch.full((2,), t), t_sem, y)
            assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"]
