"""Texture KL-VAE: golden parity, the authors' checkpoint layout, posterior sampling, pixels."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sfd.checkpoint import WeightsError
from sfd.config import TEXTURE_VAE_PRESETS
from sfd.models.autoencoder import (
    AutoencoderKL,
    load_texture_vae,
    texture_vae_config_from_authors,
    to_uint8,
)
from tests.conftest import random_state_dict, read_keys_file

# fp32 on CPU; the largest observed difference is ~4e-6 on |decoded| up to ~3.8.
GOLDEN_ATOL = 1e-5


class OldLightningCallback:
    """Stands for a class pickled into a Lightning checkpoint (``weights_only`` refuses it)."""


@pytest.fixture(scope="module")
def golden(golden_dir: Path) -> tuple[AutoencoderKL, dict[str, torch.Tensor]]:
    weights = golden_dir / "kl-vae-tiny-weights.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        cfg = texture_vae_config_from_authors(json.loads(f.metadata()["config"]))
    model = load_texture_vae(weights, cfg=cfg)
    return model, load_file(str(golden_dir / "kl-vae-tiny-io.safetensors"))


def test_golden_parity(golden) -> None:
    model, io = golden
    assert model.cfg.embed_dim == model.cfg.z_channels == 8
    with torch.no_grad():
        mean, logvar = model.encode_moments(io["image"])
        decoded = model.decode(io["z"])
    torch.testing.assert_close(mean, io["posterior_mean"], rtol=0, atol=GOLDEN_ATOL)
    torch.testing.assert_close(logvar, io["posterior_logvar"], rtol=0, atol=GOLDEN_ATOL)
    torch.testing.assert_close(decoded, io["decoded"], rtol=0, atol=GOLDEN_ATOL)


def test_frozen_after_loading(golden) -> None:
    model, _ = golden
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_authors_lightning_checkpoint_loads_strict(keys_dir: Path, tmp_path: Path) -> None:
    keys = read_keys_file(keys_dir / "texture-vae-f16d32.txt")
    model_sd = random_state_dict(keys)
    # Extra entries the released file (or its LDM/VA-VAE siblings) carries beside the model.
    extras = {
        "loss.logvar": torch.zeros(()),
        "loss.perceptual_loss.net.slice1.0.weight": torch.randn(64, 3, 3, 3),
        "loss.discriminator.main.0.weight": torch.randn(64, 3, 4, 4),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.encoderconv_inweight": torch.randn(128, 3, 3, 3),
    }
    ckpt = {
        "state_dict": {**model_sd, **extras},
        "epoch": 1,
        "global_step": 2,
        # Older Lightning pickles the callback class itself as a dict key.
        "callbacks": {OldLightningCallback: {"best_model_score": torch.tensor(0.5)}},
    }
    path = tmp_path / "ldm-imagenet256-f16d32-50ep.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(pickle.UnpicklingError):  # the plain safe load refuses it; ours must not
        torch.load(path, weights_only=True)

    model = load_texture_vae(path)
    own = model.state_dict()
    assert set(own) == set(keys) == set(ckpt["state_dict"]) - set(extras)
    for k in ("encoder.down.4.attn.1.proj_out.weight", "decoder.up.0.block.2.conv2.bias", "quant_conv.weight"):
        torch.testing.assert_close(own[k], model_sd[k], rtol=0, atol=0)

    # One small real forward (a 256² pass takes ~20 s on 2 CPU cores): 64² → 4×4 latent.
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z = model.encode(x, generator=torch.Generator().manual_seed(1))
        y = model.decode(z)
    assert z.shape == (1, 32, 4, 4) and y.shape == (1, 3, 64, 64)
    assert torch.isfinite(y).all()

    # The 256² shapes of the same architecture, without the compute (meta tensors).
    with torch.device("meta"):
        meta_model = AutoencoderKL(model.cfg)
        z = meta_model.encode(torch.empty(1, 3, 256, 256), sample=False)
        assert z.shape == (1, 32, 16, 16)
        assert meta_model.decode(z).shape == (1, 3, 256, 256)


def test_plain_state_dict_and_unknown_key(golden, tmp_path: Path) -> None:
    model, _ = golden
    sd = dict(model.state_dict())
    pt = tmp_path / "plain.pt"
    torch.save(sd, pt)
    loaded = load_texture_vae(pt, cfg=model.cfg)
    torch.testing.assert_close(loaded.state_dict()["decoder.conv_out.weight"], sd["decoder.conv_out.weight"])
    # Only the documented non-model prefixes are dropped; anything else is an error.
    torch.save({"state_dict": {**sd, "colorize": torch.zeros(3, 5, 1, 1)}}, tmp_path / "extra.ckpt")
    with pytest.raises(WeightsError, match="unexpected.*colorize"):
        load_texture_vae(tmp_path / "extra.ckpt", cfg=model.cfg)


def test_f8c4_preset_shapes() -> None:
    cfg = TEXTURE_VAE_PRESETS["f8c4"]
    model = AutoencoderKL(cfg).eval()
    assert model.downsample_factor == 8
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        z = model.encode(x, sample=False)
        assert z.shape == (1, 4, 8, 8)
        assert model.decode(z).shape == (1, 3, 64, 64)
    # kl-f8 has attention only in the mid blocks.
    assert not any(".attn." in k for k in model.state_dict())
    assert model.state_dict()["quant_conv.weight"].shape == (8, 8, 1, 1)


def test_missing_file_names_file_and_publisher(tmp_path: Path) -> None:
    with pytest.raises(WeightsError) as e:
        load_texture_vae(tmp_path / "absent.ckpt")
    msg = str(e.value)
    assert "ldm-imagenet256-f16d32-50ep.ckpt" in msg and "hustvl" in msg and "absent.ckpt" in msg


def test_wrong_shape_key_is_named(golden, tmp_path: Path) -> None:
    model, _ = golden
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["encoder.mid.attn_1.q.weight"] = torch.zeros(64, 64, 3, 3)
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(WeightsError, match=r"wrong shape.*encoder\.mid\.attn_1\.q\.weight"):
        load_texture_vae(path, cfg=model.cfg)


def test_to_uint8_matches_hand_computed_pixels() -> None:
    # 127.5*x + 128, clamped to [0, 255], truncated:
    x = torch.tensor([-2.0, -1.0, -0.999, 0.0, 0.5, 0.996, 1.0, 3.0, -0.5, 0.0039])
    expected = [0, 0, 0, 128, 191, 254, 255, 255, 64, 128]
    # -1 -> 0.5 -> 0; -0.999 -> 0.6275 -> 0; 0.5 -> 191.75 -> 191; 0.996 -> 254.99 -> 254;
    # 1 -> 255.5 -> 255 (clamp); -0.5 -> 64.25 -> 64; 0.0039 -> 128.497 -> 128.
    image = x.view(1, 1, 1, -1).expand(1, 3, 1, -1)  # B,C,H,W
    pixels = to_uint8(image)
    assert pixels.dtype == torch.uint8 and pixels.shape == (1, 1, x.numel(), 3)
    assert pixels[0, 0, :, 0].tolist() == expected
    assert (pixels[..., 0] == pixels[..., 2]).all()
    # Channel order survives the NCHW → NHWC move.
    rgb = torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1)
    assert to_uint8(rgb)[0, 0, 0].tolist() == [0, 128, 255]
    # bf16 decoder output is mapped in fp32 (bf16 arithmetic would be off by up to 1).
    assert to_uint8(torch.tensor(0.3).to(torch.bfloat16).view(1, 1, 1, 1)).item() == int(
        127.5 * torch.tensor(0.3).to(torch.bfloat16).float().item() + 128
    )


def test_encode_mean_and_reproducible_sampling(golden) -> None:
    model, io = golden
    image = io["image"]  # 2x3x32x32
    with torch.no_grad():
        mean, _ = model.encode_moments(image)
        torch.testing.assert_close(model.encode(image, sample=False), mean, rtol=0, atol=0)
        a = model.encode(image, generator=torch.Generator().manual_seed(7))
        b = model.encode(image, generator=torch.Generator().manual_seed(7))
        c = model.encode(image, generator=torch.Generator().manual_seed(8))
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.allclose(a, c)
        # One generator per row: a row's draw does not depend on the batch it sits in.
        rows = model.encode(image, generator=[torch.Generator().manual_seed(s) for s in (3, 4)])
        row1 = model.encode(image[1:], generator=[torch.Generator().manual_seed(4)])
        torch.testing.assert_close(rows[1:], row1, rtol=0, atol=1e-5)  # conv batch-size rounding only
    with pytest.raises(ValueError, match="2 generators for a batch of 1"):
        model.encode(image[:1], generator=[torch.Generator(), torch.Generator()])


@pytest.mark.parametrize("logvar_bias, expected_log_std", [(2.0, None), (50.0, 10.0), (-100.0, -15.0)])
def test_sample_std_is_exp_half_clamped_logvar(golden, logvar_bias: float, expected_log_std: float | None) -> None:
    base, io = golden
    model = AutoencoderKL(base.cfg).eval()
    model.load_state_dict(base.state_dict())
    e = model.cfg.embed_dim
    with torch.no_grad():
        # Zero mean (so e^-15 noise is not lost to rounding) and a shifted log-variance, to tell
        # std from var and to exercise both ends of the clamp.
        model.quant_conv.weight[:e] = 0
        model.quant_conv.bias[:e] = 0
        model.quant_conv.bias[e:] += logvar_bias
        image = io["image"].repeat(8, 1, 1, 1)  # 16 images x 8 x 8 x 8 = 8192 draws
        mean, logvar = model.encode_moments(image)
        z = model.encode(image, generator=torch.Generator().manual_seed(0))
    log_std = 0.5 * logvar.clamp(-30, 20)
    if expected_log_std is not None:
        assert torch.allclose(log_std, torch.full_like(log_std, expected_log_std))
    assert (mean == 0).all()
    eps = z / torch.exp(log_std)
    # Standard normal: the sample std of 8192 draws is within ~4 sigma (0.03) of 1.
    assert abs(eps.std().item() - 1) < 0.04 and abs(eps.mean().item()) < 0.05


def test_bf16_autocast(golden) -> None:
    model, io = golden
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        z = model.encode(io["image"], sample=False)
        decoded = model.decode(io["z"])
    assert z.dtype == torch.float32  # posterior maths kept in fp32
    assert torch.isfinite(decoded).all()
    torch.testing.assert_close(z, io["posterior_mean"], rtol=0, atol=0.1)
    torch.testing.assert_close(decoded.float(), io["decoded"], rtol=0, atol=0.2)
    assert to_uint8(decoded).dtype == torch.uint8


def test_rejects_single_z_config() -> None:
    from sfd.config import ConfigError

    with pytest.raises(ConfigError, match="double_z"):
        AutoencoderKL(dataclasses.replace(TEXTURE_VAE_PRESETS["tiny"], double_z=False))
