"""Semantic VAE: parity with the authors' model, checkpoint loading, loss maths, latent layout."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from sfd.checkpoint import WeightsError, save_safetensors
from sfd.config import SEMVAE_PRESETS, SemVAEConfig, from_dict
from sfd.models.semvae import (
    LOGVAR_MAX,
    SemVAE,
    latent_to_tokens,
    load_semvae,
    semvae_loss,
    tokens_to_latent,
)
from tests.conftest import random_state_dict, read_keys_file


@pytest.fixture(scope="module")
def golden(golden_dir):
    weights = golden_dir / "semvae-tiny-weights.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        cfg = from_dict(SemVAEConfig, json.loads(f.metadata()["config"]))
    model = load_semvae(weights, cfg=cfg)
    return model, load_file(str(golden_dir / "semvae-tiny-io.safetensors"))


def test_golden_parity(golden):
    model, io = golden
    with torch.no_grad():
        moments = model.encode_moments(io["tokens"])
        decoded = model.decode(io["z"])
    assert moments.shape == io["moments"].shape == (2, 16, 8)
    assert (moments - io["moments"]).abs().max().item() <= 1e-5
    assert (decoded - io["decoded"]).abs().max().item() <= 1e-5


def test_encode_sample_and_mean(golden):
    model, io = golden
    tokens = io["tokens"]
    with torch.no_grad():
        mean = model.encode(tokens, sample=False)
        z = model.encode(tokens, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(mean, io["moments"][..., :4], atol=1e-5)
    # The authors draw ε on their (B, C, 4, 4) map (diffusers posterior), then flatten row-major.
    eps_map = torch.randn((2, 4, 4, 4), generator=torch.Generator().manual_seed(3))
    std = torch.exp(0.5 * io["moments"][..., 4:].clamp(-30.0, 20.0))
    expected = io["moments"][..., :4] + std * latent_to_tokens(eps_map)
    assert torch.allclose(z, expected, atol=1e-5)
    assert not torch.allclose(z, mean, atol=1e-3)


def test_forward_decodes_a_posterior_sample(golden):
    model, io = golden
    with torch.no_grad():
        recon, mean, logvar = model(io["tokens"], generator=torch.Generator().manual_seed(0))
        z = model.encode(io["tokens"], generator=torch.Generator().manual_seed(0))
        assert torch.allclose(recon, model.decode(z), atol=1e-6)
    assert torch.allclose(torch.cat([mean, logvar], -1), io["moments"], atol=1e-5)


def test_loads_authors_checkpoint_layout(keys_dir, tmp_path):
    keys = read_keys_file(keys_dir / "semvae-transformer-ch16.txt")
    sd = random_state_dict(keys, seed=1)
    ckpt = {  # what their trainer writes into semantic_ae_final.pt
        "iteration": 1_000_000,
        "model_state_dict": sd,
        "optimizer_state_dict": {"state": {0: {"step": torch.tensor(1.0)}}, "param_groups": [{"lr": 5e-6}]},
        "loss": 0.1,
        "config": "model:\n  arch: transformer\n",
        "input_dim": 768,
        "bottleneck_dim": 16,
    }
    path = tmp_path / "semantic_ae_final.pt"
    torch.save(ckpt, path)
    model = load_semvae(path)
    state = model.state_dict()
    assert set(state) == set(keys)
    assert all(torch.equal(state[k], sd[k]) for k in keys)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        z = model.encode(torch.randn(1, 256, 768))
    assert z.shape == (1, 256, 16)


def test_safetensors_round_trip_and_bad_file(tmp_path):
    cfg = SEMVAE_PRESETS["tiny"]
    model = SemVAE(cfg)
    path = tmp_path / "semvae.safetensors"
    save_safetensors(model.state_dict(), path)
    loaded = load_semvae(path, preset="tiny")
    x = torch.randn(2, 16, cfg.input_dim)
    with torch.no_grad():
        assert torch.equal(loaded.encode_moments(x), model.encode_moments(x))

    sd = dict(model.state_dict())
    sd.pop("decoder.0.bias")
    sd["encoder.0.weight"] = torch.zeros(3, 3)
    save_safetensors(sd, path)
    with pytest.raises(WeightsError, match=r"missing \(1\): decoder.0.bias(.|\n)*wrong shape"):
        load_semvae(path, preset="tiny")


def test_missing_file_message(tmp_path):
    with pytest.raises(WeightsError) as err:
        load_semvae(tmp_path / "absent.pt")
    msg = str(err.value)
    assert "absent.pt" in msg and "semantic_ae_final.pt" in msg and "SFD-Project/SFD" in msg


def _loss_case():
    recon = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]).repeat(2, 1, 1)  # (B=2, N=2 tokens, D=2)
    target = torch.tensor([[[2.0, 0.0], [1.0, 1.0]]]).repeat(2, 1, 1)
    mean = torch.tensor([[[0.0, 1.0], [2.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    logvar = torch.tensor([[[0.0, math.log(2.0)], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    return recon, target, mean, logvar


def test_loss_terms_by_hand():
    recon, target, mean, logvar = _loss_case()
    mse = 0.5  # squared errors 1, 0, 1, 0 per image
    # KL of image 0: 0.5·(1 + 2 − 1 − ln 2) + 0.5·4 = 3 − ln2/2; image 1 is N(0, 1): 0. Summed, then batch mean.
    kl = (3.0 - math.log(2.0) / 2) / 2
    # Token axis (authors): per feature, cosine across the two tokens: [1,0]·[2,1] → 2/√5; [0,1]·[0,1] → 1.
    cos_token = 1.0 - (2.0 / math.sqrt(5.0) + 1.0) / 2
    # Feature axis (per token): [1,0]·[2,0] → 1; [0,1]·[1,1] → 1/√2.
    cos_feature = 1.0 - (1.0 + 1.0 / math.sqrt(2.0)) / 2
    for axis, cos in (("token", cos_token), ("feature", cos_feature)):
        out = semvae_loss(recon, target, mean, logvar, cos_axis=axis)
        assert out["mse"].item() == pytest.approx(mse, abs=1e-6)
        assert out["cos"].item() == pytest.approx(cos, abs=1e-6)
        assert out["kl"].item() == pytest.approx(kl, abs=1e-6)
        assert out["total"].item() == pytest.approx(mse + cos + 1e-7 * kl, abs=1e-6)
    out = semvae_loss(recon, target, mean, logvar, kl_weight=0.5, mse_weight=2.0, cos_weight=0.0)
    assert out["total"].item() == pytest.approx(2 * mse + 0.5 * kl, abs=1e-6)
    with pytest.raises(ValueError, match="cos_axis"):
        semvae_loss(recon, target, mean, logvar, cos_axis="tokens")  # type: ignore[arg-type]


def test_loss_matches_authors_calls_and_clamps_logvar():
    g = torch.Generator().manual_seed(0)
    recon, target = torch.randn(3, 16, 8, generator=g), torch.randn(3, 16, 8, generator=g)
    mean, logvar = torch.randn(3, 16, 4, generator=g), torch.randn(3, 16, 4, generator=g)
    out = semvae_loss(recon, target, mean, logvar)
    # Their line: 1 - F.cosine_similarity(recon, target).mean(), default dim=1 = the token axis.
    assert torch.allclose(out["cos"], 1 - F.cosine_similarity(recon, target).mean())
    per_token = semvae_loss(recon, target, mean, logvar, cos_axis="feature")["cos"]
    assert not torch.allclose(out["cos"], per_token)
    big = torch.full((1, 1, 1), 40.0)  # clamped to 20 before the KL, as diffusers' posterior does
    kl = semvae_loss(torch.ones(1, 1, 1), torch.ones(1, 1, 1), torch.zeros(1, 1, 1), big)["kl"]
    assert kl.item() == pytest.approx(0.5 * (math.exp(LOGVAR_MAX) - 1 - LOGVAR_MAX), rel=1e-5)


def test_latent_reshape_round_trip():
    z = torch.arange(2 * 256 * 3, dtype=torch.float32).reshape(2, 256, 3)
    latent = tokens_to_latent(z)
    assert latent.shape == (2, 3, 16, 16)
    # Row-major: token i sits at row i // 16, column i % 16.
    assert torch.equal(latent[1, 2, 5, 7], z[1, 5 * 16 + 7, 2])
    assert torch.equal(latent_to_tokens(latent), z)
    with pytest.raises(ValueError, match="square"):
        tokens_to_latent(torch.zeros(1, 255, 3))


def test_training_step_and_bf16_autocast():
    torch.manual_seed(0)
    model = SemVAE(SEMVAE_PRESETS["tiny"])
    x = torch.randn(2, 16, 64)
    recon, mean, logvar = model(x)
    semvae_loss(recon, x, mean, logvar)["total"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        z = model.encode(x, sample=False)
        assert torch.isfinite(model.decode(z).float()).all()
