"""Gated residual + RMSNorm + adaLN modulate in one pass (forward and backward).

In a LightningDiT block (docs/performance.md, "Byte budget") the chain between two matmuls is

    res = x + gate·y                      # adaLN-Zero gated residual (absent before norm1)
    h   = RMSNorm(res)·(1 + scale) + shift

with x the fp32 residual stream, y the bf16 output of the attention projection, and gate, scale,
shift per-sample (B, D) rows of the adaLN projection. torch.compile fuses the forward into one
kernel already; its backward it cannot: the row reduction of the RMSNorm gradient (over D) and
the column reductions of dgate, dscale, dshift and dweight (over the tokens) run along different
axes, so inductor reads the big tensors again for each. The kernel here does them all in one
read of (res, y, dh, dres): each program takes a run of rows of one sample, does the row
reduction per row and keeps the column sums in registers, then writes one partial row per
program (summed afterwards in fixed order: deterministic, no atomics).

Rounding follows the eager model exactly where it rounds: the product gate·y in y's dtype, res
in x's dtype, RMSNorm's output in res's dtype, (1 + scale) in scale's dtype, the modulated value
in promote(res, scale). Everything else is fp32, so fp32 results equal eager up to summation
order and bf16 results lie within a few ulp (tests/test_kernels.py states the bound).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sfd.kernels._triton import HAVE_TRITON, INTERPRET, next_pow2, num_sms, tl_dtype, use_triton

# ---------------------------------------------------------------------------------------------
# The eager reference: the model's own maths (LightningDiTBlock, RMSNorm, modulate)


def reference(
    x: Tensor,
    y: Tensor | None,
    gate: Tensor | None,
    weight: Tensor,
    shift: Tensor | None,
    scale: Tensor,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """(h, res) for x (B, N, D), y (B, N, D) or None, gate/shift/scale (B, D), weight (D,)."""
    res = x if y is None else x + gate.unsqueeze(1) * y
    r32 = res.float()
    normed = r32 * torch.rsqrt(r32.pow(2).mean(-1, keepdim=True) + eps)
    h = (normed * weight.float()).to(res.dtype)
    h = h * (1 + scale.unsqueeze(1))
    if shift is not None:
        h = h + shift.unsqueeze(1)
    return h.to(out_dtype or h.dtype), res


def _modulated_dtype(res_dtype: torch.dtype, mod_dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(res_dtype, mod_dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernels

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _round(x, T: tl.constexpr):
        """fp32 ``x`` rounded to dtype ``T`` (nearest even), kept in fp32.

        For bf16 by integer arithmetic: the Triton interpreter truncates fp32→bf16 casts, the
        GPU rounds to nearest even, and this gives the GPU's (and torch's) result in both.
        """
        if T == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            return tl.where(x == x, bits.to(tl.float32, bitcast=True), x)  # NaN stays NaN
        elif T == tl.float32:
            return x
        else:
            return x.to(T).to(tl.float32)

    @triton.jit
    def _fwd_kernel(
        X, Y, GATE, W, SHIFT, SCALE,  # inputs
        RES, H, RSTD,  # outputs
        T, N, D, eps,
        HAS_RES: tl.constexpr, HAS_SHIFT: tl.constexpr,
        GY_T: tl.constexpr, RES_T: tl.constexpr, MOD_T: tl.constexpr, P_T: tl.constexpr, H_T: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # A tile of BLOCK_R rows (tokens, any samples) x the whole hidden width.
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_D)
        rm = rows < T
        m = rm[:, None] & (cols < D)[None, :]
        at = rows[:, None] * D + cols[None, :]
        per_sample = (rows // N)[:, None] * D + cols[None, :]  # (B, D) adaLN rows, broadcast over tokens
        x = tl.load(X + at, mask=m, other=0.0).to(tl.float32)
        if HAS_RES:
            y = tl.load(Y + at, mask=m, other=0.0).to(tl.float32)
            g = tl.load(GATE + per_sample, mask=m, other=0.0).to(tl.float32)
            x = _round(x + _round(g * y, GY_T), RES_T)
            tl.store(RES + at, x.to(RES_T), mask=m)
        ms = tl.sum(x * x, axis=1) / D
        r = 1.0 / tl.sqrt(ms + eps)
        tl.store(RSTD + rows, r, mask=rm)
        w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
        u = _round((x * r[:, None]) * w[None, :], RES_T)
        s1 = _round(1.0 + tl.load(SCALE + per_sample, mask=m, other=0.0).to(tl.float32), MOD_T)
        h = _round(u * s1, P_T)
        if HAS_SHIFT:
            h = _round(h + tl.load(SHIFT + per_sample, mask=m, other=0.0).to(tl.float32), P_T)
        tl.store(H + at, _round(h, H_T).to(H_T), mask=m)

    @triton.jit
    def _bwd_kernel(
        RES, Y, GATE, W, SCALE, RSTD, DH, DRES,  # inputs (DRES: grad of the res output)
        DX, DY,  # outputs, full size
        PART_W, PART_SCALE, PART_SHIFT, PART_GATE,  # (B, P, D) fp32 partial column sums
        N, D, P,
        HAS_RES: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_DRES: tl.constexpr,
        RES_T: tl.constexpr, MOD_T: tl.constexpr, DX_T: tl.constexpr, DY_T: tl.constexpr,
        ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # Program (b, p): rows p*ROWS ... of sample b, in tiles of BLOCK_R rows; the row
        # reductions per tile, the column sums (over tokens) carried in registers.
        b = tl.program_id(0).to(tl.int64)
        p = tl.program_id(1).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        cm = cols < D
        w = tl.load(W + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
        s1 = _round(1.0 + tl.load(SCALE + b * D + cols, mask=cm, other=0.0).to(tl.float32), MOD_T)[None, :]
        if HAS_RES:
            g = tl.load(GATE + b * D + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
        acc_w = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_scale = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_shift = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_gate = tl.zeros([BLOCK_D], dtype=tl.float32)
        for i in range(0, ROWS, BLOCK_R):
            n = p * ROWS + i + tl.arange(0, BLOCK_R)
            rm = n < N
            m = rm[:, None] & cm[None, :]
            row = b * N + n
            at = row[:, None] * D + cols[None, :]
            x = tl.load(RES + at, mask=m, other=0.0).to(tl.float32)
            r = tl.load(RSTD + row, mask=rm, other=0.0)[:, None]
            dh = tl.load(DH + at, mask=m, other=0.0).to(tl.float32)
            xhat = x * r
            u = _round(xhat * w, RES_T)
            acc_shift += tl.sum(dh, axis=0)
            acc_scale += tl.sum(dh * u, axis=0)
            du = dh * s1
            acc_w += tl.sum(du * xhat, axis=0)
            dxhat = du * w
            c = tl.sum(dxhat * xhat, axis=1)[:, None] / D
            dres = r * (dxhat - xhat * c)
            if HAS_DRES:
                dres += tl.load(DRES + at, mask=m, other=0.0).to(tl.float32)
            tl.store(DX + at, _round(dres, DX_T).to(DX_T), mask=m)
            if HAS_RES:
                y = tl.load(Y + at, mask=m, other=0.0).to(tl.float32)
                acc_gate += tl.sum(dres * y, axis=0)
                tl.store(DY + at, _round(dres * g, DY_T).to(DY_T), mask=m)
        out = (b * P + p) * D + cols
        tl.store(PART_W + out, acc_w, mask=cm)
        tl.store(PART_SCALE + out, acc_scale, mask=cm)
        if HAS_SHIFT:
            tl.store(PART_SHIFT + out, acc_shift, mask=cm)
        if HAS_RES:
            tl.store(PART_GATE + out, acc_gate, mask=cm)


def _num_warps(block_d: int) -> int:
    return max(1, min(16, block_d // 256))


def _block_rows(block_d: int, limit: int) -> int:
    # ~4K elements per tile on a GPU (a few fp32 registers per thread per live tile); the
    # interpreter pays per operation, not per element, so it takes the largest tile allowed.
    return next_pow2(limit) if INTERPRET else max(1, min(next_pow2(limit), 4096 // block_d))


def _rows_per_program(B: int, N: int, device: torch.device) -> int:
    # Enough programs to fill the GPU about four times over, few enough that the fp32 partial
    # rows (four per program) stay a small fraction of the bytes of the rows themselves.
    target = 4 * num_sms(device)
    return max(1, min(next_pow2(N), next_pow2(max(1, B * N // target))))


def _fwd_triton(x, y, gate, weight, shift, scale, eps, out_dtype):
    B, N, D = x.shape
    x = x.contiguous()
    has_res = y is not None
    res_dtype = torch.promote_types(x.dtype, torch.promote_types(gate.dtype, y.dtype)) if has_res else x.dtype
    mod_dtype = scale.dtype
    p_dtype = _modulated_dtype(res_dtype, mod_dtype)
    res = torch.empty((B, N, D), dtype=res_dtype, device=x.device) if has_res else x.new_empty(0)
    h = torch.empty((B, N, D), dtype=out_dtype, device=x.device)
    rstd = torch.empty((B, N), dtype=torch.float32, device=x.device)
    block_d = next_pow2(D)
    block_r = _block_rows(block_d, min(B * N, 64))
    _fwd_kernel[(-(-B * N // block_r),)](
        x, y.contiguous() if has_res else x, gate.contiguous() if has_res else x, weight.contiguous(),
        shift.contiguous() if shift is not None else scale, scale.contiguous(),
        res if has_res else x, h, rstd,
        B * N, N, D, eps,
        HAS_RES=has_res, HAS_SHIFT=shift is not None,
        GY_T=tl_dtype(torch.promote_types(gate.dtype, y.dtype)) if has_res else tl_dtype(x.dtype),
        RES_T=tl_dtype(res_dtype), MOD_T=tl_dtype(mod_dtype), P_T=tl_dtype(p_dtype), H_T=tl_dtype(out_dtype),
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=_num_warps(block_d),
    )
    return h, res, rstd


def _bwd_triton(dh, dres, res, y, gate, weight, shift_dtype, scale, rstd, x_dtype):
    B, N, D = res.shape
    has_res = y is not None
    rows = _rows_per_program(B, N, res.device)
    P = -(-N // rows)
    f32 = dict(dtype=torch.float32, device=res.device)
    part_w, part_scale = torch.empty((B, P, D), **f32), torch.empty((B, P, D), **f32)
    part_shift = torch.empty((B, P, D), **f32) if shift_dtype is not None else part_w
    part_gate = torch.empty((B, P, D), **f32) if has_res else part_w
    dx = torch.empty((B, N, D), dtype=x_dtype, device=res.device)
    dy = y.new_empty(y.shape) if has_res else dx
    block_d = next_pow2(D)
    _bwd_kernel[(B, P)](
        res.contiguous(), y.contiguous() if has_res else res, gate.contiguous() if has_res else res,
        weight.contiguous(), scale.contiguous(), rstd, dh.contiguous(),
        dres.contiguous() if dres is not None else res,
        dx, dy, part_w, part_scale, part_shift, part_gate,
        N, D, P,
        HAS_RES=has_res, HAS_SHIFT=shift_dtype is not None, HAS_DRES=dres is not None,
        RES_T=tl_dtype(res.dtype), MOD_T=tl_dtype(scale.dtype), DX_T=tl_dtype(x_dtype), DY_T=tl_dtype(dy.dtype),
        ROWS=rows, BLOCK_R=_block_rows(block_d, rows), BLOCK_D=block_d, num_warps=_num_warps(block_d),
    )
    dweight = part_w.sum((0, 1)).to(weight.dtype)
    dscale = part_scale.sum(1).to(scale.dtype)
    dshift = part_shift.sum(1).to(shift_dtype) if shift_dtype is not None else None
    dgate = part_gate.sum(1).to(gate.dtype) if has_res else None
    return dx, (dy if has_res else None), dgate, dweight, dshift, dscale


# ---------------------------------------------------------------------------------------------
# Eager backward (the CPU path of the op, and what the Triton backward is tested against)


def _bwd_eager(dh, dres, res, y, gate, weight, shift_dtype, scale, rstd, x_dtype):
    r = rstd.unsqueeze(-1)
    x32 = res.float()
    xhat = x32 * r
    w = weight.float()
    u = (xhat * w).to(res.dtype).float()
    s1 = (1 + scale.unsqueeze(1)).float()
    dh = dh.float()
    dshift = dh.sum(1).to(shift_dtype) if shift_dtype is not None else None
    dscale = (dh * u).sum(1).to(scale.dtype)
    du = dh * s1
    dweight = (du * xhat).sum((0, 1)).to(weight.dtype)
    dxhat = du * w
    d = r * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    if dres is not None:
        d = d + dres.float()
    if y is None:
        return d.to(x_dtype), None, None, dweight, dshift, dscale
    dgate = (d * y.float()).sum(1).to(gate.dtype)
    dy = (d * gate.float().unsqueeze(1)).to(y.dtype)
    return d.to(x_dtype), dy, dgate, dweight, dshift, dscale


# ---------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile (no graph break), autograd through register_autograd


def _opt(t: Tensor) -> Tensor | None:
    return None if t.numel() == 0 and t.dim() == 1 else t


@torch.library.custom_op("sfd::adaln_norm_fwd", mutates_args=())
def _adaln_norm_fwd(
    x: Tensor, y: Tensor | None, gate: Tensor | None, weight: Tensor, shift: Tensor | None,
    scale: Tensor, eps: float, out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    if use_triton(x):
        return _fwd_triton(x, y, gate, weight, shift, scale, eps, out_dtype)
    h, res = reference(x, y, gate, weight, shift, scale, eps, out_dtype)
    rstd = torch.rsqrt(res.float().pow(2).mean(-1) + eps)
    # Outputs are contiguous whatever the input layout (the fake kernel promises that; the
    # residual stream after the patch embedding is a transposed view).
    return h.contiguous(), (res.contiguous() if y is not None else x.new_empty(0)), rstd.contiguous()


@_adaln_norm_fwd.register_fake
def _(x, y, gate, weight, shift, scale, eps, out_dtype):
    B, N, D = x.shape
    if y is not None:
        res_dtype = torch.promote_types(x.dtype, torch.promote_types(gate.dtype, y.dtype))
        res = x.new_empty((B, N, D), dtype=res_dtype)
    else:
        res = x.new_empty(0)
    return x.new_empty((B, N, D), dtype=out_dtype), res, x.new_empty((B, N), dtype=torch.float32)


@torch.library.custom_op("sfd::adaln_norm_bwd", mutates_args=())
def _adaln_norm_bwd(
    dh: Tensor, dres: Tensor | None, res: Tensor, y: Tensor | None, gate: Tensor | None,
    weight: Tensor, shift_dtype: torch.dtype | None, scale: Tensor, rstd: Tensor, x_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    impl = _bwd_triton if use_triton(res) else _bwd_eager
    out = impl(dh, dres, res, y, gate, weight, shift_dtype, scale, rstd, x_dtype)
    # A custom op returns tensors only: an absent gradient travels as an empty 1-d tensor.
    return tuple(res.new_empty(0) if t is None else t.contiguous() for t in out)


@_adaln_norm_bwd.register_fake
def _(dh, dres, res, y, gate, weight, shift_dtype, scale, rstd, x_dtype):
    B, N, D = res.shape
    empty = res.new_empty(0)
    return (
        res.new_empty((B, N, D), dtype=x_dtype),
        y.new_empty(y.shape) if y is not None else empty,
        gate.new_empty(gate.shape) if y is not None else empty,
        weight.new_empty(weight.shape),
        scale.new_empty((B, D), dtype=shift_dtype) if shift_dtype is not None else empty,
        scale.new_empty(scale.shape),
    )


def _setup_context(ctx, inputs, output):
    x, y, gate, weight, shift, scale, eps, out_dtype = inputs
    _, res, rstd = output
    ctx.has_res = y is not None
    ctx.x_dtype = x.dtype
    ctx.shift_dtype = shift.dtype if shift is not None else None
    ctx.save_for_backward(res if ctx.has_res else x, y, gate, weight, scale, rstd)


def _backward(ctx, dh, dres, _drstd):
    res, y, gate, weight, scale, rstd = ctx.saved_tensors
    if not ctx.has_res or dres is None or dres.numel() == 0:
        dres = None
    dx, dy, dgate, dweight, dshift, dscale = _adaln_norm_bwd(
        dh, dres, res, y, gate, weight, ctx.shift_dtype, scale, rstd, ctx.x_dtype
    )
    dy, dgate, dshift = (_opt(t) for t in (dy, dgate, dshift))
    return dx, dy, dgate, dweight, dshift, dscale, None, None


_adaln_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def adaln_norm(
    x: Tensor,
    y: Tensor | None,
    gate: Tensor | None,
    weight: Tensor,
    shift: Tensor | None,
    scale: Tensor,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Fused :func:`reference`: (h, res), h in ``out_dtype`` (default: res's dtype).

    ``res`` is ``x`` itself when ``y`` is None. Same arguments and results as the reference;
    the Triton kernel runs on CUDA (or under ``TRITON_INTERPRET=1``), the reference elsewhere.
    """
    if (y is None) != (gate is None):
        raise ValueError("adaln_norm: y and gate go together (both or neither)")
    if x.dim() != 3 or scale.shape != (x.shape[0], x.shape[2]) or weight.shape != (x.shape[2],):
        raise ValueError(
            f"adaln_norm: x (B, N, D), scale (B, D), weight (D,); got {tuple(x.shape)}, "
            f"{tuple(scale.shape)}, {tuple(weight.shape)}"
        )
    if shift is not None and shift.dtype != scale.dtype:
        raise TypeError(f"adaln_norm: shift {shift.dtype} and scale {scale.dtype} must share a dtype")
    res_dtype = x.dtype if y is None else torch.promote_types(x.dtype, torch.promote_types(gate.dtype, y.dtype))
    out_dtype = out_dtype or _modulated_dtype(res_dtype, scale.dtype)
    h, res, _ = _adaln_norm_fwd(x, y, gate, weight, shift, scale, float(eps), out_dtype)
    return h, (x if y is None else res)


__all__ = ["adaln_norm", "reference"]
