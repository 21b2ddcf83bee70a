"""bf16 weight copies written by the optimizer instead of cast by autocast each step
(``TrainConfig.weight_cast = optimizer``).

Under bf16 autocast every ``nn.Linear`` casts its fp32 weight to bf16 in each forward (R4 W2 per
parameter) and casts the bf16 weight gradient back to fp32 in backward (the GEMM writes 2 bytes,
the cast reads 2 and writes 4). On an H100/H200 that is 12 of the 52 bytes per parameter a
training step moves outside the matmuls (bench/budget.py). With ``weight_cast = optimizer``:

- each Linear of the model keeps a bf16 copy of its weight (``Linear.weight_lp``) that the
  optimizer's one pass writes as it updates the fp32 weight (W2: it has the new value in
  registers), so the forward reads bf16 directly and casts nothing;
- the weight gradient comes out of the GEMM in fp32 on CUDA (``torch.mm(..., out_dtype=float32)``,
  cuBLAS's bf16 × bf16 → fp32): no bf16 rounding of the gradient, no cast pass. Elsewhere
  (no such kernel on CPU) it is the same product computed from the bf16 operands in fp32.

So 52 → 44 bytes per parameter. The maths of the forward is autocast's exactly (the copy is the
value autocast would cast); the weight gradient is autocast's without its final rounding to bf16.

The copies are derived state: never saved, rebuilt from the fp32 weights whenever those are set
from elsewhere (:meth:`WeightCopies.refresh` after resume and DDP's broadcast), and checked against
them at each checkpoint (:meth:`WeightCopies.check`): a stale copy would train silently wrong.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Linear", "WeightCopies", "attach", "cast_linear"]


def _weight_grad(grad: Tensor, x: Tensor) -> Tensor:
    """``gradᵀ·x`` (out, in) in fp32 from bf16 operands: cuBLAS's fp32-output GEMM on CUDA."""
    if grad.is_cuda:
        return torch.mm(grad.t(), x, out_dtype=torch.float32)
    return torch.mm(grad.t().float(), x.float())


class _CastLinear(torch.autograd.Function):
    """``F.linear`` as autocast runs it, with the weight's low-precision copy given."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, weight_lp: Tensor) -> Tensor:
        dtype = weight_lp.dtype
        x_lp = x.to(dtype)
        ctx.save_for_backward(x_lp, weight_lp)
        ctx.x_dtype, ctx.has_bias = x.dtype, bias is not None
        return F.linear(x_lp, weight_lp, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad: Tensor):
        x_lp, weight_lp = ctx.saved_tensors
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        grad = grad.to(weight_lp.dtype)
        g2, x2 = grad.reshape(-1, grad.shape[-1]), x_lp.reshape(-1, x_lp.shape[-1])
        grad_x = (grad @ weight_lp).to(ctx.x_dtype) if need_x else None  # e.g. not for the time code
        grad_w = _weight_grad(g2, x2) if need_w else None
        grad_b = g2.float().sum(0) if ctx.has_bias and need_b else None
        return grad_x, grad_w, grad_b, None


def cast_linear(x: Tensor, weight: Tensor, bias: Tensor | None, weight_lp: Tensor) -> Tensor:
    return _CastLinear.apply(x, weight, bias, weight_lp)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) that uses ``weight_lp`` when one is attached
    and autocast runs in its dtype; otherwise exactly ``nn.Linear``."""

    weight_lp: Tensor | None = None  # a plain attribute: not a parameter, not a buffer, never saved

    def __getstate__(self) -> dict:
        # A deep copy (the EMA model, an evaluation copy) must not share or freeze the training
        # model's copy: nothing would update it. Copies are attached only by attach().
        return {k: v for k, v in super().__getstate__().items() if k != "weight_lp"}

    def forward(self, x: Tensor) -> Tensor:
        lp = self.weight_lp
        if lp is not None and torch.is_autocast_enabled(x.device.type) and torch.get_autocast_dtype(x.device.type) == lp.dtype:
            return cast_linear(x, self.weight, self.bias, lp)
        return super().forward(x)


class WeightCopies:
    """The (fp32 weight, low-precision copy) pairs of a model's :class:`Linear` layers."""

    def __init__(self, pairs: list[tuple[Tensor, Tensor]]) -> None:
        self.pairs = pairs
        self.of = {id(p): c for p, c in pairs}

    def __len__(self) -> int:
        return len(self.pairs)

    def numel(self) -> int:
        return sum(p.numel() for p, _ in self.pairs)

    @torch.no_grad()
    def refresh(self) -> None:
        """Copies ← weights (after anything but the optimizer wrote the weights)."""
        if self.pairs:
            torch._foreach_copy_([c for _, c in self.pairs], [p for p, _ in self.pairs])

    @torch.no_grad()
    def stale(self) -> list[int]:
        """Indices of pairs whose copy is not the weight rounded to the copy's dtype."""
        return [i for i, (p, c) in enumerate(self.pairs) if not torch.equal(p.to(c.dtype), c)]


def attach(model: nn.Module, dtype: torch.dtype) -> WeightCopies:
    """Give every trainable :class:`Linear` of ``model`` a ``dtype`` copy of its weight (filled now)."""
    pairs = []
    for module in model.modules():
        if isinstance(module, Linear) and module.weight.requires_grad:
            module.weight_lp = module.weight.detach().to(dtype).contiguous()
            pairs.append((module.weight, module.weight_lp))
    if not pairs:
        raise ValueError("weight_cast=optimizer: the model has no sfd.weight_copies.Linear layers to give copies")
    return WeightCopies(pairs)
