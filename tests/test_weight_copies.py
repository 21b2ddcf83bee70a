"""weight_cast=optimizer (sfd/weight_copies.py): bf16 weight copies written by the optimizer pass.

The forward must be autocast's bit for bit (the copy is the weight autocast would cast), the
weight gradient autocast's without its rounding to bf16, the copies must follow every update
(compiled pass and reference, and in a compiled model, which must read them as inputs, not bake
them in), and the trainer must train with them as with autocast and resume bitwise."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sfd.config import ConfigError, train_preset
from sfd.optim import FusedAdamWEMA
from sfd.weight_copies import Linear, attach, cast_linear
from tests.test_train import assert_same_weights, final_weights, losses, make_cache, run

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

BF16_REL = 2.0**-8  # one bf16 rounding of a value (8 significand bits)


def _linear(seed: int = 0) -> tuple[Linear, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    layer = Linear(24, 40)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(40, 24, generator=g) * 0.2)
        layer.bias.copy_(torch.randn(40, generator=g) * 0.2)
    return layer, torch.randn(3, 7, 24, generator=g)


def test_cast_linear_is_autocasts_forward_and_an_unrounded_weight_gradient() -> None:
    layer, x = _linear()
    w_lp = layer.weight.detach().to(torch.bfloat16)
    dy = torch.randn(3, 7, 40)
    results = {}
    for kind in ("autocast", "copy"):
        xi = x.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = nn.functional.linear(xi, layer.weight, layer.bias) if kind == "autocast" else cast_linear(xi, layer.weight, layer.bias, w_lp)
        (y.float() * dy).sum().backward()
        results[kind] = (y, xi.grad, layer.weight.grad, layer.bias.grad)
    (ya, gxa, gwa, gba), (yc, gxc, gwc, gbc) = results["autocast"], results["copy"]
    assert yc.dtype == ya.dtype == torch.bfloat16 and torch.equal(yc, ya)  # the forward: bit for bit
    assert gxc.dtype == gxa.dtype == torch.float32
    torch.testing.assert_close(gxc, gxa, rtol=BF16_REL, atol=1e-6)
    assert gwc.dtype == gbc.dtype == torch.float32
    # autocast rounds the weight gradient to bf16, the copy path keeps it fp32: within one rounding.
    torch.testing.assert_close(gwc, gwa, rtol=BF16_REL, atol=1e-5)
    torch.testing.assert_close(gbc, gba, rtol=BF16_REL, atol=1e-5)
    exact = torch.einsum("bno,bni->oi", dy.to(torch.bfloat16).float(), x.to(torch.bfloat16).float())
    assert (gwc - exact).abs().max() < (gwa - exact).abs().max()  # and is the closer of the two


def test_linear_uses_the_copy_only_under_autocast_of_its_dtype() -> None:
    layer, x = _linear()
    plain = nn.functional.linear(x, layer.weight, layer.bias)
    copies = attach(nn.Sequential(layer), torch.bfloat16)
    with torch.no_grad():
        layer.weight_lp.zero_()  # a copy that differs from the weight shows which one was read
    assert torch.equal(layer(x), plain)  # no autocast: the fp32 weight, as nn.Linear
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(layer(x), layer.bias.to(torch.bfloat16).expand(3, 7, 40))  # the copy
    assert copies.stale() == [0]
    copies.refresh()
    assert copies.stale() == [] and len(copies) == 1 and copies.numel() == 40 * 24
    assert copy.deepcopy(layer).weight_lp is None  # an EMA copy of the model gets no (frozen) copy


@pytest.mark.parametrize("compiled", [False, True], ids=["reference", "compiled"])
def test_optimizer_pass_writes_the_copies_and_updates_as_without(compiled: bool) -> None:
    """Over 5 steps (clip, weight decay): the weights, moments and EMA equal a run without copies
    bit for bit, and after every step each copy is its weight rounded to bf16."""
    runs = {}
    for with_copies in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(Linear(16, 32), nn.SiLU(), Linear(32, 8), nn.LayerNorm(8))
        ema = copy.deepcopy(model)
        copies = attach(model, torch.bfloat16) if with_copies else None
        opt = FusedAdamWEMA(model.parameters(), ema.parameters(), lr=1e-2, weight_decay=0.01, ema_decay=0.9,
                            max_grad_norm=0.5, compiled=compiled)
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=g)
            opt.step(weight_copies=copies)
            if copies is not None:
                assert copies.stale() == []
        runs[with_copies] = (model.state_dict(), ema.state_dict(), opt.state_dict())
        if copies is not None:
            assert len(copies) == 2 and all(c.dtype == torch.bfloat16 for _, c in copies.pairs)
    for a, b in zip(runs[False][:2], runs[True][:2]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    for sa, sb in zip(runs[False][2]["state"].values(), runs[True][2]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in ("exp_avg", "exp_avg_sq"))


@pytest.mark.slow
def test_compiled_model_reads_the_current_copies_without_recompiling() -> None:
    """The copies are module attributes: a compiled model must read them as inputs each call
    (an in-place update shows in the next output), not fold them into the graph as constants."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(Linear(16, 32), nn.SiLU(), Linear(32, 8))
    copies = attach(model, torch.bfloat16)
    net = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 16)
    torch._dynamo.utils.counters.clear()
    for i in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1)
        copies.refresh()
        with torch._dynamo.config.patch(error_on_recompile=i > 0), torch.autocast("cpu", dtype=torch.bfloat16):
            got = net(x)
            want = model(x)
        assert torch.equal(got, want), i
    torch._dynamo.reset()


def test_weight_cast_needs_bf16() -> None:
    with pytest.raises(ConfigError, match="needs precision=bf16"):
        train_preset("tiny", "weight_cast=optimizer", "precision=fp32")
    with pytest.raises(ConfigError, match="weight_cast must be"):
        train_preset("tiny", "weight_cast=fp8")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cache(tmp_path_factory.mktemp("cache") / "tiny.zarr").path


def test_trainer_with_weight_copies_trains_as_autocast_and_resumes_bitwise(cache: Path, tmp_path: Path, capsys) -> None:
    """bf16 on CPU, 4 steps: step 1's forward is autocast's exactly (same loss); afterwards the
    unrounded weight gradients let the runs part within the bf16 bounds of tests/test_precision.py;
    2 + 2 steps with a resume equal 4 straight (the copies are rebuilt from the saved weights)."""
    common = ("precision=bf16", "ckpt_every=2")
    run(cache, tmp_path / "autocast", "max_steps=4", *common)
    run(cache, tmp_path / "copies", "max_steps=4", "weight_cast=optimizer", *common)
    banner = capsys.readouterr().out
    assert "weight_cast=bf16 weight copies written by the optimizer pass" in banner, banner
    a, c = losses(tmp_path / "autocast"), losses(tmp_path / "copies")
    assert list(a) == list(c) == [1, 2, 3, 4]
    assert a[1] == c[1]  # same weights, same forward: the same loss to the bit
    for step in a:
        np.testing.assert_allclose(list(c[step].values()), list(a[step].values()), rtol=1e-2, atol=1e-6)
    assert_same_weights(final_weights(tmp_path / "copies"), final_weights(tmp_path / "autocast"), atol=2 * 1e-3 * 4)

    run(cache, tmp_path / "split", "max_steps=2", "weight_cast=optimizer", *common)
    run(cache, tmp_path / "split", "max_steps=4", "weight_cast=optimizer", *common)
    assert losses(tmp_path / "split") == c
    assert_same_weights(final_weights(tmp_path / "split"), final_weights(tmp_path / "copies"))



@pytest.mark.slow
def test_compiled_training_step_with_copies_is_one_graph_equal_to_eager() -> None:
    """The trainer's compiled model under bf16 autocast with copies attached, forward and backward
    (the copy's autograd.Function inside the graph): one graph, no recompiles over 3 steps as the
    copies are rewritten, and the same loss and gradients as the eager model with the same copies.
    aot_eager runs dynamo and AOTAutograd without inductor's code generation (seconds, not minutes)."""
    from sfd.config import model_preset
    from sfd.models.lightningdit import LightningDiT

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LightningDiT(model_preset("tiny")).train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    copies = attach(model, torch.bfloat16)
    assert len(copies) == sum(isinstance(m, nn.Linear) for m in model.modules())
    net = torch.compile(model, fullgraph=True, backend="aot_eager")
    cfg = model.cfg
    torch._dynamo.utils.counters.clear()
    worst = 0.0
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(4, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
        t, y, drop = torch.rand(4, generator=g), torch.randint(0, cfg.num_classes, (4,), generator=g), torch.tensor([0, 1, 0, 0])
        grads = []
        for fn in (net, model):
            with torch._dynamo.config.patch(error_on_recompile=step > 0), torch.autocast("cpu", dtype=torch.bfloat16):
                v, r = fn(x, (t, t), y, return_repa=True, force_drop_ids=drop)
            loss = v.float().square().mean() + r.float().square().mean()
            loss.backward()
            grads.append((float(loss.detach()), [p.grad.clone() for p in model.parameters()]))
            model.zero_grad(set_to_none=True)
        (lc, gc), (le, ge) = grads
        assert lc == le, step  # the forward: bit for bit
        for a, b in zip(gc, ge):  # AOTAutograd's decomposed backward sums in another order
            err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
            worst = max(worst, err)
            assert err <= 1e-2, (step, err)
        with torch.no_grad():  # an optimizer step's worth of change, written to the copies
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 1e-2)
        copies.refresh()
    print(f"largest gradient difference, relative to the tensor's largest entry: {worst:.2e}")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"]
    torch._dynamo.reset()
