"""The per-parameter update of a training step: gradient clipping, AdamW and the EMA as one pass.

After the backward pass the trainer touches every parameter three more times — the gradient norm
(and, with ``grad_clip``, a scaling of every gradient), AdamW, and the EMA lerp — and on an
H100/H200 these passes are pure memory traffic (bench/budget.py). Per fp32 parameter:

==========================  =======================================  ==============
pass                        reads / writes                           bytes
==========================  =======================================  ==============
gradient norm               R g                                      4
clip (grad_clip > 0)        R g, W g                                 8
AdamW (torch, fused=True)   R p g m v, W p m v                       28
EMA lerp                    R e p, W e                               12
**one pass** (this module)  R p g m v e, W p m v e                   36 (vs 40/48)
+ bf16 weight copies        W c (``weight_cast=optimizer``)          +2 (vs autocast's R4 W2 cast)
==========================  =======================================  ==============

The norm stays a pass of its own: the trainer must know it (non-finite → skip the step on every
rank, clipping → the scale) before any parameter changes. What is fused is everything after it.

:class:`FusedAdamWEMA` *is* a ``torch.optim.AdamW`` (same param groups, same state: ``step``,
``exp_avg``, ``exp_avg_sq``), so its ``state_dict`` is torch's and checkpoints move between the two
``optimizer`` settings in both directions. Its step runs the maths of torch's AdamW in the same
order (decoupled weight decay ``p·(1 − lr·wd)``, ``m ← lerp(m, g, 1 − β1)``,
``v ← β2·v + (1 − β2)·g·g``, ``p ← p − lr/(1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + eps)``), then
``ema ← lerp(ema, p, 1 − decay)``, with ``g`` first scaled by clip_grad_norm_'s
``min(max_norm / (norm + 1e-6), 1)``:

- ``compiled=False`` (the reference, and the setting under ``kernels=eager``): torch's own foreach
  sequence, bit-identical to ``torch.optim.AdamW(foreach=True)`` + ``clip_grad_norm_`` +
  ``torch._foreach_lerp_`` (tests/test_optim.py checks it bitwise);
- ``compiled=True``: the same per-element chain written once per tensor and ``torch.compile``-d,
  so inductor emits one kernel per parameter (grouped into combo kernels on GPU) that reads each
  of p, g, m, v, ema once and writes p, m, v, ema once. Equal to the reference to float rounding
  (inductor may contract a multiply-add); the test bounds it over 100 steps.

:func:`grad_norm` and :func:`update` are the two calls the trainer makes, for either setting.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from sfd.registry import Registry
from sfd.weight_copies import WeightCopies

__all__ = ["OPTIMIZERS", "FusedAdamWEMA", "build_optimizer", "grad_norm", "update", "clip_coefficient"]

#: ``TrainConfig.optimizer``: how the per-parameter update runs (both are AdamW + EMA).
OPTIMIZERS: Registry[Callable[..., torch.optim.Optimizer]] = Registry("optimizer")

CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s guard in max_norm / (norm + 1e-6)


def clip_coefficient(norm: Tensor, max_norm: float) -> Tensor:
    """clip_grad_norm_'s scale: ``min(max_norm / (norm + 1e-6), 1)`` (a tensor, no host sync)."""
    return torch.clamp(max_norm / (norm + CLIP_EPS), max=1.0)


def _one_pass(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    emas: list[Tensor], s: Tensor, coef: Tensor | None, copies: list[Tensor | None] | None = None,
) -> None:
    """The fused chain per tensor; ``s`` = [1 − lr·wd, 1 − β1, β2, 1 − β2, √(1 − β2ᵗ), eps,
    −lr/(1 − β1ᵗ), 1 − decay] (fp32, on the parameters' device, so no step recompiles).

    Each line mirrors one foreach op of torch's AdamW, in its order and association: addcmul is
    ``v + (value·g)·g``, addcdiv is ``p + (value·m)/d``. ``copies`` (weight_cast=optimizer,
    sfd/weight_copies.py): where not None, the new weight rounded to the copy's dtype is written
    there in the same pass (the next forward reads it instead of casting the weight).
    """
    for i, (p, g, m, v, e) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, emas)):
        if coef is not None:
            g = g * coef
        p.mul_(s[0])
        m.lerp_(g, s[1])
        v.mul_(s[2]).add_(s[3] * g * g)
        d = v.sqrt() / s[4] + s[5]
        p.add_(s[6] * m / d)
        e.lerp_(p, s[7])
        if copies is not None and copies[i] is not None:
            copies[i].copy_(p)


_COMPILED: dict[str, Callable[..., None]] = {}


def _compiled_pass() -> Callable[..., None]:
    if "pass" not in _COMPILED:  # one compiled function per process; dynamo caches per model
        _COMPILED["pass"] = torch.compile(_one_pass, fullgraph=True, dynamic=False)
    return _COMPILED["pass"]


class FusedAdamWEMA(torch.optim.AdamW):
    """AdamW whose ``step`` also clips the gradients and updates the EMA, in one pass.

    ``ema_params`` pairs with ``params`` (same order and shapes); ``max_grad_norm`` 0 = no
    clipping. ``step(grad_norm=...)`` takes the norm the caller already computed (it needs it for
    its skip decision); without it the step computes it. ``step(weight_copies=...)`` also writes
    the new weights' bf16 copies in the same pass (sfd/weight_copies.py).
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        ema_params: Iterable[Tensor],
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        ema_decay: float = 0.9999,
        max_grad_norm: float = 0.0,
        compiled: bool = False,
    ) -> None:
        params = list(params)
        ema_params = list(ema_params)
        if len(params) != len(ema_params) or any(p.shape != e.shape for p, e in zip(params, ema_params)):
            raise ValueError("FusedAdamWEMA: ema_params must pair with params (same order and shapes)")
        # foreach=True records the reference's path in the state dict (what torch would run on load).
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=True)
        self.ema_of = {p: e for p, e in zip(params, ema_params)}
        self.ema_decay = float(ema_decay)
        self.max_grad_norm = float(max_grad_norm)
        self.compiled = compiled

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # A checkpoint of torch's fused/capturable AdamW keeps `step` on the device; ours counts on
        # the host (as torch's foreach path), so bias corrections need no device sync.
        for group in self.param_groups:
            group["fused"], group["capturable"], group["foreach"] = None, False, True
            for p in group["params"]:
                st = self.state.get(p)
                if st and "step" in st:
                    st["step"] = st["step"].detach().to("cpu", torch.float32)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None, grad_norm: Tensor | None = None,  # type: ignore[override]
             weight_copies: WeightCopies | None = None) -> None:
        if closure is not None:
            raise ValueError("FusedAdamWEMA.step takes no closure")
        coef = None
        if self.max_grad_norm > 0:
            if grad_norm is None:
                grad_norm = torch.nn.utils.get_total_norm(
                    [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None], foreach=True
                )
            coef = clip_coefficient(grad_norm, self.max_grad_norm)
        for group in self.param_groups:
            self._step_group(group, coef, weight_copies)

    def _step_group(self, group: dict, coef: Tensor | None, weight_copies: WeightCopies | None) -> None:
        if group["amsgrad"] or group["maximize"]:
            raise ValueError("FusedAdamWEMA implements plain AdamW (amsgrad=False, maximize=False)")
        params, grads, exp_avgs, exp_avg_sqs, emas, steps, idle = [], [], [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                idle.append(p)  # no gradient: AdamW leaves it, the EMA still follows it
                continue
            st = self.state[p]
            if not st:  # torch's initial state (AdamW._init_group, host step as on its foreach path)
                st["step"] = torch.tensor(0.0, dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(st["exp_avg"])
            exp_avg_sqs.append(st["exp_avg_sq"])
            emas.append(self.ema_of[p])
            steps.append(st["step"])
        weight = 1.0 - self.ema_decay
        if idle:
            torch._foreach_lerp_([self.ema_of[p] for p in idle], idle, weight)
        if not params:
            return
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        lr, beta1, beta2 = float(lr), float(beta1), float(beta2)
        torch._foreach_add_(steps, torch.tensor(1.0), alpha=1.0)
        counts = {float(s) for s in steps}
        if self.compiled and len(counts) == 1:
            t = counts.pop()
            # The scalars as torch computes them (Python doubles), rounded once to fp32 as its
            # kernels do when they apply a double scalar to fp32 tensors.
            s = [1 - lr * wd, 1 - beta1, beta2, 1 - beta2, (1 - beta2**t) ** 0.5, eps, -(lr / (1 - beta1**t)), weight]
            dev = params[0].device
            s_t = torch.tensor(s, dtype=torch.float32).to(dev, non_blocking=True)
            c_t = None if coef is None else coef.to(dev, torch.float32)
            copies = None if weight_copies is None else [weight_copies.of.get(id(p)) for p in params]
            _compiled_pass()(params, grads, exp_avgs, exp_avg_sqs, emas, s_t, c_t, copies)
            return
        # Reference: torch's foreach sequence (clip_grad_norm_, _multi_tensor_adam, EMA lerp).
        if coef is not None:
            torch._foreach_mul_(grads, coef.to(grads[0].device))
        if wd != 0:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        bc1 = [1 - beta1 ** float(st) for st in steps]
        bc2 = [1 - beta2 ** float(st) for st in steps]
        step_size = [(lr / bc) * -1 for bc in bc1]
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, [bc**0.5 for bc in bc2])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denom, step_size)
        torch._foreach_lerp_(emas, params, weight)
        if weight_copies is not None:
            pairs = [(weight_copies.of[id(p)], p) for p in params if id(p) in weight_copies.of]
            if pairs:
                torch._foreach_copy_([c for c, _ in pairs], [p for _, p in pairs])


# ---------------------------------------------------------------------------------------------
# The trainer's two calls


@OPTIMIZERS.register("fused")
def _build_fused(params: Sequence[Tensor], ema_params: Sequence[Tensor], *, lr: float, betas: tuple[float, float],
                 weight_decay: float, ema_decay: float, grad_clip: float, compiled: bool, device: torch.device) -> torch.optim.Optimizer:
    return FusedAdamWEMA(params, ema_params, lr=lr, betas=betas, weight_decay=weight_decay,
                         ema_decay=ema_decay, max_grad_norm=grad_clip, compiled=compiled)


@OPTIMIZERS.register("torch")
def _build_torch(params: Sequence[Tensor], ema_params: Sequence[Tensor], *, lr: float, betas: tuple[float, float],
                 weight_decay: float, ema_decay: float, grad_clip: float, compiled: bool, device: torch.device) -> torch.optim.Optimizer:
    # torch's fused kernel on CUDA, its foreach path elsewhere; the EMA is a separate lerp (update()).
    return torch.optim.AdamW(list(params), lr=lr, betas=betas, weight_decay=weight_decay,
                             fused=True if device.type == "cuda" else None)


def build_optimizer(kind: str, params: Sequence[Tensor], ema_params: Sequence[Tensor], **kw) -> torch.optim.Optimizer:
    """The optimizer of ``TrainConfig.optimizer`` (``fused`` | ``torch``); see :data:`OPTIMIZERS`."""
    return OPTIMIZERS[kind](params, ema_params, **kw)


def grad_norm(optimizer: torch.optim.Optimizer, params: Sequence[Tensor], grad_clip: float) -> Tensor:
    """The total gradient norm before clipping. ``torch``: clip_grad_norm_ now (scales the grads in
    place); ``fused``: only the norm, the scale is applied inside the one pass."""
    if grad_clip > 0 and not isinstance(optimizer, FusedAdamWEMA):
        return torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)


def update(optimizer: torch.optim.Optimizer, params: Sequence[Tensor], ema_params: Sequence[Tensor],
           ema_decay: float, norm: Tensor, weight_copies: WeightCopies | None = None) -> None:
    """AdamW, then the EMA every step (docs/method.md §6): ema ← ema + (1 − decay)·(θ − ema).
    ``weight_copies``: the bf16 copies of the new weights (inside the pass for ``fused``; a cast
    pass after torch's AdamW otherwise, which saves nothing but keeps the copies right)."""
    if isinstance(optimizer, FusedAdamWEMA):
        optimizer.step(grad_norm=norm, weight_copies=weight_copies)
        return
    optimizer.step()
    torch._foreach_lerp_(list(ema_params), list(params), 1.0 - ema_decay)
    if weight_copies is not None:
        weight_copies.refresh()
