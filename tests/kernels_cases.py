"""Triton kernel cases, run by tests/test_kernels.py in a subprocess with TRITON_INTERPRET=1.

Triton decides interpreter or compiler when a kernel is decorated (at import), so these cases
need the variable set before ``sfd.kernels`` is imported; the subprocess keeps it away from every
other test. On a CUDA machine the same file runs the compiled kernels: ``pytest tests/kernels_cases.py``.

Tolerances: fp32 results equal the eager reference up to summation order (rtol 1e-5). bf16
results may differ by the rounding of one operation: the kernel computes in fp32 and rounds once
where eager rounds after each bf16 op (and the interpreter's fp32→bf16 cast may round
differently from torch's), so bf16 elementwise outputs lie within BF16_ULPS ulp of the reference,
or of the tensor's mean magnitude for elements below it (cancellation); column sums of bf16
gradients (dgate, dscale, dshift) within BF16_ULPS ulp of their largest magnitude.
"""

from __future__ import annotations

import os

import pytest
import torch

from sfd.kernels._triton import use_triton
from sfd.kernels.adaln_norm import adaln_norm, reference

BF16_ULPS = 2  # the autocast layout (fp32 residual; bf16 branch, adaLN rows and h)
BF16_ULPS_ALL = 4  # an all-bf16 model: eager rounds every intermediate to bf16, the kernel once
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _runs_triton() -> None:
    if not use_triton(torch.empty(0, device=DEVICE)):
        pytest.fail("these cases need TRITON_INTERPRET=1 (set before import) or a CUDA device")


def _ulp(ref: torch.Tensor) -> torch.Tensor:
    """bf16 ulp of each element (of the smallest normal for zeros)."""
    mag = ref.float().abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
    return torch.finfo(torch.bfloat16).eps * torch.exp2(torch.floor(torch.log2(mag)))


def assert_close(
    got: torch.Tensor, ref: torch.Tensor, what: str, column_sum: bool = False, ulps: int | None = None,
    bf16_chain: bool = False,
) -> None:
    """fp32 tight; bf16 (or an fp32 result whose eager reference went through bf16, ``ulps``)
    within ``ulps`` bf16 ulp."""
    assert got.dtype == ref.dtype and got.shape == ref.shape, (what, got.dtype, ref.dtype, got.shape, ref.shape)
    g, r = got.float(), ref.float()
    ulps = ulps or BF16_ULPS
    if ref.dtype == torch.float32 and not bf16_chain:
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5 * max(1.0, r.abs().max().item()), msg=what)
        return
    # Elementwise: ulp of the element, or of the tensor's mean magnitude for smaller elements
    # (cancellation, e.g. h = u·(1 + scale) + shift near zero, amplifies one rounding of u).
    floor = r.abs().max() if column_sum else r.abs().mean()
    bound = ulps * _ulp(torch.maximum(r.abs(), floor))
    err = (g - r).abs()
    assert bool((err <= bound).all()), f"{what}: {(err / bound).max().item() * ulps:.2f} ulp > {ulps}"


# (residual dtype x, branch dtype y/gate, modulation dtype): fp32; the bf16-autocast layout
# (fp32 residual stream, bf16 branch and adaLN rows); an all-bf16 model.
DTYPES = {
    "fp32": (torch.float32, torch.float32, torch.float32),
    "autocast": (torch.float32, torch.bfloat16, torch.bfloat16),
    "bf16": (torch.bfloat16, torch.bfloat16, torch.bfloat16),
}


@pytest.mark.parametrize("dtypes", list(DTYPES))
@pytest.mark.parametrize("has_res", [False, True])
@pytest.mark.parametrize("has_shift", [True, False])
@pytest.mark.parametrize("shape", [(2, 5, 24), (1, 16, 72)])  # odd row counts; D not a power of 2
def test_adaln_norm_matches_reference(dtypes: str, has_res: bool, has_shift: bool, shape) -> None:
    _runs_triton()
    x_dt, y_dt, mod_dt = DTYPES[dtypes]
    B, N, D = shape
    g = torch.Generator().manual_seed(B * 1000 + N * 10 + D)

    def rand(*s, dtype, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(dtype).to(DEVICE).requires_grad_()

    x = rand(B, N, D, dtype=x_dt)
    y = rand(B, N, D, dtype=y_dt) if has_res else None
    gate = rand(B, D, dtype=y_dt) if has_res else None
    weight = (1 + 0.1 * torch.randn(D, generator=g)).to(DEVICE).requires_grad_()
    shift = rand(B, D, dtype=mod_dt, scale=0.3) if has_shift else None
    scale = rand(B, D, dtype=mod_dt, scale=0.3)
    out_dtype = y_dt if dtypes == "autocast" else None  # autocast: h is the next matmul's input
    inputs = {k: v for k, v in dict(x=x, y=y, gate=gate, weight=weight, shift=shift, scale=scale).items() if v is not None}

    h, res = adaln_norm(x, y, gate, weight, shift, scale, 1e-6, out_dtype)
    h_ref, res_ref = reference(x, y, gate, weight, shift, scale, 1e-6, out_dtype)
    ulps = BF16_ULPS_ALL if dtypes == "bf16" else BF16_ULPS
    assert_close(h, h_ref, "h", ulps=ulps)
    assert_close(res, res_ref, "res", ulps=ulps)

    dh = torch.randn(h.shape, generator=g).to(h.dtype).to(DEVICE)
    dres = torch.randn(res.shape, generator=g).to(res.dtype).to(DEVICE)
    outs, outs_ref = ([h, res], [h_ref, res_ref]) if has_res else ([h], [h_ref])
    grads = torch.autograd.grad(outs, list(inputs.values()), [dh, dres][: len(outs)])
    grads_ref = torch.autograd.grad(outs_ref, list(inputs.values()), [dh, dres][: len(outs)])
    for name, a, b in zip(inputs, grads, grads_ref):
        # dweight is fp32 in every layout, but in the all-bf16 model eager computes it from bf16
        # intermediates, so it is held to the bf16 bound there.
        assert_close(a, b, f"d{name}", column_sum=name in ("gate", "shift", "scale", "weight"), ulps=ulps,
                     bf16_chain=dtypes == "bf16")


def test_model_with_kernels_matches_golden(golden_dir) -> None:
    """The whole LightningDiT with the fused path on reproduces the authors' golden velocity."""
    _runs_triton()
    from sfd.checkpoint import load_tensors
    from sfd.loading import load_model

    model = load_model(golden_dir / "lightningdit-tiny-weights.safetensors")[0].to(DEVICE)
    io = {k: v.to(DEVICE) for k, v in load_tensors(golden_dir / "lightningdit-tiny-io.safetensors").items()}
    assert model.use_kernels(True) == len(model.blocks) + 1
    with torch.no_grad():
        v = model(io["x"], (io["t_tex"], io["t_sem"]), io["y"])
        _, repa = model(io["cfg_x"], (io["cfg_t_tex"], io["cfg_t_sem"]), io["cfg_y"], return_repa=True)
    torch.testing.assert_close(v, io["velocity"], rtol=0, atol=1e-5)
    torch.testing.assert_close(repa, io["repa_projection"], rtol=0, atol=1e-5)


def test_model_gradients_with_kernels_match_eager(golden_dir) -> None:
    """Training-mode forward + backward of the whole model: fused vs eager parameter gradients."""
    _runs_triton()
    from sfd.loading import load_model

    path = golden_dir / "lightningdit-tiny-weights.safetensors"
    eager, fused = (load_model(path)[0].to(DEVICE).requires_grad_() for _ in range(2))  # trained here
    fused.use_kernels(True)
    g = torch.Generator().manual_seed(0)
    cfg = eager.cfg
    x = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g).to(DEVICE)
    t = torch.rand(2, generator=g).to(DEVICE)
    y = torch.tensor([1, 3], device=DEVICE)
    for model in (eager, fused):
        v, repa = model(x, (t * 0.7, t), y, return_repa=True)
        (v.square().mean() + repa.square().mean()).backward()
    for (name, a), b in zip(fused.named_parameters(), eager.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, "-q"] + (["-p", "no:cacheprovider"] if os.environ.get("CI") else [])))
