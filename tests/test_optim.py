"""sfd.optim: the one-pass clip + AdamW + EMA update equals torch's three passes, and its state
dict is torch's AdamW's (resume is bitwise, checkpoints move between the two settings)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from sfd.optim import OPTIMIZERS, FusedAdamWEMA, build_optimizer, grad_norm, update

HP = dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.05)
DECAY, CLIP = 0.99, 0.7


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.SiLU(), nn.LayerNorm(32), nn.Linear(32, 32), nn.SiLU(), nn.Linear(32, 5))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 12, generator=g), torch.randn(16, 5, generator=g)


class Run:
    """A model, its EMA copy and an optimizer of one kind, stepped as the trainer does."""

    def __init__(self, kind: str, compiled: bool = False, clip: float = CLIP) -> None:
        self.model = small_model()
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.params, self.emas = list(self.model.parameters()), list(self.ema.parameters())
        self.clip = clip
        self.opt = build_optimizer(kind, self.params, self.emas, **HP, ema_decay=DECAY, grad_clip=clip,
                                   compiled=compiled, device=torch.device("cpu"))
        self.norms: list[float] = []

    def step(self, k: int) -> None:
        x, y = batch(k)
        # Large inputs on even steps so clipping is active on some steps and not on others.
        loss = nn.functional.mse_loss(self.model(x * (4.0 if k % 2 == 0 else 1.0)), y)
        loss.backward()
        norm = grad_norm(self.opt, self.params, self.clip)
        self.norms.append(float(norm))
        update(self.opt, self.params, self.emas, DECAY, norm)
        self.opt.zero_grad(set_to_none=True)


def tensors(run: Run) -> dict[str, torch.Tensor]:
    out = {f"p{i}": p.detach().clone() for i, p in enumerate(run.params)}
    out |= {f"e{i}": e.detach().clone() for i, e in enumerate(run.emas)}
    for i, p in enumerate(run.params):
        st = run.opt.state[p]
        out |= {f"m{i}": st["exp_avg"].clone(), f"v{i}": st["exp_avg_sq"].clone(), f"t{i}": st["step"].clone()}
    return out


def roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # what the trainer's checkpoints allow


def test_registry_names_the_two_settings():
    assert OPTIMIZERS.names() == ("fused", "torch")


@pytest.mark.parametrize("clip", [CLIP, 0.0])
def test_reference_pass_is_bitwise_torch(clip: float) -> None:
    ours, theirs = Run("fused", clip=clip), Run("torch", clip=clip)
    assert isinstance(ours.opt, FusedAdamWEMA) and type(theirs.opt) is torch.optim.AdamW
    for k in range(30):
        ours.step(k)
        theirs.step(k)
    assert ours.norms == theirs.norms
    if clip:
        assert min(ours.norms) < clip < max(ours.norms)  # clipping was on for some steps only
    a, b = tensors(ours), tensors(theirs)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # fp32 stays fp32: optimizer state, step counters, EMA.
    assert all(t.dtype == torch.float32 for t in a.values())


@pytest.mark.slow
def test_compiled_one_pass_matches_torch_over_100_steps() -> None:
    # ~100 s on a contended 2-core machine with a cold inductor cache (the compile of one fused pass).
    torch._dynamo.reset()
    ours, theirs = Run("fused", compiled=True), Run("torch")
    try:
        for k in range(100):
            ours.step(k)
            theirs.step(k)
    finally:
        torch._dynamo.reset()
    a, b = tensors(ours), tensors(theirs)
    worst = {k: float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in a}
    # Bound: float rounding only (inductor may contract a multiply-add); 100 steps of AdamW at
    # lr 3e-3 move the weights by ~0.3, so 1e-5 relative is ~30 fp32 ulps of accumulated drift.
    assert max(worst.values()) < 1e-5, sorted(worst.items(), key=lambda kv: -kv[1])[:3]
    assert all(torch.equal(a[f"t{i}"], b[f"t{i}"]) for i in range(len(ours.params)))


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_resume_from_state_dict_is_bitwise(compiled: bool) -> None:
    torch._dynamo.reset()
    try:
        whole = Run("fused", compiled=compiled)
        for k in range(12):
            whole.step(k)
        first = Run("fused", compiled=compiled)
        for k in range(5):
            first.step(k)
        saved = roundtrip({"opt": first.opt.state_dict(), "model": first.model.state_dict(), "ema": first.ema.state_dict()})
        second = Run("fused", compiled=compiled)
        second.model.load_state_dict(saved["model"])
        second.ema.load_state_dict(saved["ema"])
        second.opt.load_state_dict(saved["opt"])
        for k in range(5, 12):
            second.step(k)
    finally:
        torch._dynamo.reset()
    a, b = tensors(second), tensors(whole)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_checkpoints_move_between_torch_and_fused() -> None:
    # Same state_dict format: a torch-AdamW checkpoint resumes under `fused` and back, bitwise.
    ref = Run("torch")
    for k in range(8):
        ref.step(k)
    mixed = Run("torch")
    for k in range(3):
        mixed.step(k)
    state = roundtrip(mixed.opt.state_dict())
    assert set(state["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    fused = Run("fused")
    fused.model.load_state_dict(mixed.model.state_dict())
    fused.ema.load_state_dict(mixed.ema.state_dict())
    fused.opt.load_state_dict(state)
    for k in range(3, 6):
        fused.step(k)
    back = Run("torch")
    back.model.load_state_dict(fused.model.state_dict())
    back.ema.load_state_dict(fused.ema.state_dict())
    back.opt.load_state_dict(roundtrip(fused.opt.state_dict()))
    for k in range(6, 8):
        back.step(k)
    a, b = tensors(back), tensors(ref)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_parameter_without_gradient_keeps_its_state_but_the_ema_follows() -> None:
    run = Run("fused", clip=0.0)
    frozen = run.params[-1]
    run.step(0)
    frozen.grad = None
    before = frozen.detach().clone()
    with torch.no_grad():
        frozen.add_(1.0)  # moved by hand: the EMA must follow it, AdamW must not touch it
        ema_before = run.emas[-1].clone()
    x, y = batch(1)
    nn.functional.mse_loss(run.model[:-1](x).sum(-1, keepdim=True).expand(-1, 5), y).backward()
    update(run.opt, run.params, run.emas, DECAY, grad_norm(run.opt, run.params, 0.0))
    assert torch.equal(frozen, before + 1.0)
    assert torch.equal(run.emas[-1], torch.lerp(ema_before, before + 1.0, 1 - DECAY))
    assert float(run.opt.state[frozen]["step"]) == 1.0


def test_bad_pairing_is_an_error() -> None:
    m = small_model()
    with pytest.raises(ValueError, match="pair"):
        FusedAdamWEMA(list(m.parameters()), list(m.parameters())[:-1], lr=1e-3)
