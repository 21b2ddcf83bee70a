"""bf16 that has run: precision=bf16 autocasts on CPU too, so the training step and a sampling
batch run their bf16 lines here, close to fp32; what must stay fp32 (loss terms, master weights,
EMA, optimizer state, Inception features, latent statistics) is checked to stay fp32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sfd.checkpoint import list_checkpoints, load_training_state, read_checkpoint
from sfd.config import SamplingConfig, model_preset
from sfd.models.inception import InceptionV3
from sfd.models.lightningdit import LightningDiT
from sfd.samplers import generate_latents
from tests.test_train import final_weights, losses, make_cache, run
from train import main as trainer

# Stated bounds. bf16 keeps 8 significand bits (relative rounding 2^-9 ≈ 2e-3 per op); the
# losses are means over the batch of fp32 reductions of bf16 predictions.
LOSS_RTOL = 1e-2  # per logged loss term, 5 steps of the tiny model (seen: ≤ 1.2e-3)
WEIGHT_REL_L2 = 1e-2  # ‖w_bf16 − w_fp32‖ / ‖w_fp32‖ over a whole state dict (seen: 1.2e-3)
# Any single weight: AdamW moves each weight by ≈ lr per step whatever the gradient's size, so
# where bf16 flips the sign of a near-zero gradient the two runs part by up to 2·lr per step.
WEIGHT_ATOL = 2 * 1e-3 * 5  # 2·lr·steps (seen: 6e-3)
SAMPLE_ATOL = 5e-2  # Euler 16 steps of a random tiny DiT, latents of std ~1

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cache(tmp_path_factory.mktemp("cache") / "tiny.zarr").path


def test_bf16_training_on_cpu_runs_bf16_and_keeps_fp32_state(cache: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    seen: list[dict] = []
    real_loss = trainer.sfd_loss

    def spy(pred, target, **kw):  # the trainer's loss, recording what reached it
        terms = real_loss(pred, target, **kw)
        seen.append({
            "pred": pred.dtype, "projection": kw["repa_projection"].dtype,
            "terms": {terms.total.dtype, terms.mse.dtype, terms.cos.dtype, terms.repa.dtype},
            "autocast_at_loss": torch.is_autocast_enabled("cpu"),
        })
        return terms

    monkeypatch.setattr(trainer, "sfd_loss", spy)
    run(cache, tmp_path / "bf16", "max_steps=5", "precision=bf16")
    banner = capsys.readouterr().out
    assert "autocast=bf16 (cpu autocast)" in banner, banner
    assert len(seen) == 5
    assert all(s["pred"] == s["projection"] == torch.bfloat16 for s in seen)  # the DiT ran in bf16
    assert all(s["terms"] == {torch.float32} and not s["autocast_at_loss"] for s in seen)  # the loss did not

    seen.clear()
    run(cache, tmp_path / "fp32", "max_steps=5", "precision=fp32")
    assert "autocast=off (fp32)" in capsys.readouterr().out
    assert all(s["pred"] == torch.float32 for s in seen)

    bf, fp = losses(tmp_path / "bf16"), losses(tmp_path / "fp32")
    assert list(bf) == list(fp) == [1, 2, 3, 4, 5]
    for step in fp:
        np.testing.assert_allclose(list(bf[step].values()), list(fp[step].values()), rtol=LOSS_RTOL, atol=1e-6)
    assert bf != fp  # bf16 really changed the numbers
    wb, wf = final_weights(tmp_path / "bf16"), final_weights(tmp_path / "fp32")
    for part in ("model", "ema"):
        for k, v in wb[part].items():
            assert v.dtype == torch.float32, f"{part}.{k} saved as {v.dtype}"  # master weights and EMA
            torch.testing.assert_close(v, wf[part][k], atol=WEIGHT_ATOL, rtol=0, msg=f"{part}.{k}")
        num = sum(float((wb[part][k] - wf[part][k]).square().sum()) for k in wf[part])
        den = sum(float(wf[part][k].square().sum()) for k in wf[part])
        assert (num / den) ** 0.5 < WEIGHT_REL_L2, (part, (num / den) ** 0.5)
    ckpt = list_checkpoints(tmp_path / "bf16")[-1][1]
    opt = load_training_state(ckpt)["optimizer"]
    assert all(t.dtype == torch.float32 for st in opt["state"].values() for t in st.values())
    # Latent statistics come from the cache unchanged, whatever the precision.
    fp_ckpt = list_checkpoints(tmp_path / "fp32")[-1][1]
    assert read_checkpoint(ckpt, prefer_ema=True).latent_stats == read_checkpoint(fp_ckpt, prefer_ema=True).latent_stats
    assert load_file(ckpt / "ema.safetensors").keys() == wf["ema"].keys()


def random_tiny_dit() -> LightningDiT:
    torch.manual_seed(0)
    model = LightningDiT(model_preset("tiny")).eval()
    with torch.no_grad():  # the zero-initialised output layers would make every velocity 0
        for p in model.final_layer.parameters():
            p.normal_(0, 0.05)
    return model


def test_bf16_sampling_batch_on_cpu_is_close_to_fp32() -> None:
    model = random_tiny_dit()
    dtypes: list[torch.dtype] = []
    model.final_layer.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
    labels, indices = [0, 1, 2, 3], [0, 1, 2, 3]
    out = {}
    for bf16 in (False, True):
        dtypes.clear()
        sampling = SamplingConfig(method="euler", num_steps=16, bf16=bf16)
        out[bf16], nfe = generate_latents(model, labels, indices, sampling)
        assert set(dtypes) == {torch.bfloat16 if bf16 else torch.float32} and nfe == len(dtypes)
    assert out[True].dtype == out[False].dtype == torch.float32  # the solver state stays fp32
    diff = float((out[True] - out[False]).abs().max())
    assert 0 < diff < SAMPLE_ATOL, diff


def test_inception_features_stay_fp32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    net = InceptionV3().eval()
    images = torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        plain = net(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = net(images)
    assert under.pool.dtype == torch.float32 and torch.equal(under.pool, plain.pool)
